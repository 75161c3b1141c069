"""Forty-first session: where a toy training step makes the host wait for the GPU. (GPU; the device has no
sparsediff install: run with a toy_shapes package on the path.)

    PYTHONPATH=/tmp/site:$PWD/pipelines python3 scripts/session41/loop_syncs.py [--size 48] [--out X.json]

Runs the body of `train.train`'s loop (batch, step, EMA, loss sum) for 5 warm-up steps, then 3 steps under
`torch.cuda.set_sync_debug_mode("warn")`, and lists each synchronising call with the source line of
the toy package (or this script) that made it. Each sync drains the GPU's queue: the host then prepares
and launches the next work while the GPU waits.
"""
from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings
from typing import Callable

import torch
from toy_shapes.config import TrainConfig
from toy_shapes.train import (build_pipeline, compiled_for_training, optimizer, train_step, trained_parameters,
                              training_batch)


def training_loop_step(size: int) -> Callable[[], None]:
    """One iteration of `train.train`'s loop body (batch, step, EMA, loss sum) at size x size clips, as a
    closure over a fresh compiled model, its optimiser and generators (TrainConfig defaults, batch 32,
    foreground weight 4)."""
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = TrainConfig(height=size, width=size, foreground_weight=4.0, compile=True)
    pipe = build_pipeline(cfg).to(dev)
    params = trained_parameters(pipe)
    ema = [p.detach().clone() for p in params]
    opt = optimizer(cfg, pipe, dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    model = compiled_for_training(pipe.transformer)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)
    run_loss = torch.zeros((), device=dev)

    def step() -> None:
        loss = train_step(cfg, pipe, model, opt, params, training_batch(cfg, data_gen, noise_gen, dev), autocast)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 0.001)
        run_loss.add_(loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--out")
    args = parser.parse_args()
    step = training_loop_step(args.size)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "toy_shapes" in f.filename or "loop_syncs" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.line}" for f in reversed(frames[-3:]))
        sites[f"{str(message)[:60]} @ {where}"] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    for _ in range(3):
        step()
    torch.cuda.set_sync_debug_mode("default")
    report = {"size": args.size, "syncs_in_3_steps": sum(sites.values()), "sites": dict(sites)}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
