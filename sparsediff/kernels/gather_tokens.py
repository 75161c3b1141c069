"""Triton kernel: q, k and v (or one tensor) with their tokens reordered, in one launch.

The attention order (layout.py) reorders tokens at every sparse call: q, k, v into it, the output
back. torch's index_select takes its vectorised path only where the gathered dimension is the
outermost one left: diffusers' (B, N, H, D) tensors with B = 1. Tensors stored (B, H, N, D), as
CogVideoX's are, took its element-wise path: 0.8 ms a tensor there, 8.7% of a compiled sparse step
(H200, bench-results/h200-2026-12-02/profile-step-cogvideox-compiled.log). Here one program copies
BLOCK_T rows of one (b, h) whatever the strides, and one launch serves all three tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available, triton_interpreting
from sparsediff.kernels import dependent_launch, padded_head_dim, wait_for_prior_kernel
from sparsediff.kernels.gather_tokens_reference import gather_tokens_reference
from sparsediff.layout import empty_stored_like

# Tile config: one program per (BLOCK_T output tokens, b * h, tensor); 8 KB of bf16 at D = 128.
# The CPU interpreter pays per program and operation, not per element: there a program copies
# INTERPRETER_BLOCK_T tokens (the toy model's sparse step under the interpreter, 5 frames: the
# gathers took most of its 199 s in 32-token programs).
BLOCK_T = 32
INTERPRETER_BLOCK_T = 1024
NUM_WARPS = 4


@triton.jit
def _copy_rows(src_ptr, dst_ptr, tokens, rows, ok, b, h, offs_d, d_ok,
               s_b, s_h, s_n, s_d, o_b, o_h, o_n, o_d):
    mask = ok[:, None] & d_ok[None, :]
    src = src_ptr + b.to(tl.int64) * s_b + h.to(tl.int64) * s_h + tokens[:, None] * s_n + offs_d[None, :] * s_d
    dst = dst_ptr + b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + rows[:, None] * o_n + offs_d[None, :] * o_d
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


@triton.jit
def _gather_tokens_kernel(
    index_ptr, src0, src1, src2, dst0, dst1, dst2,
    s0_b, s0_h, s0_n, s0_d, s1_b, s1_h, s1_n, s1_d, s2_b, s2_h, s2_n, s2_d,
    o_b, o_h, o_n, o_d,
    H, n_out,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = rows < n_out
    tokens = tl.load(index_ptr + rows, mask=ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    which = tl.program_id(2)
    if which == 0:
        _copy_rows(src0, dst0, tokens, rows, ok, b, h, offs_d, d_ok, s0_b, s0_h, s0_n, s0_d, o_b, o_h, o_n, o_d)
    elif which == 1:
        _copy_rows(src1, dst1, tokens, rows, ok, b, h, offs_d, d_ok, s1_b, s1_h, s1_n, s1_d, o_b, o_h, o_n, o_d)
    else:
        _copy_rows(src2, dst2, tokens, rows, ok, b, h, offs_d, d_ok, s2_b, s2_h, s2_n, s2_d, o_b, o_h, o_n, o_d)


def gather_tokens(
    xs: Sequence[torch.Tensor], index: torch.Tensor, outs: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Each x of `xs` (1 to 3 tensors (B, H, N, D) of one shape, dtype and device, any strides) with
    its tokens in `index` order: x[:, :, index] for an int64 `index` (M,) on their device.

    outs: where to write (B, H, M, D) each, all of one layout; default: new tensors stored as the
    first x is ((B, N, H, D) or (B, H, N, D)). Runs the Triton kernel where kernels are available,
    else the reference. `index`'s values are not checked against N: that would read them back to the
    host, a sync per call that a CUDA graph cannot capture; the token orders that build it keep them in range."""
    if not 1 <= len(xs) <= 3:
        raise ValueError(f"xs must hold 1 to 3 tensors, got {len(xs)}")
    first = xs[0]
    for x in xs:
        if x.dim() != 4 or x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"xs must be (B, H, N, D) tensors of one shape, dtype and device, got "
                             f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in xs]}")
    if index.dtype != torch.int64 or index.dim() != 1 or index.device != first.device:
        raise ValueError(f"index must be an int64 (M,) tensor on {first.device}, got {index.dtype} "
                         f"{tuple(index.shape)} on {index.device}")
    batch, heads, _, head_dim = first.shape
    shape = (batch, heads, index.numel(), head_dim)
    if outs is not None and (len(outs) != len(xs) or any(
            o.shape != shape or o.dtype != first.dtype or o.device != first.device or o.stride() != outs[0].stride()
            for o in outs)):
        raise ValueError(f"outs must be {len(xs)} tensors of shape {shape}, dtype {first.dtype} and one layout")
    if not kernels_available(first.device):
        gathered = [gather_tokens_reference(x, index) for x in xs]  # each stored as its x is
        if outs is None and all(g.stride() == gathered[0].stride() for g in gathered):
            return gathered  # stored as the first x is, as the default outs: no copy
        outs = outs if outs is not None else [empty_stored_like(first, index.numel()) for _ in xs]
        for out, values in zip(outs, gathered):
            out.copy_(values)
        return list(outs)
    if outs is None:
        outs = [empty_stored_like(first, index.numel()) for _ in xs]
    padded = list(xs) + [xs[0]] * (3 - len(xs))  # unused slots: never read (grid axis 2 = len(xs))
    padded_outs = list(outs) + [outs[0]] * (3 - len(outs))
    block_t = INTERPRETER_BLOCK_T if triton_interpreting() else BLOCK_T
    _gather_tokens_kernel[(triton.cdiv(index.numel(), block_t), batch * heads, len(xs))](
        index.contiguous(), *padded, *padded_outs, *(s for x in padded for s in x.stride()), *outs[0].stride(),
        heads, index.numel(),
        HEAD_D=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_T=block_t, num_warps=NUM_WARPS,
        **dependent_launch(index.device),
    )
    return list(outs)
