"""How much of HunyuanVideo's keep-0.1 gap is L2: random masks over all key blocks against masks of
the same count per row drawn from one half (a per-head K/V working set of 30 MB instead of 61 MB),
and from one quarter. Kernel alone, CUDA-graphed, of cuDNN's graphed dense call."""
import json, os
import torch, triton
from sparsediff.bench.kernel import SHAPES
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_sparse_attn import attention_from_lut, build_block_lut, BLOCK_M, BLOCK_N

out = os.environ.get("OUT", "/tmp")
res = {}
for name in ("hunyuan", "wan"):
    s = SHAPES[name]
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=20, rep=200 if name == "wan" else 2000)
    qb, kb = -(-s.tokens // BLOCK_M), -(-s.tokens // BLOCK_N)
    for keep in (0.1, 0.25):
        n_keep = round(keep * kb)
        for span in (1, 2, 4):
            width = kb // span
            order = torch.rand(s.batch, s.heads, qb, width, device="cuda").argsort(dim=-1)
            mask = torch.zeros(s.batch, s.heads, qb, kb, dtype=torch.bool, device="cuda")
            mask[..., :width] = order < n_keep
            lut = build_block_lut(mask, s.tokens)
            kept = mask.float().mean().item()
            ms = triton.testing.do_bench(cuda_graphed(lambda: attention_from_lut(q, k, v, lut, s.head_dim ** -0.5)),
                                         warmup=20, rep=300 if name == "wan" else 2000)
            res[f"{name} keep {keep} keys from 1/{span}"] = {"ms": ms, "kept": kept, "of_cudnn": dense * kept / ms}
            print(name, keep, span, f"{ms:.3f} ms kept {kept:.4f} -> {dense * kept / ms:.3f} of cuDNN ({dense:.2f} ms)", flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/l2-half.json", "w"), indent=1)
