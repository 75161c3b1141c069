"""Train the toy shapes text-to-video model (rectified flow, clips rendered on the fly).

    python -m sparsediff.pipelines.toy_shapes.train --out DIR --minutes 8 --seed 0 --compile true

Every TrainConfig field is a flag (``--batch-size 32``, ``--steps 4000``...); ``--config FILE``
reads a saved TrainConfig JSON first. With ``--minutes`` the step count is fixed after 30
steps from the measured speed (and logged: rerun with ``--steps`` to repeat a run exactly).
Writes DIR/{transformer,text_encoder,tokenizer,scheduler}/ (fp16 safetensors weights, EMA),
DIR/train_config.json and DIR/train_log.json (loss curve, held-out loss, timing).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

from .config import OPTIMIZERS, TrainConfig
from .data import (batch_from_objects, caption_words, eval_clips, render, render_with_coverage, sample_batch,
                   to_device)
from .files import check_writable, json_writer
from .muon import Muon
from .pipeline import PATCH, ToyShapesPipeline, frames_to_latents
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer

_MEASURE_FROM, _MEASURE_TO = 10, 30  # steps timed to fix the step count of a --minutes run


def in_first_share(step: int, fraction: float, total: int) -> bool:
    """Whether step ``step`` (0-based) is among the first ``fraction`` of ``total`` steps, a curriculum's
    share: the first ceil(fraction * total). The product is rounded first: unrounded, float error added a
    step (0.28 * 25 = 7.000000000000001 gave 8 steps, 0.55 * 100 gave 56)."""
    return step < round(fraction * total, 9)


def build_pipeline(cfg: TrainConfig) -> ToyShapesPipeline:
    """A freshly initialised (untrained) pipeline of ``cfg``'s shape, on the CPU, fp32."""
    tokenizer = ToyTokenizer(caption_words(), cfg.max_length)
    transformer = WanTransformer3DModel(**cfg.transformer_config())
    text_encoder = ToyTextEncoder(**cfg.text_encoder_config(tokenizer.vocab_size))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.flow_shift)
    return ToyShapesPipeline(transformer, text_encoder, tokenizer, scheduler)


def _load_weights(pipe: ToyShapesPipeline, folder: Path) -> None:
    """Copy a saved folder's transformer and text encoder weights into ``pipe`` (shapes must match)."""
    for name in ("transformer", "text_encoder"):
        path = folder / name / SAFETENSORS_WEIGHTS_NAME
        if not path.is_file():
            raise ValueError(f"init_from: {path} does not exist")
        getattr(pipe, name).load_state_dict(load_file(path), strict=True)


def sample_t(n: int, cfg: TrainConfig, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Logit-normal t in (0, 1), shifted towards noise like the sampling schedule."""
    t = torch.sigmoid(torch.randn(n, generator=generator, device=device) * cfg.t_std + cfg.t_mean)
    return cfg.flow_shift * t / (1.0 + (cfg.flow_shift - 1.0) * t)


def token_weights(coverage: torch.Tensor, foreground_weight: float) -> torch.Tensor:
    """Loss weight per token, (B, 1, F, H/4, W/4): 1 + ``foreground_weight`` times the largest object
    coverage in the token's patch, from ``render_with_coverage``'s (B, F, H, W)."""
    B, Fr, H, W = coverage.shape
    covered = F.max_pool2d(coverage.reshape(B * Fr, 1, H, W), PATCH).reshape(B, Fr, H // PATCH, W // PATCH)
    return (1.0 + foreground_weight * covered)[:, None]


def training_batch(cfg: TrainConfig, data_gen: torch.Generator, noise_gen: torch.Generator, device: torch.device,
                   *, windowed: bool = False, single_object: bool = False, at_start_size: bool = False
                   ) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One training batch of ``cfg.batch_size`` generated clips: latents x0, captions (dropped to ""
    at ``cfg.caption_dropout``), t, noise and the token weights (None without a foreground weight).
    ``windowed``: the clips cut to a random ``cfg.window_frames``-frame window; ``single_object``: one
    object a clip; ``at_start_size``: ``cfg.start_size`` square clips (the curricula)."""
    height, width = (cfg.start_size, cfg.start_size) if at_start_size else (cfg.height, cfg.width)
    batch = sample_batch(cfg.batch_size, data_gen, split="train", max_objects=1 if single_object else cfg.max_objects,
                         num_frames=cfg.num_frames, height=height, width=width)
    if windowed:
        start_frame = int(torch.randint(0, cfg.num_frames - cfg.window_frames + 1, (1,), generator=data_gen))
        batch = batch.window(start_frame, cfg.window_frames)
    frames, coverage = render_with_coverage(batch, device)
    x0 = frames_to_latents(frames)
    weights = token_weights(coverage, cfg.foreground_weight) if cfg.foreground_weight else None
    drop = torch.rand(cfg.batch_size, generator=data_gen) < cfg.caption_dropout
    captions = ["" if d else c for d, c in zip(drop.tolist(), batch.captions)]
    t = sample_t(cfg.batch_size, cfg, noise_gen, device)
    noise = torch.randn(x0.shape, generator=noise_gen, device=device)
    return x0, captions, t, noise, weights


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The rectified-flow point ``x_t = (1 - t) x0 + t noise`` of (B, C, F, H, W) latents, t of shape (B,)."""
    tb = t.view(-1, 1, 1, 1, 1)
    return (1.0 - tb) * x0 + tb * noise


def predict_velocity(pipe: ToyShapesPipeline, xt: torch.Tensor, t: torch.Tensor, captions: list[str],
                     transformer: Callable[..., tuple] | None = None) -> torch.Tensor:
    """The model's velocity at ``xt``; ``transformer`` runs in place of ``pipe.transformer`` (a compiled
    wrapper of it)."""
    ids, mask = pipe.tokenizer(captions)
    emb = pipe.text_encoder(to_device(ids, xt.device), to_device(mask, xt.device))
    model = pipe.transformer if transformer is None else transformer
    return model(hidden_states=xt, timestep=t * 1000.0, encoder_hidden_states=emb, return_dict=False)[0]


def velocity_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of a predicted velocity; ``weights`` (``token_weights``) weighs each token's
    error, the sum normalised by the weights' sum."""
    if weights is None:
        return F.mse_loss(pred.float(), target)
    error = (pred.float() - target).square().mean(dim=1, keepdim=True)
    return (error * weights).mean() / weights.mean()


def flow_loss(pipe: ToyShapesPipeline, x0: torch.Tensor, captions: list[str], t: torch.Tensor,
              noise: torch.Tensor, transformer: Callable[..., tuple] | None = None,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """``velocity_error`` of the predicted velocity against ``noise - x0`` at ``noised(x0, noise, t)``."""
    pred = predict_velocity(pipe, noised(x0, noise, t), t, captions, transformer)
    return velocity_error(pred, noise - x0, weights)


class Optimizers:
    """Several optimisers over disjoint parameters, stepped as one: ``param_groups`` lists all of their groups
    (the learning-rate schedule sets each group's "lr")."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def trained_parameters(pipe: ToyShapesPipeline) -> list[torch.nn.Parameter]:
    """Every parameter a training updates: the transformer's, then the text encoder's."""
    return [p for m in (pipe.transformer, pipe.text_encoder) for p in m.parameters()]


def optimizer(cfg: TrainConfig, pipe: ToyShapesPipeline, device: torch.device) -> torch.optim.Optimizer | Optimizers:
    """``cfg.optimizer``'s optimiser over ``trained_parameters(pipe)``. "muon": Muon over the weight matrices
    of the transformer blocks (attention projections, feed-forward), AdamW over the rest (embeddings, patch
    and output projections, norms, biases, modulation tables, the text encoder), as Muon is meant to be used.
    Muon's update RMS is matched to AdamW's (``muon.Muon``), so ``cfg.lr`` and ``cfg.weight_decay`` serve both."""
    params = trained_parameters(pipe)

    def adamw(group: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(group, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay,
                                 fused=device.type == "cuda")

    if cfg.optimizer == "adamw":
        return adamw(params)
    matrices = [p for p in pipe.transformer.blocks.parameters() if p.ndim == 2]
    in_muon = {id(p) for p in matrices}
    return Optimizers(Muon(matrices, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      adamw([p for p in params if id(p) not in in_muon]))


def train_step(cfg: TrainConfig, pipe: ToyShapesPipeline, transformer: Callable[..., tuple],
               opt: torch.optim.Optimizer | Optimizers, params: list[torch.nn.Parameter], batch: tuple,
               autocast: torch.autocast) -> torch.Tensor:
    """One optimisation step on `training_batch`'s `batch`: the flow loss under `autocast` through
    `transformer` (pipe's, or a compiled wrapper of it), backward, clipped step; returns the loss."""
    x0, captions, t, noise, weights = batch
    with autocast:
        loss = flow_loss(pipe, x0, captions, t, noise, transformer, weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return loss


def _lr(cfg: TrainConfig, step: int, total: int) -> float:
    warm = min(cfg.warmup_steps, max(1, total // 10))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled_for_training(transformer: WanTransformer3DModel) -> Callable[..., tuple]:
    """``torch.compile`` of the transformer for the training step, inductor's persistent reductions off:
    with them, the kernel fusing each layer's q/k RMS norm with the rotary embedding took 2.8 ms a call
    at batch 32, 17 frames (22% of an H100 step); without, 0.29 ms, and the step 83.6 -> 69.4 ms.
    Static shapes: a curriculum's switch to whole clips or to the full size compiles a second graph for
    them instead of one with symbolic sizes for both."""
    return torch.compile(transformer, dynamic=False, options={"triton.persistent_reductions": False})


def train(cfg: TrainConfig, out: str | Path, device: str | torch.device | None = None) -> dict:
    """Run one training and write the model and logs to ``out``; returns the log dict. An ``out`` that
    cannot be written is refused (ValueError) before the training, not after it."""
    out = Path(out)
    check_writable(out, "out")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pipe = build_pipeline(cfg)
    if cfg.init_from is not None:
        _load_weights(pipe, Path(cfg.init_from))
    pipe.to(dev)
    modules = [pipe.transformer, pipe.text_encoder]
    params = trained_parameters(pipe)
    ema = [p.detach().clone() for p in params]
    opt = optimizer(cfg, pipe, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    # Only the training forward is compiled; the held-out loss runs eager (no second graph to build).
    train_transformer = compiled_for_training(pipe.transformer) if cfg.compile else pipe.transformer
    data_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 1)
    geometry = dict(num_frames=cfg.num_frames, height=cfg.height, width=cfg.width)

    # Held-out loss: the 20 evaluation captions at fixed t and noise, never trained on.
    val_gen = torch.Generator().manual_seed(10_000)
    val_clips = eval_clips()
    val_batch = batch_from_objects(val_clips, val_gen, **geometry)
    val_x0 = frames_to_latents(render(val_batch, dev))
    val_t = torch.linspace(0.05, 0.95, len(val_clips), device=dev)
    val_noise = torch.randn(val_x0.shape, generator=torch.Generator().manual_seed(10_001)).to(dev)
    val_captions = val_batch.captions

    def val_loss() -> float:
        for m in modules:
            m.eval()
        with torch.no_grad(), autocast:
            v = flow_loss(pipe, val_x0, val_captions, val_t, val_noise).item()
        for m in modules:
            m.train()
        return v

    total = cfg.steps if cfg.steps is not None else 10**9
    budget = None if cfg.steps is not None else cfg.minutes * 60.0
    hard_stop = cfg.max_minutes * 60.0 if cfg.steps is not None and cfg.max_minutes is not None else None
    stopped_early = False
    history, run_loss, run_n = [], torch.zeros((), device=dev), 0
    start = time.perf_counter()
    step = 0
    for m in modules:
        m.train()
    while step < total:
        lr = _lr(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        # A curriculum without its setting has fraction 0 (TrainConfig checks they go together).
        batch = training_batch(cfg, data_gen, noise_gen, dev,
                               windowed=in_first_share(step, cfg.window_fraction, total),
                               single_object=in_first_share(step, cfg.single_object_fraction, total),
                               at_start_size=in_first_share(step, cfg.start_size_fraction, total))
        loss = train_step(cfg, pipe, train_transformer, opt, params, batch, autocast)
        # EMA with a short ramp so that early weights do not linger in a short run.
        decay = min(cfg.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
        run_loss += loss.detach()
        run_n += 1
        step += 1

        if budget is not None and step == _MEASURE_FROM:
            _sync(dev)
            t_from = time.perf_counter()
        if budget is not None and step == _MEASURE_TO:
            _sync(dev)
            per_step = (time.perf_counter() - t_from) / (_MEASURE_TO - _MEASURE_FROM)
            left = budget - (time.perf_counter() - start)
            total = max(step + 1, step + int(left / per_step))
            print(f"[toy_shapes] {per_step * 1000:.1f} ms/step -> {total} steps in {cfg.minutes} min", flush=True)
        stop = hard_stop is not None and step < total and time.perf_counter() - start > hard_stop
        if step % cfg.log_every == 0 or step == total or stop:
            entry = {"step": step, "loss": round(run_loss.item() / run_n, 5), "lr": lr,
                     "seconds": round(time.perf_counter() - start, 1), "val_loss": round(val_loss(), 5)}
            history.append(entry)
            print(f"[toy_shapes] {json.dumps(entry)}", flush=True)
            run_loss.zero_()
            run_n = 0
        if stop:
            print(f"[toy_shapes] max_minutes reached: stopping at step {step} of {total}", flush=True)
            stopped_early = True
            break

    _sync(dev)
    seconds = time.perf_counter() - start
    raw_val = val_loss()
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    ema_val = val_loss()
    for m in modules:
        m.eval()
    log = {
        "config": asdict(cfg),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "steps": step,
        "stopped_early": stopped_early,
        "seconds": round(seconds, 1),
        "clips_per_second": round(step * cfg.batch_size / seconds, 1),
        "max_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None,
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "text_encoder_params": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "final_train_loss": history[-1]["loss"] if history else None,
        "final_val_loss_raw": round(raw_val, 5),
        "final_val_loss_ema": round(ema_val, 5),
        "history": history,
    }
    pipe.save_folder(out, dtype=torch.float16,
                     extra={"train_config.json": json_writer(asdict(cfg)), "train_log.json": json_writer(log)})
    return log


def _bool(text: str) -> bool:
    if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="TrainConfig JSON to start from")
    p.add_argument("--device", help="torch device (default: cuda if available)")
    kinds = {"int": int, "int | None": int, "float": float, "float | None": float, "bool": _bool, "str": str,
             "str | None": str}
    for f in fields(TrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kinds[f.type], default=None,
                       choices=OPTIMIZERS if f.name == "optimizer" else None)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    base = asdict(TrainConfig.load(args.config)) if args.config else {}
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    cfg = TrainConfig(**{**base, **overrides})
    try:
        check_writable(args.out, "--out")
    except ValueError as e:
        parser.error(str(e))
    log = train(cfg, args.out, args.device)
    print(f"[toy_shapes] done: {log['steps']} steps in {log['seconds']} s, train loss {log['final_train_loss']}, "
          f"held-out loss {log['final_val_loss_ema']} (EMA)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
