"""Thirty-sixth session: the two prediction-kernel fixes of this session's review, checked on the GPU
(they were found and tested under the Triton interpreter on the CPU).

    python3 scripts/session36/gpu_checks.py --out checks.json

- antidiag's partial-mass kernel (ragged 8x8 sub-blocks averaged over the products they have, keys past
  kv_lens left out) against `block_mass_reference`, on CUDA, at ragged and FLUX-like lengths;
- block_stats' below-threshold flags (a threshold <= 0 trusts every block) against the reference rule.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from sparsediff.kernels.block_select import block_select  # noqa: E402
from sparsediff.kernels.block_select_reference import block_mass_reference  # noqa: E402
from sparsediff.kernels.block_stats import block_stats  # noqa: E402
from sparsediff.kernels.block_stats_reference import block_stats_reference  # noqa: E402


def antidiag_rows() -> list[dict]:
    rows = []
    cases = [((2, 4, 4610, 128), torch.bfloat16, [4610, 3001]), ((1, 24, 4608, 128), torch.bfloat16, None),
             ((1, 2, 300, 32), torch.float32, None), ((2, 2, 1029, 64), torch.float16, [1029, 5])]
    for shape, dtype, lens in cases:
        torch.manual_seed(0)
        b, h, n, d = shape
        q = (torch.randn(*shape, device="cuda") * 2).to(dtype)
        k = (torch.randn(*shape, device="cuda") * 2).to(dtype)
        q[..., 0] = -1.0
        k[..., 0] = 10.0  # a per-query logit offset: must not favour ragged sub-blocks
        kv = torch.tensor(lens, device="cuda") if lens else None
        kw = dict(n_tokens=n, block_m=128, block_n=64, scale=d**-0.5, kv_lens=kv, stride=8, q_tokens=8, k_tokens=8)
        thr = torch.full((h,), 0.9, device="cuda")
        mask, mass = block_select(q, k, thr, **kw)
        ref = block_mass_reference(q.float(), k.float(), **kw)
        rows.append({"shape": list(shape), "dtype": str(dtype), "kv_lens": lens,
                     "max_abs_mass_diff": (mass - ref).abs().max().item(),
                     "finite": bool(torch.isfinite(mass).all().item()), "kept": mask.float().mean().item()})
    return rows


def block_stats_rows() -> list[dict]:
    rows = []
    for n, d in ((4610, 128), (130, 16)):
        torch.manual_seed(0)
        x = torch.randn(2, 4, n, d, device="cuda", dtype=torch.bfloat16)
        x[:, :, -1] = -x[:, :, -2]  # a last block of similarity -1 (n = 130, 4610: two tokens)
        thr = torch.tensor([0.0, 0.3, -0.1, 1.0], device="cuda")
        _, sim, below = block_stats(x, 128, sim_below=thr)
        _, ref_sim = block_stats_reference(x, 128)
        t = thr.view(1, -1, 1)
        ref_below = (~(ref_sim >= t) & ~(t <= 0)) | (t >= 1)
        rows.append({"n": n, "d": d, "max_sim_diff": (sim - ref_sim).abs().max().item(),
                     "below_mismatches": int((below != ref_below).sum().item()),
                     "last_block_sim": sim[0, 0, -1].item(), "below_per_head": below.float().mean((0, 2)).tolist()})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_checks.json")
    args = p.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "antidiag": antidiag_rows(), "block_stats": block_stats_rows()}
    text = json.dumps(result, indent=1)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
