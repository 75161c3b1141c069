"""Muon (orthogonalised momentum) for the toy model's weight matrices, all matrices of one shape at once.

The update of `torch.optim.Muon` with ``adjust_lr_fn="match_rms_adamw"`` (Nesterov momentum, five quintic
Newton-Schulz iterations in bf16, decoupled weight decay, the step scaled by 0.2 * sqrt(max(rows, cols)) so
that its RMS matches AdamW's and the two share lr and weight decay), computed on stacks of same-shaped
matrices with batched products. torch 2.11's Muon runs its about 25 kernels one matrix at a time: over the
toy model's 60 block matrices the host then launched about 1,500 kernels a step, and the H100's 48x48
training step took 72.4 ms against AdamW's 37.9 (forty-seventh session). The toy model's blocks have three
shapes, so a step here launches about 75, and the step took 35.9 ms.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's (Keller Jordan's quintic)
NS_STEPS = 5
EPS = 1e-7


def orthogonalised(update: torch.Tensor) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for each (A, B) matrix U S V^T of a (n, A, B) stack, in bf16
    (singular values come out near 1, roughly within 0.5-1.5, as in torch.optim.Muon)."""
    a, b, c = NS_COEFFICIENTS
    x = update.bfloat16()
    wide = x.shape[-2] <= x.shape[-1]
    if not wide:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=EPS)  # spectral norm at most 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters (see the module doc), momentum 0.95 with Nesterov. Each group's parameters
    are stepped in stacks of one shape, whose momentum lives in the state of the stack's first parameter.
    A stack none of whose parameters has a gradient is skipped; in a stack where some have one, the others
    count as a zero gradient (the toy training's matrices all get one at every step)."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon steps 2-D weight matrices only, got a parameter of shape {tuple(p.shape)}")
            stacks: dict[torch.Size, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                stacks[p.shape].append(p)
            group["stacks"] = list(stacks.values())

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for params in group["stacks"]:
                if all(p.grad is None for p in params):
                    continue
                grads = torch.stack([torch.zeros_like(p) if p.grad is None else p.grad for p in params])
                buf = self.state[params[0]].setdefault("momentum_buffer", torch.zeros_like(grads))
                buf.lerp_(grads, 1 - momentum)
                update = orthogonalised(grads.lerp_(buf, momentum)).to(grads.dtype)
                torch._foreach_mul_(params, 1 - lr * decay)
                torch._foreach_add_(params, update.unbind(0), alpha=-lr * 0.2 * math.sqrt(max(params[0].shape)))
