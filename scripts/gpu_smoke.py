"""Compiled-kernel smoke check on a CUDA device: every predictor method and the attention kernel
against their torch references on a small video-like workload. Exits 1 on any mismatch."""
import sys

import torch

from sparsediff.attention import BLOCK_M, BLOCK_N, METHODS, predict_block_mask, sparse_attention
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
from sparsediff.metrics import relative_l1
from sparsediff.workloads import video_workload

failed = False
for dtype in (torch.bfloat16, torch.float16):
    w = video_workload((5, 16, 24), 4, 128, batch=1, text_tokens=70, sinks=4, seed=0, dtype=dtype, device="cuda")
    for method in METHODS:
        mask = predict_block_mask(w.q, w.k, 0.9, 0.2, method=method, dense_tail_tokens=70)
        ref_mask = predict_block_mask(w.q.cpu().float(), w.k.cpu().float(), 0.9, 0.2, method=method, dense_tail_tokens=70)
        agree = (mask.cpu() == ref_mask).float().mean().item()
        out, sparsity = sparse_attention(w.q, w.k, w.v, 0.9, 0.2, method=method, dense_tail_tokens=70, return_sparsity=True)
        ref = block_sparse_attention_reference(w.q.float(), w.k.float(), w.v.float(), mask, block_m=BLOCK_M, block_n=BLOCK_N)
        err = float(relative_l1(out.float(), ref))
        ok = agree > 0.97 and err < 2e-2 and torch.isfinite(out).all().item()
        failed |= not ok
        print(f"{dtype} {method:9s} mask agreement {agree:.3f} sparsity {sparsity:.3f} kernel rel-L1 vs ref {err:.2e} {'ok' if ok else 'FAIL'}")
sys.exit(1 if failed else 0)
