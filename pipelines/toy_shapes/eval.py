"""Measure what the toy shapes model learned on the 20 held-out captions (and 20 seen ones).

    python -m sparsediff.pipelines.toy_shapes.eval --out report.json [--weights DIR] [--steps 16 24]

Each held-out caption names one (colour, shape, motion) combination training never showed.
The rendered clip passes "colour" when that colour is present and dominant, and "motion" when
the colour's pixel track does what the caption says (``metrics.py``: translations, bounces,
growing/shrinking; for "rotates" only staying in place is measured). The same checks on the
generator's own clips of those captions are reported as the reference (should be 1.0).
The "seen" run scores 20 captions training does show (same shapes, motions and backgrounds,
other colours), which separates what was not learned from what does not generalise.
``--profile P`` renders sparse with that profile (``sparsediff.apply``): does sparse attention keep what
the model learned? Each run then records the fraction of blocks it skipped after the dense steps.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH
from .data import DIRECTIONS, batch_from_objects, caption_for, eval_clips, render
from .files import check_writable, write_atomically, write_json_atomically
from .metrics import check_clip
from .pipeline import ToyShapesPipeline


def _rates(results: list[dict]) -> dict:
    n = len(results)
    return {
        "colour": sum(r["colour_ok"] for r in results) / n,
        "motion": sum(r["motion_ok"] for r in results) / n,
        "translation_motion": (
            sum(r["motion_ok"] for r in results if r["objects"][0]["motion"] in DIRECTIONS)
            / max(1, sum(r["objects"][0]["motion"] in DIRECTIONS for r in results))
        ),
    }


def reference_rates(seed: int = 0, split: str = "held-out") -> dict:
    """The checks applied to the generator's own clips of the evaluation captions."""
    clips = eval_clips(split)
    batch = batch_from_objects(clips, torch.Generator().manual_seed(seed),
                               num_frames=DEFAULT_FRAMES, height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH)
    frames = render(batch).permute(0, 1, 3, 4, 2)
    return _rates([check_clip(frames[i], objs) for i, (objs, _) in enumerate(clips)])


def evaluate(pipe: ToyShapesPipeline, *, num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, seed: int = 0, batch_size: int = 20,
             split: str = "held-out") -> tuple[dict, np.ndarray]:
    """Render one split's captions (clip i from seed + i) and score them: (report, frames (20, F, H, W, 3))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    clips = eval_clips(split)
    captions = [caption_for(objs, bg) for objs, bg in clips]
    device = pipe._execution_device
    frames = []
    for lo in range(0, len(captions), batch_size):
        gens = [torch.Generator(device=device).manual_seed(seed + i) for i in range(lo, min(lo + batch_size, len(captions)))]
        frames.append(pipe(prompt=captions[lo:lo + batch_size], num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, generator=gens, output_type="np").frames)
    frames = np.concatenate(frames)
    results = [dict(caption=cap, **check_clip(frames[i], objs)) for i, (cap, (objs, _)) in enumerate(zip(captions, clips))]
    report = {"split": split, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
              "pass_rate": _rates(results), "clips": results}
    return report, frames


def time_render(pipe: ToyShapesPipeline, *, num_inference_steps: int = DEFAULT_STEPS, repeats: int = 3) -> float:
    """Median wall seconds of one default-size clip (after one warm-up render)."""
    caption = "a red circle moves left on a black background"
    times = []
    for i in range(repeats + 1):
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe(prompt=caption, num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(i))
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def save_grid(frames: np.ndarray, path: str | Path, every: int = 4) -> None:
    """Write a PNG (atomically): one row per clip, every ``every``-th frame side by side."""
    from PIL import Image

    rows = [np.concatenate(list(clip[::every]), axis=1) for clip in frames]
    write_atomically(path, Image.fromarray((np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)).save)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="report JSON path")
    p.add_argument("--weights", help="weights folder (default: the shipped weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--steps", type=int, nargs="+", default=[DEFAULT_STEPS], help="step counts to evaluate")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--png", help="also write the default-step clips as a PNG grid here")
    p.add_argument("--time-repeats", type=int, default=3, help="renders timed for the single-clip time (0: skip)")
    p.add_argument("--profile", help="render sparse with this sparsity profile (JSON; default: dense attention)")
    args = p.parse_args(argv)

    from . import WEIGHTS_DIR

    # Checked before the renders (half an hour on a CPU): a bad --out was found only when writing the report.
    if min(args.steps) < 1:
        p.error(f"--steps must be >= 1, got {min(args.steps)}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.guidance):
        p.error(f"--guidance must be a finite number, got {args.guidance}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    try:
        for flag, path in (("--out", args.out), ("--png", args.png)):
            if path:
                check_writable(Path(path).parent, flag)
        pipe = ToyShapesPipeline.from_folder(args.weights or WEIGHTS_DIR, device=args.device, torch_dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    handle = None
    if args.profile:
        # Imported here: the device's training script imports this package without sparsediff installed.
        import sparsediff
        from sparsediff.profile import SparsityProfile

        try:
            handle = sparsediff.apply(pipe, SparsityProfile.load(args.profile))
        except (ValueError, OSError) as e:
            p.error(f"--profile: {e}")
    pipe.set_progress_bar_config(disable=True)
    report = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "profile": args.profile,
              "reference_pass_rate": reference_rates(), "reference_pass_rate_seen": reference_rates(split="seen"),
              "runs": []}
    # Held-out captions at every step count; their seen twins at the default one.
    for i, (steps, split) in enumerate([(s, "held-out") for s in args.steps] + [(args.steps[0], "seen")]):
        if handle is not None:
            handle.reset()
        run, frames = evaluate(pipe, num_inference_steps=steps, guidance_scale=args.guidance, seed=args.seed,
                               batch_size=args.batch_size, split=split)
        if handle is not None:
            stats = handle.stats.as_dict()  # JSON-ready: a mean of no sparse call is None, not NaN
            run["sparsity_after_dense_steps"] = stats["mean_sparsity"]
            run["dense_fallbacks"] = stats["dense_fallbacks"]
        report["runs"].append(run)
        skipped = "" if handle is None else f", sparsity after the dense steps {run['sparsity_after_dense_steps']}"
        print(f"[toy_shapes eval] {split} steps={steps} pass rates {run['pass_rate']}{skipped}", flush=True)
        if i == 0 and args.png:
            save_grid(frames, args.png)
    if args.time_repeats > 0:
        report["single_clip_render_seconds"] = round(time_render(pipe, repeats=args.time_repeats), 3)
        print(f"[toy_shapes eval] one clip at {DEFAULT_STEPS} steps: {report['single_clip_render_seconds']} s", flush=True)
    write_json_atomically(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
