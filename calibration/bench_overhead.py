"""What calibrating costs against dense generation, on a full-size transformer (GPU).

    python -m sparsediff.calibration.bench_overhead            # Wan2.1-1.3B, 480p 81f, 50 steps

Builds the family's transformer at its published config with random bf16 weights and random inputs
(the configs and inputs of `sparsediff bench e2e`), then drives it for --steps denoising steps
(decreasing timesteps, one forward each, no CFG) twice:
- dense: the stock processors (SDPA, cuDNN first);
- calibrating: `apply(..., controller_cls=CalibrationController)` with the calibrate command's
  default candidate grid, step sampling (calibration/measure.py) and row sampling.
Reports the wall time of each run (CUDA-synchronised), their ratio (target <= 2), the peak GPU
memory of each (torch.cuda.max_memory_allocated, weights included) and its ratio (target <= 1.2),
and the mean time of measured and unmeasured calibrating steps. One warm-up forward of each kind
(cuDNN plans, Triton compilation) runs before timing.

Random weights make attention nearly uniform, so each candidate keeps about cdf of the blocks:
more kernel work per candidate than a trained model's sharper attention, a pessimistic bound.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _forward_steps(model, inputs: dict[str, Any], timesteps) -> list[float]:
    """One forward per timestep; seconds of each (CUDA events)."""
    import torch

    times = []
    with torch.no_grad():
        for t in timesteps:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(**dict(inputs, timestep=t))
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return times


def bench(family: str, steps: int, frames: int | None) -> dict[str, Any]:
    import diffusers
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import sparsediff
    from sparsediff.bench.e2e import CASES
    from sparsediff.calibration.measure import (
        DEFAULT_CDF_GRID,
        DEFAULT_ROW_FRACTION,
        DEFAULT_SIM_GRID,
        DEFAULT_STEP_STRIDE,
        CalibrationController,
        candidate_grid,
        default_lead_steps,
        measured_steps,
    )
    from sparsediff.profile import SparsityProfile

    case = CASES[family]
    n_frames = frames or case.frames
    device = torch.device("cuda")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = getattr(diffusers, case.transformer_class)(**case.config).eval()
            inputs = case.make_inputs(case, n_frames, device)
    finally:
        torch.set_default_dtype(previous)
    t0 = inputs["timestep"]
    # Decreasing timesteps: the controller's hook counts each as the next denoising step.
    timesteps = [t0.float() * (1.0 - i / steps) for i in range(steps)]
    measured = measured_steps(steps, default_lead_steps(steps), DEFAULT_STEP_STRIDE)
    candidates = candidate_grid(DEFAULT_CDF_GRID, DEFAULT_SIM_GRID)

    priority = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]
    with sdpa_kernel(priority, set_priority=True):
        _forward_steps(model, inputs, timesteps[:1])  # warm-up
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        dense = _forward_steps(model, inputs, timesteps)
        dense_s = time.perf_counter() - start
        dense_peak = torch.cuda.max_memory_allocated()

        base = SparsityProfile.uniform(model, dense_steps=0)
        handle = sparsediff.apply(model, base, dense_steps=0, controller_cls=CalibrationController)
        controller = handle.controller
        controller.configure(candidates, measured, DEFAULT_ROW_FRACTION)
        _forward_steps(model, inputs, timesteps[:1])  # warm-up: compiles the Triton kernels (step 0 is measured)
        controller.drain()
        handle.reset()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        calib = _forward_steps(model, inputs, timesteps)
        drained = controller.drain()  # the per-generation host copy belongs to the cost
        calib_s = time.perf_counter() - start
        calib_peak = torch.cuda.max_memory_allocated()
        handle.remove()

    is_measured = [i in set(measured) for i in range(steps)]
    meas = [t for t, m in zip(calib, is_measured) if m]
    other = [t for t, m in zip(calib, is_measured) if not m]
    return {
        "family": family, "model_id": case.model_id, "height": case.height, "width": case.width, "frames": n_frames,
        "steps": steps, "measured_steps": measured, "candidates": [c.as_dict() for c in candidates],
        "row_fraction": DEFAULT_ROW_FRACTION, "layers": len(base.layers),
        "measured_layer_steps": len(drained),
        "dense_s": dense_s, "calibrating_s": calib_s, "time_ratio": calib_s / dense_s,
        "dense_step_mean_s": sum(dense) / len(dense),
        "calibrating_measured_step_mean_s": sum(meas) / len(meas),
        "calibrating_unmeasured_step_mean_s": sum(other) / len(other) if other else None,
        "dense_peak_bytes": dense_peak, "calibrating_peak_bytes": calib_peak,
        "memory_ratio": calib_peak / dense_peak,
        "targets": {"time_ratio": 2.0, "memory_ratio": 1.2},
    }


def main(argv: list[str] | None = None) -> int:
    from sparsediff.bench.e2e import CASES

    parser = argparse.ArgumentParser(prog="python -m sparsediff.calibration.bench_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(CASES), default="wan")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50, as the Wan recipe)")
    parser.add_argument("--frames", type=int, default=None, help="pixel frames (4k+1; default: the real count)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.frames is not None and (args.frames < 1 or (args.frames - 1) % 4):
        parser.error(f"--frames must be 4k+1, got {args.frames}")

    import diffusers
    import torch
    import triton

    from sparsediff.io import atomic_write_json, writable_dir

    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (a full-size transformer in bf16)")
    try:
        writable_dir(args.out)
    except ValueError as e:
        parser.error(str(e))
    result = bench(args.family, args.steps, args.frames)
    result.update(device=torch.cuda.get_device_name(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  versions={"torch": torch.__version__, "triton": triton.__version__,
                            "diffusers": diffusers.__version__, "python": platform.python_version()})
    path = args.out / f"calibration-overhead-{args.family}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(path, result)
    print(json.dumps({k: result[k] for k in ("family", "steps", "dense_s", "calibrating_s", "time_ratio",
                                             "dense_peak_bytes", "calibrating_peak_bytes", "memory_ratio",
                                             "dense_step_mean_s", "calibrating_measured_step_mean_s",
                                             "calibrating_unmeasured_step_mean_s")}, indent=2))
    ok = result["time_ratio"] <= 2.0 and result["memory_ratio"] <= 1.2
    print(f"targets (time <= 2x, memory <= 1.2x): {'met' if ok else 'MISSED'}; wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
