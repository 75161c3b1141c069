"""Twenty-seventh session: does a cdf threshold that changes from step to step let the toy model
skip more attention blocks at the same frame quality than one threshold for every step? (CPU, fp32,
shipped weights, seed 0, 16 steps.)

    python scripts/session27/toy_step_schedule.py [--prompt ...] [--dense-steps 6] [--source oracle|sampled8|...]
        [--weights DIR]
        --schedule uniform:0.6 ramp:0.95:0.3 steps:0.9,0.9,0.8,... single:8:0.5 ...

Renders each caption dense, then once per schedule with every video self-attention call after the
dense steps computed on the blocks of `--source` (the oracle: top cdf of the true block mass; or a
predictor at sim 0) at that step's cdf. A schedule gives one cdf per sparse step:
  uniform:C        C at every step after the dense ones;
  ramp:HI:LO       linear in the step index from HI at the first sparse step to LO at the last;
  steps:C1,C2,...  one value per sparse step (1 leaves that step dense);
  single:S:C       C at step S only, every other step dense (a step's sensitivity alone).
Reports the share of the self-attention blocks skipped after the dense steps (the quantity #9's
target counts; a dense step after them counts as 0), per-step shares, and PSNR / SSIM against the
dense clip. Default captions: the toy model's four held-out validation captions.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import render, source_masks  # noqa: E402

from sparsediff.attention import METHODS, block_sparse_attention  # noqa: E402
from sparsediff.io import atomic_write_json  # noqa: E402
from sparsediff.metrics import video_psnr, video_ssim  # noqa: E402
from sparsediff.pipelines.prompts import load_prompts  # noqa: E402
from sparsediff.pipelines.toy_shapes import DEFAULT_STEPS, ToyShapesPipeline, load_pipeline  # noqa: E402

HOLDOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "calibration", "prompts",
                       "toy-shapes.holdout.txt")


def schedule_cdfs(spec: str, dense_steps: int, steps: int = DEFAULT_STEPS) -> list[float]:
    """The cdf of every step (1.0: dense) from a schedule spec (module docstring)."""
    kind, _, rest = spec.partition(":")
    values = [float(x) for x in rest.replace(":", ",").split(",")] if rest else []
    sparse = steps - dense_steps
    if kind == "uniform" and len(values) == 1:
        tail = values * sparse
    elif kind == "ramp" and len(values) == 2:
        hi, lo = values
        tail = [hi + (lo - hi) * i / max(sparse - 1, 1) for i in range(sparse)]
    elif kind == "steps" and len(values) == sparse:
        tail = values
    elif kind == "single" and len(values) == 2 and dense_steps <= int(values[0]) < steps:
        tail = [values[1] if dense_steps + i == int(values[0]) else 1.0 for i in range(sparse)]
    else:
        raise ValueError(f"bad schedule {spec!r} (with {sparse} sparse steps): see the module docstring")
    if not all(0.0 < c <= 1.0 for c in tail):
        raise ValueError(f"schedule {spec!r}: every cdf must lie in (0, 1]")
    return [1.0] * dense_steps + tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--dense-steps", type=int, default=6)
    p.add_argument("--source", choices=["oracle", *METHODS], default="oracle")
    p.add_argument("--schedule", nargs="+", required=True)
    p.add_argument("--cfg-mask", choices=["own", "shared"], default="own",
                   help="own: each CFG half its own mask; shared: one mask for both, the top cdf of their mean "
                        "block mass (oracle only)")
    p.add_argument("--out", help="also write the rows as JSON here")
    p.add_argument("--weights", help="a toy-shapes weights folder (save_folder layout) instead of the shipped one; "
                   "its dense clips are also compared with the shipped weights' dense clips")
    args = p.parse_args()
    prompts = args.prompt or [spec.prompt for spec in load_prompts(HOLDOUT)]
    schedules = {spec: schedule_cdfs(spec, args.dense_steps) for spec in args.schedule}
    pipe = ToyShapesPipeline.from_folder(args.weights) if args.weights else load_pipeline()
    shipped = load_pipeline() if args.weights else None
    for model in (pipe, shipped):
        if model is not None:
            model.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        dense = render(pipe, prompt, lambda *call: None)
        if shipped is not None:
            reference = render(shipped, prompt, lambda *call: None)
            rows.append({"prompt": prompt, "schedule": "dense vs shipped dense", "psnr": video_psnr(dense, reference),
                         "ssim": video_ssim(dense, reference)})
            print(f"dense vs the shipped weights' dense: PSNR {rows[-1]['psnr']:.2f} dB, SSIM {rows[-1]['ssim']:.3f}  "
                  f"({prompt})", flush=True)
        for spec, cdfs in schedules.items():
            skipped: dict[int, list[float]] = {}

            def masked(step, q, k, v):
                if step < args.dense_steps:
                    return None
                calls = skipped.setdefault(step, [])
                if cdfs[step] >= 1.0:
                    calls.append(0.0)
                    return None
                (mask,) = source_masks(args.source, q, k, (cdfs[step],), shared=args.cfg_mask == "shared")
                calls.append(1.0 - float(mask.float().mean()))
                return block_sparse_attention(q, k, v, mask)

            frames = render(pipe, prompt, masked)
            per_step = {step: sum(s) / len(s) for step, s in sorted(skipped.items())}
            row = {"prompt": prompt, "schedule": spec, "cdfs": cdfs, "per_step_sparsity": per_step,
                   "sparsity": sum(per_step.values()) / len(per_step),
                   "psnr": video_psnr(frames, dense), "ssim": video_ssim(frames, dense)}
            rows.append(row)
            print(f"{spec:24s} sparsity {row['sparsity']:.3f}, PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}; "
                  "per step " + " ".join(f"{s:.2f}" for s in per_step.values()) + f"  ({prompt})", flush=True)
    print("mean over the captions:")
    for spec in schedules:
        mine = [r for r in rows if r["schedule"] == spec]
        print(f"{spec:24s} sparsity {sum(r['sparsity'] for r in mine) / len(mine):.3f}, "
              f"PSNR {sum(r['psnr'] for r in mine) / len(mine):.2f} dB, SSIM {sum(r['ssim'] for r in mine) / len(mine):.3f}")
    if args.out:
        atomic_write_json(args.out, {"dense_steps": args.dense_steps, "source": args.source, "cfg_mask": args.cfg_mask,
                                     "weights": args.weights, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
