"""Where FLUX's per-block gap comes from (session 22): kernel alone CUDA-graphed at keep 1 and 0.25 (random
masks), bf16, D=128, against cuDNN's graphed dense call, over the sequence length (row length and waves)
and the head count; then the dropped split-rows kernel's own cost.

    OUT=DIR PYTHONPATH=. python3 scripts/session22/flux_scan.py

The second part imports scratch/bsa_split.py, made from the reverted commit:
`git show 9c44fd5:sparsediff/kernels/block_sparse_attn.py`, with a module-level `FORCE_SPLIT = False`
and the launch's `SPLIT=split_rows > 0` read as `SPLIT=split_rows > 0 or FORCE_SPLIT`.
"""
import json, os
import torch, triton
import sparsediff.kernels.block_sparse_attn as bsa
from sparsediff.bench.kernel import SHAPES, BenchShape, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense

import scratch.bsa_split as split_mod

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
sms = torch.cuda.get_device_properties(dev).multi_processor_count
res = {"sms": sms, "rows": []}
cases = [(24, 4608), (24, 9216), (24, 18432), (24, 36864), (22, 4608), (26, 4608), (12, 4608), (48, 4608)]
for heads, n in cases:
    s = BenchShape(f"h{heads}-n{n}", 1, heads, n, 128, (1, n // 64, 64), 0)
    q, k, v = (torch.randn(1, n, heads, 128, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=20, rep=300)
    for keep in (1.0, 0.25):
        mask = random_mask(s, keep, "cuda")
        lut = bsa.build_block_lut(mask, n)
        kept = float(lut.counts.sum())
        ms = triton.testing.do_bench(cuda_graphed(lambda: bsa.attention_from_lut(q, k, v, lut, 128 ** -0.5)),
                                     warmup=20, rep=300)
        programs = lut.counts.numel()
        row = {"heads": heads, "tokens": n, "keep": keep, "programs": programs, "waves": programs / (2 * sms),
               "ours_ms": ms, "cudnn_ms": dense, "of_cudnn": dense * kept / lut.counts.numel() / (n / 64) / ms,
               "ours_us_per_block_sm": ms * 1e3 * sms / kept,
               "cudnn_us_per_block_sm": dense * 1e3 * sms / (programs * n / 64)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/flux-scan.json", "w"), indent=1)  # the scan kept should the second part fail

# The split variant's own cost (session 22's dropped split rows, scratch copy): whole rows through the
# SPLIT=True kernel with no row split, against the kernel on main, and split rows at 2 programs an SM.
res["variant"] = []
for name in ("flux", "cogvideox"):
    s = SHAPES[name]
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    for keep in (1.0, 0.25, 0.1):
        mask = random_mask(s, keep, "cuda")
        lut = bsa.build_block_lut(mask, s.tokens)
        n_rows = lut.counts.numel()
        calls = {
            "main": lambda: bsa.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5),
            "split variant, no split": lambda: split_mod.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5, split_rows=0),
            "split 2/SM": lambda: split_mod.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5,
                                                                split_rows=split_mod.tail_split_rows(n_rows, 2 * sms)),
        }
        graphs = {}
        for label, call in calls.items():
            split_mod.FORCE_SPLIT = label == "split variant, no split"
            call()
            graphs[label] = cuda_graphed(call)
        split_mod.FORCE_SPLIT = False
        row = {"shape": name, "keep": keep}
        for rnd in range(3):
            for label, g in graphs.items():
                row.setdefault(label, []).append(triton.testing.do_bench(g, warmup=20, rep=300))
        res["variant"].append(row)
        print(json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/flux-scan.json", "w"), indent=1)
