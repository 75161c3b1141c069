"""Thirty-third session: how fast is one toy-model training step under each SDPA backend, and where
does its time go? (GPU; the device has no sparsediff install: run with the toy package on the path.)

    PYTHONPATH=/tmp/site:$PWD/pipelines python3 scripts/session33/train_step_backends.py \
        [--backends default flash cudnn efficient] [--batch-sizes 32 16] [--frames 17 7] [--out X.json]

Each (backend, batch size, frames) cell: a fresh compiled model (TrainConfig defaults otherwise,
foreground weight 4), 25 warm-up steps, then the median of 5 timed groups of 10 steps (CUDA-synchronised).
The step is train.train_step (a generated batch, bf16 autocast, backward, clipped AdamW; not the EMA). ``--profile``:
each backend's CUDA kernels that take the most time in a step (first batch size and frame count).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from toy_shapes.config import DEFAULT_FRAMES, SDPA_BACKENDS, TrainConfig
from toy_shapes.train import _sync, attention_kernel, build_pipeline, optimizer, train_step, training_batch


def make_step(cfg: TrainConfig, dev: torch.device):
    """A closure running one training step (train.train_step, without the EMA) of a fresh compiled model."""
    pipe = build_pipeline(cfg).to(dev)
    params = [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]
    opt = optimizer(cfg, params, dev)
    model = torch.compile(pipe.transformer)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)

    def step() -> None:
        batch = training_batch(cfg, data_gen, noise_gen, dev, windowed=cfg.window_frames is not None)
        train_step(cfg, pipe, model, opt, params, batch, autocast)
    return step


def cell_config(backend: str, batch_size: int, frames: int) -> TrainConfig:
    window = dict(window_frames=frames, window_fraction=1.0) if frames < DEFAULT_FRAMES else {}
    return TrainConfig(steps=1, batch_size=batch_size, foreground_weight=4.0,
                       sdpa_backend=None if backend == "default" else backend, **window)


def time_cell(backend: str, batch_size: int, frames: int, dev: torch.device) -> dict:
    cfg = cell_config(backend, batch_size, frames)
    torch._dynamo.reset()
    with attention_kernel(cfg, dev):
        step = make_step(cfg, dev)
        t0 = time.perf_counter()
        for _ in range(25):
            step()
        _sync(dev)
        warm_s = time.perf_counter() - t0
        groups = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(10):
                step()
            _sync(dev)
            groups.append((time.perf_counter() - t0) / 10)
    ms = statistics.median(groups) * 1000
    return {"backend": backend, "batch_size": batch_size, "frames": frames, "ms_per_step": round(ms, 2),
            "clips_per_s": round(batch_size / ms * 1000, 1), "warmup_s": round(warm_s, 1),
            "groups_ms": [round(g * 1000, 2) for g in groups]}


def kernel_profile(backend: str, batch_size: int, frames: int, dev: torch.device, top: int = 15) -> list[dict]:
    """The ``top`` CUDA kernels by time over 5 steps of the cell's shape, and their total."""
    cfg = cell_config(backend, batch_size, frames)
    torch._dynamo.reset()
    with attention_kernel(cfg, dev):
        step = make_step(cfg, dev)
        for _ in range(25):
            step()
        _sync(dev)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            _sync(dev)
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:120], "ms_per_step": round(e.self_device_time_total / 5 / 1000, 3),
             "share": round(e.self_device_time_total / total, 3), "calls_per_step": e.count // 5}
            for e in events[:top]] + [{"kernel": "TOTAL", "ms_per_step": round(total / 5 / 1000, 3)}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["default", "flash", "cudnn", "efficient"],
                   choices=["default", *SDPA_BACKENDS])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    p.add_argument("--frames", nargs="+", type=int, default=[17])
    p.add_argument("--profile", action="store_true", help="also list each backend's heaviest kernels")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    p.add_argument("--out", default="train_step_backends.json")
    args = p.parse_args()
    dev = torch.device(args.device)
    if args.profile and dev.type != "cuda":
        p.error("--profile lists CUDA kernels: it needs --device cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__, "cells": []}
    for frames in args.frames:
        for batch_size in args.batch_sizes:
            for backend in args.backends:
                try:
                    cell = time_cell(backend, batch_size, frames, dev)
                except Exception as e:  # a backend that refuses these shapes is a result, not a crash
                    cell = {"backend": backend, "batch_size": batch_size, "frames": frames,
                            "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(json.dumps(cell), flush=True)
                result["cells"].append(cell)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)
    if args.profile:
        # The first batch size and frame count given: batch 32, 17 frames by default.
        result["profiles"] = {"batch_size": args.batch_sizes[0], "frames": args.frames[0]}
        for backend in args.backends:
            result["profiles"][backend] = rows = kernel_profile(backend, args.batch_sizes[0], args.frames[0], dev)
            for row in rows:
                print(json.dumps({"profile": backend, **row}), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
