"""Thirty-fourth session: where does a toy-model training step's time go, and do three ways of compiling
it shorten the step? (GPU; the device has no sparsediff install: run with the toy package on the path.)

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor PYTHONPATH=/tmp/site:$PWD/pipelines \
        python3 scripts/session34/train_step_variants.py [--variants stock stack-rope no-persistent coordinate-descent] \
        [--frames 17 7] [--size 64 48] [--kernels-out DIR] [--out X.json]

The thirty-third session's version of this script (`scripts/session33/train_step_backends.py`, commit
42a1124) timed torch's SDPA backends instead: the default is cuDNN's kernel on the H100 already.

Variants (the model and its math are the same in each):
- stock: the training step (train.train_step) under a plain torch.compile, as trained until this session.
- stack-rope: as stock, attention through a processor that builds rotated q and k with torch.stack
  instead of the stock processor's strided writes into an empty tensor (`out[..., 0::2] = ...`).
- no-persistent: inductor's persistent reductions off (train.compiled_for_training: the training's
  compilation since this session).
- coordinate-descent: as stock, inductor's coordinate-descent tuning of its kernels' launch configs.
- cuda-graphs: as no-persistent, the compiled forward and backward replayed as CUDA graphs (inductor's
  `triton.cudagraphs`; added in the thirty-fifth session, when the 7-frame step was found host-bound:
  38.4 ms a step for 20.9 ms of GPU kernels). Thirty-sixth session (H100): 7 frames 31.7 ms against 42.2 ms
  for no-persistent in the same call, 17 frames 71.7 against 71.4 ms.

`--size` (fortieth session): square clip sizes, to time the 48x48 phase that a `--start-size 48` training
begins with.

Each (size, frames, variant) cell: a fresh compiled model (TrainConfig defaults, batch 32, foreground weight 4;
clips shorter than 17 frames are windows), 25 warm-up steps, the median of 5 timed groups of 10 steps
(CUDA-synchronised), then the heaviest CUDA kernels of 5 profiled steps. With ``--kernels-out`` the
generated source of each cell's heaviest inductor kernels is copied there (needs TORCHINDUCTOR_CACHE_DIR).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_wan import _get_qkv_projections
from toy_shapes.config import DEFAULT_FRAMES, DEFAULT_HEIGHT, TrainConfig
from toy_shapes.train import (_sync, build_pipeline, compiled_for_training, optimizer, train_step, trained_parameters,
                              training_batch)

VARIANTS = ("stock", "stack-rope", "no-persistent", "coordinate-descent", "cuda-graphs")


def rotate(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """The stock processor's rotary embedding, its output built by one stack instead of two strided writes."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


class StackRopeWanAttnProcessor:
    """diffusers' WanAttnProcessor for text-to-video (no image context), rotation by `rotate`."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def inductor_settings(variant: str) -> contextlib.AbstractContextManager:
    import torch._inductor.config as inductor

    if variant == "coordinate-descent":
        return inductor.patch({"coordinate_descent_tuning": True})
    if variant == "cuda-graphs":
        return inductor.patch({"triton.cudagraphs": True})
    return contextlib.nullcontext()


def make_step(cfg: TrainConfig, variant: str, dev: torch.device):
    """A closure running one training step (train.train_step, without the EMA) of a fresh compiled model."""
    pipe = build_pipeline(cfg).to(dev)
    if variant == "stack-rope":
        pipe.transformer.set_attn_processor(StackRopeWanAttnProcessor())
    params = trained_parameters(pipe)
    opt = optimizer(cfg, pipe, dev)
    model = (compiled_for_training(pipe.transformer) if variant in ("no-persistent", "cuda-graphs")
             else torch.compile(pipe.transformer))
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    data_gen, noise_gen = torch.Generator().manual_seed(0), torch.Generator(device=dev).manual_seed(1)

    def step() -> None:
        batch = training_batch(cfg, data_gen, noise_gen, dev, windowed=cfg.window_frames is not None)
        train_step(cfg, pipe, model, opt, params, batch, autocast)
    return step


def cell_config(frames: int, size: int) -> TrainConfig:
    window = dict(window_frames=frames, window_fraction=1.0) if frames < DEFAULT_FRAMES else {}
    return TrainConfig(steps=1, batch_size=32, foreground_weight=4.0, height=size, width=size, **window)


def heaviest_kernels(prof: torch.profiler.profile, steps: int, top: int = 12) -> list[dict]:
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    events.sort(key=lambda e: -e.self_device_time_total)
    return [{"kernel": e.key[:160], "ms_per_step": round(e.self_device_time_total / steps / 1000, 3),
             "share": round(e.self_device_time_total / total, 3), "calls_per_step": e.count // steps}
            for e in events[:top]] + [{"kernel": "TOTAL", "ms_per_step": round(total / steps / 1000, 3)}]


def copy_kernel_sources(names: list[str], dest: Path) -> list[str]:
    """The generated Triton source of each named inductor kernel, from TORCHINDUCTOR_CACHE_DIR into ``dest``."""
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    found = []
    for path in cache.rglob("*.py"):
        text = path.read_text(errors="replace")
        for name in names:
            if re.search(rf"def {re.escape(name)}\(", text):
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{name}.py").write_text(text)
                found.append(name)
    return found


def run_cell(variant: str, frames: int, size: int, dev: torch.device, kernels_out: Path | None) -> dict:
    cfg = cell_config(frames, size)
    torch._dynamo.reset()
    with inductor_settings(variant):
        step = make_step(cfg, variant, dev)
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
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            _sync(dev)
    ms = statistics.median(groups) * 1000
    cell = {"variant": variant, "frames": frames, "size": size, "ms_per_step": round(ms, 2), "clips_per_s": round(32 / ms * 1000, 1),
            "warmup_s": round(warm_s, 1), "groups_ms": [round(g * 1000, 2) for g in groups],
            "kernels": heaviest_kernels(prof, 5)}
    if kernels_out is not None:
        generated = [k["kernel"] for k in cell["kernels"][:6] if k["kernel"].startswith("triton_")]
        cell["sources_copied"] = copy_kernel_sources(generated, kernels_out / f"{variant}-{frames}f-{size}px")
    return cell


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--frames", nargs="+", type=int, default=[DEFAULT_FRAMES])
    p.add_argument("--size", nargs="+", type=int, default=[DEFAULT_HEIGHT], help="square clip sizes in px")
    p.add_argument("--kernels-out", type=Path, help="copy the heaviest generated kernels' source here")
    p.add_argument("--out", default="train_step_variants.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("this script times CUDA kernels: it needs a GPU")
    if args.kernels_out is not None and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        p.error("--kernels-out reads inductor's cache: set TORCHINDUCTOR_CACHE_DIR")
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "cells": []}
    for size in args.size:
        for frames in args.frames:
            for variant in args.variants:
                try:
                    cell = run_cell(variant, frames, size, dev, args.kernels_out)
                except Exception as e:  # a variant that fails is a result, not a crash
                    cell = {"variant": variant, "frames": frames, "size": size, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                print(json.dumps(cell), flush=True)
                result["cells"].append(cell)
                with open(args.out, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
