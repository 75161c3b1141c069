"""One attention-kernel call at a benchmark shape and keep fraction (random mask), bf16 or the FP8
path, launched twice so that Nsight Compute can skip the first (compiling) launch. scripts/session25/
ncu_attention.sh runs it under ncu for the FP8 path against bf16 at the same shapes.

    python3 scripts/session25/ncu_attention.py SHAPE KEEP {bf16,fp8}
"""
import sys

import torch

from sparsediff.bench.kernel import SHAPES, _make_qkv, random_mask
from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N, attention_from_lut, build_block_lut, tile_config
from sparsediff.kernels.quantize_fp8 import quantize_fp8

name, keep, path = sys.argv[1], float(sys.argv[2]), sys.argv[3]
shape = SHAPES[name]
q, k, v = _make_qkv(shape, torch.bfloat16, "cuda")
lut = build_block_lut(random_mask(shape, keep, "cuda"), shape.tokens)
quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N) if path == "fp8" else None
config = tile_config(shape.head_dim, torch.float8_e4m3fn if quantized else torch.bfloat16, q.device, shape.pairs)
print(name, keep, path, config, flush=True)
for _ in range(2):
    attention_from_lut(q, k, v, lut, shape.head_dim**-0.5, config=config, quantized=quantized)
torch.cuda.synchronize()
