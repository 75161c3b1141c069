"""Thirty-seventh session: the antidiag fix for ragged last query sub-rows (found and tested under the
Triton interpreter on the CPU) checked on the GPU.

    python3 scripts/session37/gpu_checks.py --out checks.json

For n = 2 * 128 + r and 36 * 128 + r (r = 1..7), bf16 / fp16 / fp32, with and without kv_lens: the
partial-mass kernel against `block_mass_reference`, and the mass the last query block gives the last
valid key block (0 before the fix when it was a single sub-row of <= 8 - r tokens).
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


def rows() -> list[dict]:
    out = []
    for blocks in (2, 36):
        for r in range(1, 8):
            n = blocks * 128 + r
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for kv in (None, [n, 64 + 8 - r]):
                    torch.manual_seed(r)
                    d = 64
                    pos = torch.arange(n, device="cuda").float()[:, None]
                    freq = 1.0 / (4.0 ** (torch.arange(d // 2, device="cuda").float() / (d // 2)) * 3.0)
                    pe = 2.2 * torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)
                    q = (pe + 0.3 * torch.randn(2, 2, n, d, device="cuda")).to(dtype)
                    k = (pe + 0.3 * torch.randn(2, 2, n, d, device="cuda")).to(dtype)
                    kv_lens = torch.tensor(kv, device="cuda") if kv else None
                    kw = dict(n_tokens=n, block_m=128, block_n=64, scale=d**-0.5, kv_lens=kv_lens,
                              stride=8, q_tokens=8, k_tokens=8)
                    mask, mass = block_select(q, k, torch.full((2,), 0.9, device="cuda"), **kw)
                    ref = block_mass_reference(q.float(), k.float(), **kw)
                    last_valid_kb = [-(-(kv[b] if kv else n) // 64) - 1 for b in range(2)]
                    last_mass = [mass[b, :, -1, kb].min().item() for b, kb in enumerate(last_valid_kb)]
                    out.append({"n": n, "dtype": str(dtype).replace("torch.", ""), "kv_lens": kv,
                                "max_abs_mass_diff": (mass - ref).abs().max().item(),
                                "finite": bool(torch.isfinite(mass).all().item()),
                                "last_block_mass_min": min(last_mass),
                                "last_block_kept": bool(all(mask[b, :, -1, kb].all().item()
                                                            for b, kb in enumerate(last_valid_kb)))})
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_checks.json")
    args = p.parse_args()
    checks = rows()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cases": len(checks), "worst_mass_diff": max(c["max_abs_mass_diff"] for c in checks),
              "zero_last_block_mass": sum(c["last_block_mass_min"] <= 0 for c in checks),
              "last_block_not_kept_at_cdf_0.9": sum(not c["last_block_kept"] for c in checks), "antidiag_ragged": checks}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "antidiag_ragged"}, indent=1))


if __name__ == "__main__":
    main()
