"""Thirty-fifth session: GPU checks of two cases a CPU review could not run.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/session35/gpu_checks.py --out checks.json

- kv_lens on the CPU while q, k, v are on the GPU: does `predict_block_mask` / `sparse_attention` give the
  same result as with kv_lens on the GPU, or a clear error?
- k and v expanded across heads (head stride 0, as a grouped-query caller might pass): does
  `block_sparse_attention` (bf16, and fp8) match its result on contiguous copies?
"""
from __future__ import annotations

import argparse
import json
import traceback

import torch

from sparsediff import predict_block_mask, sparse_attention
from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N, block_sparse_attention


def outcome(fn) -> dict:
    try:
        return {"ok": True, "value": fn()}
    except Exception as error:  # the check records what a user would see
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:500],
                "where": traceback.format_exc().splitlines()[-3][:300]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="checks.json")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    b, h, n, d = 2, 4, 4096, 64
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    lens_gpu = torch.tensor([n, 3000], device=dev, dtype=torch.int32)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    mask_gpu = predict_block_mask(q, k, 0.9, kv_lens=lens_gpu)
    out_gpu = sparse_attention(q, k, v, 0.9, kv_lens=lens_gpu)
    report["predict_kv_lens_on_cpu"] = outcome(
        lambda: int((predict_block_mask(q, k, 0.9, kv_lens=lens_gpu.cpu()) != mask_gpu).sum()))
    report["sparse_attention_kv_lens_on_cpu"] = outcome(
        lambda: float((sparse_attention(q, k, v, 0.9, kv_lens=lens_gpu.cpu()) - out_gpu).abs().max()))

    mask = torch.rand(b, h, -(-n // BLOCK_M), -(-n // BLOCK_N), device=dev) < 0.5
    k1, v1 = k[:, :1].expand(b, h, n, d), v[:, :1].expand(b, h, n, d)
    for fp8 in (False, True):
        ref = block_sparse_attention(q, k1.contiguous(), v1.contiguous(), mask, fp8=fp8)
        report[f"expanded_kv_fp8={fp8}"] = outcome(
            lambda: float((block_sparse_attention(q, k1, v1, mask, fp8=fp8) - ref).abs().max()))
        report[f"expanded_kv_kv_lens_fp8={fp8}"] = outcome(
            lambda: float((block_sparse_attention(q, k1, v1, mask, fp8=fp8, kv_lens=lens_gpu)
                           - block_sparse_attention(q, k1.contiguous(), v1.contiguous(), mask, fp8=fp8,
                                                    kv_lens=lens_gpu)).abs().max()))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
