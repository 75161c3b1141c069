"""Thirty-second session: does carrying the skipped blocks' share of the output from the last dense
step lift the toy model's sparse frames? (CPU, fp32, shipped weights, seed 0, 16 steps.)

    python scripts/session32/toy_residual.py [--prompt ...] [--dense-steps 6] [--source sampled8]
        [--cdf 0.7 ...] [--modes drop carry mask carry-mask] [--out X.json]

At the last dense step, every video self-attention call also computes its sparse output on the
source's mask at that cdf, and keeps r = dense - sparse (per call; both CFG halves). Modes, in the
sparse steps after it:
  drop        sparse output on this step's mask (what the processors do);
  carry       the same plus r;
  mask        the last dense step's mask at every later step (no r: carry-mask's control);
  carry-mask  the last dense step's mask at every later step, plus r (r then matches the mask).
Reports the share of blocks skipped after the dense steps and PSNR / SSIM against the dense clip.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import dense_attention, render, source_masks  # noqa: E402

from sparsediff.attention import METHODS, block_sparse_attention  # noqa: E402
from sparsediff.io import atomic_write_json  # noqa: E402
from sparsediff.metrics import video_psnr, video_ssim  # noqa: E402
from sparsediff.pipelines.prompts import load_prompts  # noqa: E402
from sparsediff.pipelines.toy_shapes import load_pipeline  # noqa: E402

HOLDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "calibration", "prompts",
                       "toy-shapes.holdout.txt")
MODES = ("drop", "carry", "mask", "carry-mask")


def sparse_render(pipe, prompt: str, mode: str, source: str, cdf: float, dense_steps: int):
    """Frames and the share of blocks skipped after the dense steps, in `mode` (module docstring)."""
    frozen, carried = mode in ("mask", "carry-mask"), mode in ("carry", "carry-mask")
    masks: dict[int, torch.Tensor] = {}  # call index -> the last dense step's mask (frozen modes)
    residuals: dict[int, torch.Tensor] = {}  # call index -> r (carried modes)
    calls = {"step": -1, "index": 0}
    skipped: list[float] = []

    def attend(step, q, k, v):
        if step != calls["step"]:
            calls["step"], calls["index"] = step, 0
        index = calls["index"]
        calls["index"] += 1
        if step < dense_steps - 1:
            return None
        if step == dense_steps - 1:
            if frozen or carried:
                (mask,) = source_masks(source, q, k, (cdf,))
                if frozen:
                    masks[index] = mask
                if carried:
                    residuals[index] = dense_attention(q, k, v) - block_sparse_attention(q, k, v, mask)
            return None
        mask = masks[index] if frozen else source_masks(source, q, k, (cdf,))[0]
        skipped.append(1.0 - float(mask.float().mean()))
        out = block_sparse_attention(q, k, v, mask)
        return out + residuals[index] if carried else out

    frames = render(pipe, prompt, attend)
    return frames, sum(skipped) / len(skipped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--dense-steps", type=int, default=6)
    p.add_argument("--source", choices=["oracle", *METHODS], default="sampled8")
    p.add_argument("--cdf", type=float, nargs="+", default=[0.7])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out")
    args = p.parse_args()
    prompts = args.prompt or [spec.prompt for spec in load_prompts(HOLDOUT)]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        dense = render(pipe, prompt, lambda *call: None)
        for cdf in args.cdf:
            for mode in args.modes:
                frames, sparsity = sparse_render(pipe, prompt, mode, args.source, cdf, args.dense_steps)
                rows.append({"prompt": prompt, "cdf": cdf, "mode": mode, "sparsity": sparsity,
                             "psnr": video_psnr(frames, dense), "ssim": video_ssim(frames, dense)})
                r = rows[-1]
                print(f"cdf {cdf} {mode:10s} sparsity {sparsity:.3f}, PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}"
                      f"  ({prompt})", flush=True)
    print("mean over the captions:")
    for cdf in args.cdf:
        for mode in args.modes:
            mine = [r for r in rows if r["cdf"] == cdf and r["mode"] == mode]
            print(f"cdf {cdf} {mode:10s} sparsity {sum(r['sparsity'] for r in mine) / len(mine):.3f}, "
                  f"PSNR {sum(r['psnr'] for r in mine) / len(mine):.2f} dB, "
                  f"SSIM {sum(r['ssim'] for r in mine) / len(mine):.3f}")
    if args.out:
        atomic_write_json(args.out, {"dense_steps": args.dense_steps, "source": args.source, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
