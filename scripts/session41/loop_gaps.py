"""Forty-first session: where the GPU waits during a toy training step once the loop no longer synchronises.
(GPU; run with the toy_shapes package on the path, like loop_syncs.py.)

    PYTHONPATH=/tmp/site:$PWD/pipelines python3 scripts/session41/loop_gaps.py [--size 48] [--out DIR]

Runs the body of `train.train`'s loop (as loop_syncs.py) for 30 warm-up steps, then profiles 10 steps
(torch.profiler, CPU and CUDA, Python stacks) and reads the trace: the GPU's busy time a step (the union
of its kernels' and copies' intervals), its idle time, and the longest idle gaps, each with the kernel
that ends it and the toy-package or torch Python frames that launched that kernel. DIR gets gaps.json
and the gzipped Chrome trace.

Measured (H100, forty-first session): the profiler's Python stacks slow the host about threefold (a
48x48 step spans 113 ms of GPU time under it, against 34.2 ms unprofiled), so its gaps are the
profiled host's, not the training's. The figures that stand are the unprofiled step against the GPU's
busy time: 34.2 against 32.1 ms at 48x48, 65.1 against 61.6 ms at 64x64.
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
import shutil
import time
from pathlib import Path

import torch
from loop_syncs import training_loop_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--out", default="/tmp/gaps")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = training_loop_step(args.size)
    for _ in range(30):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) * 100.0
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, with_stack=True) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.load(open(trace))["traceEvents"]
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()

    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    python = sorted((e for e in events if e.get("cat") == "python_function"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in python]

    def frames_at(ts: float) -> list[str]:
        """Python frames open at host time ts, outermost first, kept if ours or torch's nn/optim/compile."""
        i = bisect.bisect_right(starts, ts)
        open_frames = [e for e in python[max(0, i - 4000):i] if e["ts"] + e.get("dur", 0) >= ts]
        keep = ("toy_shapes", "loop_", "torch/optim", "torch/nn/utils", "torch/_inductor/output_code",
                "torch/nn/modules/transformer", "torch/nn/functional")
        return [e["name"][:120] for e in open_frames if any(k in e["name"] for k in keep)][-4:]

    busy, gaps, end = 0.0, [], device[0]["ts"]
    for e in device:
        if e["ts"] > end:
            launch = launches.get(e["args"].get("correlation"))
            gaps.append({"gap_us": round(e["ts"] - end, 1), "next": e["name"][:100],
                         "launch_ts": launch["ts"] if launch else None})
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    span = end - device[0]["ts"]
    gaps.sort(key=lambda g: -g["gap_us"])
    for g in gaps[:40]:
        ts = g.pop("launch_ts")
        g["launched_from"] = frames_at(ts) if ts is not None else []
    report = {"size": args.size, "step_ms_unprofiled": round(wall_ms, 2),
              "gpu_span_ms_per_step": round(span / 10_000, 2), "gpu_busy_ms_per_step": round(busy / 10_000, 2),
              "gpu_idle_ms_per_step": round((span - busy) / 10_000, 2),
              "gaps_over_50us_per_step": round(sum(g["gap_us"] for g in gaps if g["gap_us"] > 50) / 10_000, 2),
              "longest_gaps": gaps[:40]}
    print(json.dumps({k: v for k, v in report.items() if k != "longest_gaps"}, indent=1))
    for g in gaps[:15]:
        print(g)
    with open(out / "gaps.json", "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
