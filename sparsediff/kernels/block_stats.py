"""Triton kernel: one pass over q or k producing each block's mean token and self-similarity (the
statistics the block-mask predictors need)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available, triton_interpreting
from sparsediff.kernels import dependent_launch, valid_length, wait_for_prior_kernel
from sparsediff.kernels.block_stats_reference import block_stats_reference

# Tile config: one program per (block, batch*head), walking its block in CHUNK_ROWS-row chunks that
# it sums elementwise (a loop unrolled at compile time, so every chunk's load is in flight at once);
# the rows are reduced once, at the end. Against the kernel before it (the whole 128-row block in
# registers, 8 warps, its mean always computed), q's statistics at the four model shapes, CUDA-graphed
# (H200, 2026-12-02, block-stats-chunks-session8.log): similarity alone 17.9 / 50.2 / 45.9 / 206 us
# at FLUX / CogVideoX / Wan / HunyuanVideo, was 28.7 / 84.9 / 82.1 / 550 us; with the means 24.0 /
# 64.7 / 55.4 / 299 us. Chunks of 16 and 64 rows and 8 warps were slower (up to 1.7x). The CPU
# interpreter pays per operation, not per element: there the block is one chunk (a toy-model call
# took 1.4 s so, 2.7 s in 32-row chunks).
CHUNK_ROWS = 32
NUM_WARPS = 4


@triton.jit
def _block_stats_kernel(
    x_ptr, pooled_ptr, sim_ptr, lens_ptr, thr_ptr, below_ptr,
    sxb, sxh, sxn, sxd,
    H, N, n_blocks,
    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr, POOLED: tl.constexpr,
    HAS_LENS: tl.constexpr, BELOW: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_valid = valid_length(lens_ptr, b, N, HAS_LENS)
    x_base = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh
    cols = tl.arange(0, DP)
    x_sum = tl.zeros((CHUNK, DP), dtype=tl.float32)
    xhat_sum = tl.zeros((CHUNK, DP), dtype=tl.float32)
    for c in tl.static_range(BLOCK // CHUNK):
        rows = blk * BLOCK + c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_base + rows[:, None] * sxn + cols[None, :] * sxd,
                    mask=(rows[:, None] < n_valid) & (cols[None, :] < D), other=0.0).to(tl.float32)
        if POOLED:
            x_sum += x
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        xhat_sum += x / tl.maximum(norm, 1e-12)[:, None]
    n = tl.minimum(tl.maximum(n_valid - blk * BLOCK, 0), BLOCK).to(tl.float32)
    if POOLED:  # the mean of the valid tokens
        tl.store(pooled_ptr + (bh.to(tl.int64) * n_blocks + blk) * D + cols, tl.sum(x_sum, axis=0) / tl.maximum(n, 1.0),
                 mask=cols < D)
    # Mean pairwise cosine over distinct valid pairs: (|sum x_hat|^2 - n) / (n (n - 1)).
    s = tl.sum(xhat_sum, axis=0)
    s2 = tl.sum(s * s, axis=0)
    sim = tl.where(n >= 2.0, (s2 - n) / tl.maximum(n * (n - 1.0), 1.0), 1.0)
    tl.store(sim_ptr + bh * n_blocks + blk, sim)
    if BELOW:  # not (sim >= threshold): a NaN similarity counts as below; a threshold of 0 or less trusts
        # every block, NaN ones too (similarities may be negative: down to -1 / (n - 1)), one of 1 none
        thr = tl.load(thr_ptr + h)
        tl.store(below_ptr + bh * n_blocks + blk, (((sim >= thr) == 0) & ((thr <= 0.0) == 0)) | (thr >= 1.0))


def block_stats(
    x: torch.Tensor, block: int, valid_len: torch.Tensor | None = None, *, pooled: bool = True,
    sim_below: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Per-block mean token (B, H, ceil(N/block), D) fp32 (None with pooled=False, which skips it),
    self-similarity (B, H, ceil(N/block)) fp32 of (B, H, N, D) `x` (see `block_stats_reference` for
    the definitions) and, given fp32 (H,) thresholds `sim_below`, bool (B, H, ceil(N/block)):
    whether a block's similarity is not at least its head's threshold and the threshold is above 0
    (similarities can be negative; sim 0.0 is to trust every block), or the threshold is 1 (a
    single-token or constant block has similarity 1; sim 1.0 is to distrust every block) (else None). The predictors
    take the last from the same pass, not from comparison kernels of their own. Runs the Triton
    kernel where kernels are available, else the reference."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if valid_len is not None and (valid_len.shape != (x.shape[0],) or valid_len.is_floating_point()):
        raise ValueError(f"valid_len must be an int tensor of shape ({x.shape[0]},)")
    if sim_below is not None and (sim_below.shape != (x.shape[1],) or sim_below.dtype != torch.float32):
        raise ValueError(f"sim_below must be an fp32 tensor of shape ({x.shape[1]},)")
    if not kernels_available(x.device):
        means, sim = block_stats_reference(x, block, valid_len)
        thr = None if sim_below is None else sim_below.to(sim.device).view(1, -1, 1)
        below = None if thr is None else (~(sim >= thr) & ~(thr <= 0)) | (thr >= 1)
        return (means if pooled else None), sim, below
    b, h, n, d = x.shape
    nb = -(-n // block)
    means = torch.empty(b, h, nb, d, device=x.device, dtype=torch.float32) if pooled else None
    sim = torch.empty(b, h, nb, device=x.device, dtype=torch.float32)
    lens = valid_len.to(device=x.device, dtype=torch.int32).contiguous() if valid_len is not None else sim
    below = torch.empty(b, h, nb, device=x.device, dtype=torch.bool) if sim_below is not None else None
    _block_stats_kernel[(nb, b * h)](
        x, means if pooled else sim, sim, lens, sim_below.to(x.device).contiguous() if below is not None else sim,
        below.view(torch.int8) if below is not None else sim, *x.stride(), h, n, nb,
        D=d, DP=triton.next_power_of_2(d), BLOCK=block, CHUNK=block if triton_interpreting() else min(block, CHUNK_ROWS),
        POOLED=pooled,
        HAS_LENS=valid_len is not None, BELOW=below is not None, num_warps=NUM_WARPS, **dependent_launch(x.device),
    )
    return means, sim, below
