"""What ordering the attention kernel's programs by work gains (`TileConfig.heavy_rows_first`).

    python scripts/tune_row_order.py [SHAPE ...]      # default: flux cogvideox wan

For each model shape (`sparsediff.bench.kernel.SHAPES`), next to cuDNN dense (do_bench medians):
- the kernel alone on a LUT, programs in row order and heavy rows first, bf16 and FP8 (quantised
  once, outside the timing): `random` masks (the same count in every row: nothing to balance) and
  `local` ones (space-time neighbours; the text segment, where the model has one, kept densely);
- `build_block_lut`, which lists the rows by work band for that order as it builds the table;
- `sparse_attention` (prediction included, CUDA-graphed) at 80% predicted sparsity on the video
  workload in tile order, as `sparsediff bench predict` times it, in either order.
"""
import dataclasses
import sys

import torch
import triton

from sparsediff.attention import BLOCK_M, BLOCK_N, sparse_attention
from sparsediff.bench.kernel import SHAPES, _make_qkv, local_mask, random_mask
from sparsediff.bench.predict import TILE, cdf_for_sparsity
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels import block_sparse_attn as bsa
from sparsediff.kernels.quantize_fp8 import quantize_fp8
from sparsediff.workloads import to_tile_order, video_workload


def _orders(config: bsa.TileConfig) -> dict[str, bsa.TileConfig]:
    return {name: dataclasses.replace(config, heavy_rows_first=first) for name, first in (("row", False), ("heavy", True))}


def kernel_alone(name: str) -> None:
    s = SHAPES[name]
    q, k, v = _make_qkv(s, torch.bfloat16, "cuda")
    dense = triton.testing.do_bench(lambda: cudnn_dense(q, k, v))
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N)
    print(f"{name}: cuDNN dense {dense:.3f} ms", flush=True)
    for kind, make in (("random", random_mask), ("local", local_mask)):
        for keep in (0.25, 0.1):
            mask = make(s, keep, "cuda")
            lut = bsa.build_block_lut(mask, s.tokens)
            kept = mask.float().mean().item()
            lut_ms = triton.testing.do_bench(cuda_graphed(lambda: bsa.build_block_lut(mask, s.tokens)))
            line = []
            for path, quant, dtype in (("bf16", None, q.dtype), ("fp8", quantized, torch.float8_e4m3fn)):
                times = {}
                for order, config in _orders(bsa.tile_config(s.head_dim, dtype, q.device, s.pairs)).items():
                    times[order] = triton.testing.do_bench(lambda: bsa.attention_from_lut(
                        q, k, v, lut, s.head_dim**-0.5, config=config, quantized=quant))
                line.append(f"{path} row {times['row']:.3f} ms (x{dense * kept / times['row']:.2f} cuDNN) heavy "
                            f"{times['heavy']:.3f} ms (x{dense * kept / times['heavy']:.2f}), {times['row'] / times['heavy']:.3f}x")
            print(f"  {kind} keep {kept:.3f} (rows keep {lut.counts.min().item()}-{lut.counts.max().item()} of "
                  f"{mask.shape[-1]}): " + "; ".join(line) + f"; LUT build (graphed) {lut_ms * 1e3:.1f} us", flush=True)
    del q, k, v, quantized
    torch.cuda.empty_cache()


def predicted(name: str) -> None:
    s = SHAPES[name]
    w = video_workload(s.grid, heads=s.heads, head_dim=s.head_dim, text_tokens=s.text_tokens, dtype=torch.bfloat16,
                       device="cuda")
    q, k, v = (to_tile_order(x, s.grid, TILE) for x in (w.q, w.k, w.v))
    del w
    kw = dict(dense_tail_tokens=s.text_tokens)
    cdf = cdf_for_sparsity(q, k, 0.8, **kw)
    dense = triton.testing.do_bench(lambda: cudnn_dense(q, k, v))
    declared = dict(bsa.TILE_CONFIGS)
    line = []
    for fp8 in (False, True):
        times = {}
        for order in ("row", "heavy"):
            bsa.TILE_CONFIGS.update({key: _orders(config)[order] for key, config in declared.items()})
            times[order] = triton.testing.do_bench(cuda_graphed(lambda: sparse_attention(q, k, v, cdf, 0.0, fp8=fp8, **kw)))
        line.append(f"{'fp8' if fp8 else 'bf16'} row {times['row']:.3f} ms {dense / times['row']:.2f}x, heavy "
                    f"{times['heavy']:.3f} ms {dense / times['heavy']:.2f}x")
    bsa.TILE_CONFIGS.update(declared)
    _, sparsity = sparse_attention(q, k, v, cdf, 0.0, return_sparsity=True, **kw)
    print(f"  predicted, sparsity {sparsity:.3f}, CUDA-graphed sparse_attention vs cuDNN dense {dense:.3f} ms: "
          + "; ".join(line), flush=True)
    del q, k, v
    torch.cuda.empty_cache()


def main(names: list[str]) -> None:
    for name in names or ["flux", "cogvideox", "wan"]:
        kernel_alone(name)
        predicted(name)


if __name__ == "__main__":
    main(sys.argv[1:])
