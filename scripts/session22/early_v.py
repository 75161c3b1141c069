"""Masked steps' V loaded with K (this commit's kernel) against the kernel before it, kernel alone
CUDA-graphed, of cuDNN's graphed dense call, random masks, rounds interleaved; outputs compared.

    git show HEAD~1:sparsediff/kernels/block_sparse_attn.py > scratch/bsa_main.py   # scratch/ holds an __init__.py
    OUT=DIR PYTHONPATH=. python3 scripts/session22/early_v.py
"""
import json, os, statistics
import torch, triton
import sparsediff.kernels.block_sparse_attn as new
import scratch.bsa_main as old
from sparsediff.bench.kernel import SHAPES, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.quantize_fp8 import quantize_fp8

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
res = {}
for name in ("flux", "cogvideox", "wan"):
    s = SHAPES[name]
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    rep = 200
    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=20, rep=rep)
    res[f"{name} cudnn_graph_ms"] = dense
    quantized = quantize_fp8(q, k, v, block_m=128, block_n=64) if name == "flux" else None
    for keep in (1.0, 0.25, 0.1):
        mask = random_mask(s, keep, "cuda")
        lut = new.build_block_lut(mask, s.tokens)
        kept = float(lut.counts.sum()) / (lut.counts.numel() * mask.shape[-1])
        calls = {"main": lambda: old.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5),
                 "early v": lambda: new.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5)}
        if quantized is not None:
            calls["main fp8"] = lambda: old.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5, quantized=quantized)
            calls["early v fp8"] = lambda: new.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5, quantized=quantized)
        outs = {label: call() for label, call in calls.items()}
        graphs = {label: cuda_graphed(call) for label, call in calls.items()}
        row = {"kept": kept}
        for rnd in range(2):
            for label, g in graphs.items():
                row.setdefault(label, []).append(triton.testing.do_bench(g, warmup=20, rep=rep))
        for label in calls:
            row[label + " of cuDNN"] = dense * kept / statistics.median(row[label])
        row["max_abs early v vs main"] = (outs["early v"].float() - outs["main"].float()).abs().max().item()
        if quantized is not None:
            row["max_abs fp8 early v vs main"] = (outs["early v fp8"].float() - outs["main fp8"].float()).abs().max().item()
        res[f"{name} keep {keep}"] = row
        print(name, keep, json.dumps(row), flush=True)
    del q, k, v, quantized
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/early-v.json", "w"), indent=1)
