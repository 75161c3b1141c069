"""Triton kernels: the FP8 path's per-channel statistics of K and V over the whole sequence.

`quantize_fp8` smooths K by its per-(b, h, channel) mean over the valid keys and scales V by its
per-channel absolute maximum (`quantize_fp8_reference.channel_stats` is the plain-torch reference).
Torch's reductions over the sequence dimension of a (B, H, N, D) tensor cost more GPU time than
the quantisation itself (FLUX, H200: 43 us a call against 36 us), and its scale arithmetic adds
small launches, so two kernels do it:

1. `_channel_partials_kernel`, one program per (chunk of keys, b*h): reads its chunk of K and V in
   tiles of TILE_ROWS keys, accumulating sums and absolute maxima per channel in registers, and
   writes one partial row of each.
2. `_channel_finish_kernel`, one program per b*h: reduces the partial rows in chunk order (so the
   result is the same at every run), and writes K's mean and V's (scale, 1 / scale) with
   `e4m3_scales`' rule, IEEE-rounded divisions as there.

The maxima equal the reference's exactly; the means differ from torch's in summation order only.
GPU time of a call, CUDA-graphed (H200, 2026-12-02, scripts/tune_channel_stats.py): 44.5 us
against torch's 65.3 us (reductions and scale arithmetic) at FLUX's k and v, 85 against 110 at
CogVideoX's, 87 against 120 at Wan's: 1.4-2.7 TB/s, short of the memory's 4.8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff.kernels import dependent_launch, padded_head_dim, valid_length, wait_for_prior_kernel

# Tile config. 32 keys a tile over 4 warps (32 x 128 fp32 of sums and of maxima in registers), about
# 1024 programs. Among the candidates of scripts/tune_channel_stats.py none was best at all three
# shapes; this one was best at FLUX (44.5 us) and 6% behind the best at CogVideoX (85.1 vs 80.1) and
# Wan (86.5 vs 81.6, 64-key tiles with 8 warps, which took 48.2 at FLUX).
TILE_ROWS = 32
PARTIALS_NUM_WARPS = 4
TARGET_PROGRAMS = 1024  # chunks x b*h: a few waves of 132 SMs
MAX_TILES_PER_CHUNK = 64


@triton.jit
def _channel_partials_kernel(
    k_ptr, v_ptr, lens_ptr, k_sum_ptr, v_max_ptr,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, n_k, n_chunks, tiles_per_chunk,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, TILE_ROWS: tl.constexpr, HAS_KV_LENS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    n_valid = valid_length(lens_ptr, b, n_k, HAS_KV_LENS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    k_src = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_src = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    # Element-wise accumulators, reduced over their rows once at the end.
    k_sum = tl.zeros([TILE_ROWS, BLOCK_D], dtype=tl.float32)
    v_max = tl.zeros([TILE_ROWS, BLOCK_D], dtype=tl.float32)
    for t in range(tiles_per_chunk):
        rows = (chunk * tiles_per_chunk + t) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        ok = (rows[:, None] < n_valid) & d_ok[None, :]
        k = tl.load(k_src + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=ok, other=0.0)
        v = tl.load(v_src + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=ok, other=0.0)
        k_sum += k.to(tl.float32)
        v_max = tl.maximum(v_max, tl.abs(v.to(tl.float32)))
    out = (bh.to(tl.int64) * n_chunks + chunk) * BLOCK_D + offs_d
    tl.store(k_sum_ptr + out, tl.sum(k_sum, 0))
    tl.store(v_max_ptr + out, tl.max(v_max, 0))


@triton.jit
def _channel_finish_kernel(
    k_sum_ptr, v_max_ptr, lens_ptr, k_mean_ptr, v_scale_ptr, v_inverse_ptr,
    H, n_k, n_chunks,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KV_LENS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    bh = tl.program_id(0)
    n_valid = valid_length(lens_ptr, bh // H, n_k, HAS_KV_LENS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    k_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    v_max = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(n_chunks):
        at = (bh.to(tl.int64) * n_chunks + c) * BLOCK_D + offs_d
        k_sum += tl.load(k_sum_ptr + at)
        v_max = tl.maximum(v_max, tl.load(v_max_ptr + at))
    out = bh.to(tl.int64) * HEAD_D + offs_d
    tl.store(k_mean_ptr + out, tl.math.div_rn(k_sum, tl.maximum(n_valid, 1).to(tl.float32)), mask=d_ok)
    safe = tl.where(v_max > 0.0, v_max, 448.0)
    tl.store(v_scale_ptr + out, tl.math.div_rn(safe, 448.0), mask=d_ok)
    tl.store(v_inverse_ptr + out, tl.math.div_rn(448.0, safe), mask=d_ok)


def channel_stats_fp8(
    k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K's mean, V's scale, 1 / V's scale) per (b, h, channel) over the valid keys, fp32 (B, H, D).

    k, v: (B, H, Nk, D), any strides; kv_lens int32 (B,) or None. V's scales follow
    `e4m3_scales(absolute maximum of v)`. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    batch, heads, n_k, head_dim = k.shape
    block_d = padded_head_dim(head_dim)
    n_tiles = triton.cdiv(n_k, TILE_ROWS)
    tiles_per_chunk = max(1, min(MAX_TILES_PER_CHUNK, n_tiles * batch * heads // TARGET_PROGRAMS))
    n_chunks = triton.cdiv(n_tiles, tiles_per_chunk)
    device = k.device
    k_sum = torch.empty(batch * heads, n_chunks, block_d, dtype=torch.float32, device=device)
    v_max = torch.empty_like(k_sum)
    k_mean, v_scale, v_inverse = (torch.empty(batch, heads, head_dim, dtype=torch.float32, device=device)
                                  for _ in range(3))
    lens = kv_lens.contiguous() if kv_lens is not None else k_mean
    launch = dependent_launch(k.device)
    _channel_partials_kernel[(n_chunks, batch * heads)](
        k, v, lens, k_sum, v_max, *k.stride(), *v.stride(), heads, n_k, n_chunks, tiles_per_chunk,
        HEAD_D=head_dim, BLOCK_D=block_d, TILE_ROWS=TILE_ROWS, HAS_KV_LENS=kv_lens is not None,
        num_warps=PARTIALS_NUM_WARPS, **launch,
    )
    _channel_finish_kernel[(batch * heads,)](
        k_sum, v_max, lens, k_mean, v_scale, v_inverse, heads, n_k, n_chunks,
        HEAD_D=head_dim, BLOCK_D=block_d, HAS_KV_LENS=kv_lens is not None, num_warps=1, **launch,
    )
    return k_mean, v_scale, v_inverse
