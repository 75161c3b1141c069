"""Triton kernel: one pass over q or k producing mean-pooled sub-blocks and each block's
self-similarity (the statistics the block-mask predictors need)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available
from sparsediff.kernels import valid_length
from sparsediff.kernels.block_stats_reference import block_stats_reference

# Tile config: one program per (block, batch*head); the whole block's rows sit in registers.
NUM_WARPS = 8


@triton.jit
def _block_stats_kernel(
    x_ptr, pooled_ptr, sim_ptr, lens_ptr,
    sxb, sxh, sxn, sxd,
    H, N, n_sub, n_blocks,
    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr, NPER: tl.constexpr,
    HAS_LENS: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_valid = valid_length(lens_ptr, b, N, HAS_LENS)
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, DP)
    x = tl.load(
        x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + rows[:, None] * sxn + cols[None, :] * sxd,
        mask=(rows[:, None] < n_valid) & (cols[None, :] < D), other=0.0,
    ).to(tl.float32)

    # Mean of the valid tokens of each run of SUB rows.
    sums = tl.sum(tl.reshape(x, (NPER, SUB, DP)), axis=1)
    sub_idx = blk * NPER + tl.arange(0, NPER)
    cnt = tl.minimum(tl.maximum(n_valid - sub_idx * SUB, 0), SUB).to(tl.float32)
    pooled = sums / tl.maximum(cnt, 1.0)[:, None]
    tl.store(
        pooled_ptr + (bh.to(tl.int64) * n_sub + sub_idx[:, None]) * D + cols[None, :], pooled,
        mask=(sub_idx[:, None] < n_sub) & (cols[None, :] < D),
    )

    # Mean pairwise cosine over distinct valid pairs: (|sum x_hat|^2 - n) / (n (n - 1)).
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    xhat = x / tl.maximum(norm, 1e-12)[:, None]
    s = tl.sum(xhat, axis=0)
    s2 = tl.sum(s * s, axis=0)
    n = tl.minimum(tl.maximum(n_valid - blk * BLOCK, 0), BLOCK).to(tl.float32)
    sim = tl.where(n >= 2.0, (s2 - n) / tl.maximum(n * (n - 1.0), 1.0), 1.0)
    tl.store(sim_ptr + bh * n_blocks + blk, sim)


def block_stats(
    x: torch.Tensor, block: int, sub: int, valid_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled sub-blocks (B, H, ceil(N/sub), D) fp32 and per-block self-similarity (B, H,
    ceil(N/block)) fp32 of (B, H, N, D) `x`; see `block_stats_reference` for the definitions.
    Runs the Triton kernel where kernels are available, else the reference."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    if block < 1 or sub < 1 or block % sub or block & (block - 1) or sub & (sub - 1):
        raise ValueError(f"block and sub must be powers of two with sub dividing block, got {block}, {sub}")
    if valid_len is not None and (valid_len.shape != (x.shape[0],) or valid_len.is_floating_point()):
        raise ValueError(f"valid_len must be an int tensor of shape ({x.shape[0]},)")
    if not kernels_available(x.device):
        return block_stats_reference(x, block, sub, valid_len)
    b, h, n, d = x.shape
    nb, ns = -(-n // block), -(-n // sub)
    pooled = torch.empty(b, h, ns, d, device=x.device, dtype=torch.float32)
    sim = torch.empty(b, h, nb, device=x.device, dtype=torch.float32)
    lens = valid_len.to(device=x.device, dtype=torch.int32) if valid_len is not None else sim
    _block_stats_kernel[(nb, b * h)](
        x, pooled, sim, lens, *x.stride(), h, n, ns, nb,
        D=d, DP=triton.next_power_of_2(d), BLOCK=block, SUB=sub, NPER=block // sub, HAS_LENS=valid_len is not None,
        num_warps=NUM_WARPS,
    )
    return pooled, sim
