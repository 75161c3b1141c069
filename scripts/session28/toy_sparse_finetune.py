"""Twenty-eighth session: can a short fine-tune make the toy model's attention sparse-friendly?

    python scripts/session28/toy_sparse_finetune.py --out DIR [--steps 230] [--minutes M] [--cdf 0.7] [--source oracle] [--lr 5e-5]

Sparsity-aware distillation (run on the CPU in the twenty-eighth session, at GPU size through
`scripts/gpu_session.sh finetune` in the twenty-ninth). The student starts from the shipped weights,
the teacher is a frozen copy of them. Each step draws training clips (the training data
generator, its caption dropout and foreground weights), a t and noise, and asks the student for
the velocity twice: with every attention call dense, and with every video self-attention call
computed on the blocks that `--source` keeps at `--cdf`: the oracle's (top cdf of the true block
mass of the student's own q and k, in the processors' tile order), or a predictor's (`sampled`, the
processors' default, at sim 0: the masks a render gets). The mask is not differentiated, the
attention on its kept blocks is; in a batch, only its clips at t <= --t-max take the sparse pass.
The loss is the squared error of both against the teacher's dense velocity:

    |v_student(dense) - v_teacher|^2 + |v_student(sparse) - v_teacher|^2

so the student keeps the teacher's behaviour when dense and learns to give the same velocity
with its low-mass blocks dropped, which is what #9's target (sparse vs dense renders of one
model) measures. Writes DIR/{transformer,text_encoder,tokenizer,scheduler}/ and
DIR/finetune_log.json. Evaluate with `scripts/session27/toy_step_schedule.py --weights DIR`.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import N_VIDEO, source_masks, video_self_attention  # noqa: E402

from sparsediff.attention import BLOCK_M, BLOCK_N, METHODS  # noqa: E402
from sparsediff.io import atomic_write_json  # noqa: E402
from sparsediff.kernels.block_sparse_attn_reference import expand_block_mask  # noqa: E402
from sparsediff.pipelines.toy_shapes import TrainConfig, ToyShapesPipeline, load_pipeline  # noqa: E402
from sparsediff.pipelines.toy_shapes.train import (  # noqa: E402
    noised, predict_velocity, training_batch, velocity_error)


class MaskedSelfAttention:
    """While `cdf` is set, video self-attention runs on `source`'s blocks at that cdf (`source_masks`),
    differentiable through the kept blocks (the mask is not); else the stock call."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.cdf: float | None = None
        self.skipped: list[float] = []

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
        if self.cdf is None:
            return None
        with torch.no_grad():
            (mask,) = source_masks(self.source, q.detach().float(), k.detach().float(), (self.cdf,))
        self.skipped.append(1.0 - float(mask.float().mean()))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=expand_block_mask(mask, N_VIDEO, N_VIDEO, BLOCK_M, BLOCK_N))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=230)
    p.add_argument("--minutes", type=float, help="stop (and save) at this wall-clock time")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cdf", type=float, default=0.7)
    p.add_argument("--source", choices=["oracle", *METHODS], default="oracle",
                   help="whose block masks the sparse pass takes: the oracle's or a predictor's (at sim 0)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--t-max", type=float, default=0.85,
                   help="the sparse term only at t <= this (sparse steps follow 6 dense of 16: sigma <= 0.82)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--init-from", help="start the student from this weights folder (a previous run's --out); "
                   "the teacher stays the shipped weights")
    args = p.parse_args()
    if not 0.0 < args.cdf < 1.0:
        raise ValueError(f"--cdf must lie in (0, 1), got {args.cdf}")
    cfg = TrainConfig(foreground_weight=4.0, batch_size=args.batch_size)  # run 3's data and loss weighting
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    teacher = load_pipeline(dev)
    student = ToyShapesPipeline.from_folder(args.init_from, device=dev) if args.init_from else copy.deepcopy(teacher)
    for m in (teacher.transformer, teacher.text_encoder):
        m.requires_grad_(False).eval()
    modules = [student.transformer, student.text_encoder]
    params = [q for m in modules for q in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    data_gen = torch.Generator().manual_seed(args.seed)
    noise_gen = torch.Generator(device=dev).manual_seed(args.seed + 1)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16)
    history, start = [], time.perf_counter()
    attention = MaskedSelfAttention(args.source)
    with video_self_attention(attention):
        for step in range(args.steps):
            # A short warm-up: Adam's first steps move every weight by about lr whatever the gradient.
            # The cosine runs over the steps, or over --minutes when that ends first.
            progress = step / args.steps
            if args.minutes is not None:
                progress = max(progress, (time.perf_counter() - start) / (args.minutes * 60.0))
            lr = args.lr * min(1.0, (step + 1) / 10) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            x0, captions, t, noise, weights = training_batch(cfg, data_gen, noise_gen, dev)
            xt = noised(x0, noise, t)
            with autocast:
                with torch.no_grad():
                    target = predict_velocity(teacher, xt, t, captions).float()
                dense_loss = velocity_error(predict_velocity(student, xt, t, captions), target, weights)
                sparse_loss = torch.zeros((), device=dev)
                attention.skipped = []
                late = (t <= args.t_max).nonzero().flatten()  # the batch's clips at sparse-step noise levels
                if len(late):
                    attention.cdf = args.cdf
                    late_captions = [captions[i] for i in late.tolist()]
                    sparse_loss = velocity_error(predict_velocity(student, xt[late], t[late], late_captions),
                                                 target[late], weights[late]) * (len(late) / cfg.batch_size)
                    attention.cdf = None
            opt.zero_grad(set_to_none=True)
            (dense_loss + sparse_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            entry = {"step": step + 1, "t": round(float(t.mean()), 3), "dense_loss": round(dense_loss.item(), 6),
                     "sparse_loss": round(sparse_loss.item(), 6),
                     "sparsity": round(sum(attention.skipped) / len(attention.skipped), 4) if attention.skipped else None,
                     "lr": lr, "seconds": round(time.perf_counter() - start, 1)}
            history.append(entry)
            print(json.dumps(entry), flush=True)
            if progress >= 1.0:
                print(f"--minutes reached: stopping after step {step + 1} of {args.steps}", flush=True)
                break
    for m in modules:
        m.eval()
    student.save_folder(args.out, dtype=torch.float16)
    atomic_write_json(os.path.join(args.out, "finetune_log.json"),
                      {"args": vars(args), "torch": torch.__version__, "device": str(dev), "history": history}, indent=1)


if __name__ == "__main__":
    main()
