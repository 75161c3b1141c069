"""Triton kernel: FP8 (e4m3) quantisation of q, k, v for the attention kernel's FP8 path.

The recipe and the output layout are in `quantize_fp8_reference` (SageAttention's: smoothed K, one
scale per query / key block, per-channel V scales, V stored transposed). The per-channel
statistics over the whole sequence (K's mean, V's scales) come first (`channel_stats_fp8`); one
program per (128-token block, b*h) then quantises its Q block and its K and V tokens.

`to_e4m3` is the fp32 -> e4m3 conversion the kernels use. Under TRITON_INTERPRET=1 (Triton
3.8/3.9) the conversion is wrong: it rounds half away from zero on the cut-off bit alone, drops the
carry of a rounded-up mantissa (1.9375 -> 1.0 instead of 2.0), does not saturate at 448 and
truncates e4m3 subnormals. Values already on the e4m3 grid convert exactly, and fp8 `tl.dot` is
right there (fp8 operands are widened to fp16), so with ROUND_E4M3 the value is first rounded to
the grid in fp32 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff.kernels import dependent_launch, padded_head_dim, valid_length, wait_for_prior_kernel
from sparsediff.kernels.channel_stats import channel_stats_fp8
from sparsediff.kernels.quantize_fp8_reference import V_ROW_ALIGN, Fp8Operands

NUM_WARPS = 4


@triton.jit
def _e4m3_grid(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), saturated at ±448, still fp32."""
    magnitude = tl.minimum(tl.abs(x), 448.0)
    exponent = tl.maximum((magnitude.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # subnormals: 2^-6's spacing
    spacing = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    # Adding 1.5 * 2^23 spacings moves x to where fp32's own spacing is `spacing`: the fp32 sum
    # rounds x to a multiple of it, ties to even; subtracting it back is exact.
    magic = spacing * 12582912.0
    rounded = (magnitude + magic) - magic
    return tl.where(x.to(tl.int32, bitcast=True) < 0, -rounded, rounded)  # the sign bit, -0 included


@triton.jit
def to_e4m3(x, ROUND_E4M3: tl.constexpr):
    """fp32 -> e4m3, round to nearest even, saturating (cvt.rn.satfinite on the GPU)."""
    if ROUND_E4M3:
        x = _e4m3_grid(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _block_scales(x):
    """(scale, 1 / scale) of a tile with e4m3_scales' rule: amax / 448, 1 for an all-zero tile."""
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    safe = tl.where(amax > 0.0, amax, 448.0)
    return tl.math.div_rn(safe, 448.0), tl.math.div_rn(448.0, safe)


@triton.jit
def _quantize_fp8_kernel(
    q_ptr, k_ptr, v_ptr, kv_lens_ptr, k_mean_ptr, v_inv_ptr,
    q8_ptr, k8_ptr, vt_ptr, q_scale_ptr, k_scale_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    H, n_q, n_k, n_k_padded, QB, KB,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KV_LENS: tl.constexpr, ROUND_E4M3: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    n_valid = valid_length(kv_lens_ptr, b, n_k, HAS_KV_LENS)

    if tile * BLOCK_M < n_q:
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows[:, None] < n_q) & d_ok[None, :]
        q_src = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        q = tl.load(q_src + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=ok, other=0.0).to(tl.float32)
        scale, inverse = _block_scales(q)
        tl.store(q8_ptr + (bh.to(tl.int64) * n_q + rows[:, None]) * HEAD_D + offs_d[None, :],
                 to_e4m3(q * inverse, ROUND_E4M3), mask=ok)
        tl.store(q_scale_ptr + bh * QB + tile, scale)

    # Key tokens of this tile, one mask block (BLOCK_N keys, one k scale) at a time.
    k_mean = tl.load(k_mean_ptr + bh * HEAD_D + offs_d, mask=d_ok, other=0.0)
    v_inv = tl.load(v_inv_ptr + bh * HEAD_D + offs_d, mask=d_ok, other=0.0)
    k_src = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_src = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    for sub in tl.static_range(BLOCK_M // BLOCK_N):
        start = tile * BLOCK_M + sub * BLOCK_N
        if start < n_k_padded:
            keys = start + tl.arange(0, BLOCK_N)
            ok = (keys[:, None] < n_valid) & d_ok[None, :]
            k = tl.load(k_src + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=ok, other=0.0)
            k = tl.where(ok, k.to(tl.float32) - k_mean[None, :], 0.0)
            scale, inverse = _block_scales(k)
            stored = (keys[:, None] < n_k) & d_ok[None, :]
            tl.store(k8_ptr + (bh.to(tl.int64) * n_k + keys[:, None]) * HEAD_D + offs_d[None, :],
                     to_e4m3(k * inverse, ROUND_E4M3), mask=stored)
            if start < n_k:
                tl.store(k_scale_ptr + bh * KB + start // BLOCK_N, scale)
            v = tl.load(v_src + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=ok, other=0.0)
            v8 = tl.trans(to_e4m3(v.to(tl.float32) * v_inv[None, :], ROUND_E4M3))
            tl.store(vt_ptr + (bh.to(tl.int64) * HEAD_D + offs_d[:, None]) * n_k_padded + keys[None, :], v8,
                     mask=d_ok[:, None] & (keys[None, :] < n_k_padded))


def quantize_fp8(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int, block_n: int, kv_lens: torch.Tensor | None = None
) -> Fp8Operands:
    """`quantize_fp8_reference` by Triton kernels: `channel_stats_fp8`'s two passes, then the quantising
    kernel (arguments validated by the caller).

    q (B, H, Nq, D), k and v (B, H, Nk, D), any strides; kv_lens int32 (B,) or None; block_m a
    multiple of block_n. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    n_k_padded = triton.cdiv(n_k, V_ROW_ALIGN) * V_ROW_ALIGN
    QB, KB = triton.cdiv(n_q, block_m), triton.cdiv(n_k, block_n)
    device = q.device
    k_mean, v_scale, v_inverse = channel_stats_fp8(k, v, kv_lens)
    fp8 = torch.float8_e4m3fn
    q8 = torch.empty(batch, heads, n_q, head_dim, dtype=fp8, device=device)
    k8 = torch.empty(batch, heads, n_k, head_dim, dtype=fp8, device=device)
    v_t = torch.empty(batch, heads, head_dim, n_k_padded, dtype=fp8, device=device)
    q_scale = torch.empty(batch, heads, QB, dtype=torch.float32, device=device)
    k_scale = torch.empty(batch, heads, KB, dtype=torch.float32, device=device)
    _quantize_fp8_kernel[(triton.cdiv(max(n_q, n_k_padded), block_m), batch * heads)](
        q, k, v, kv_lens.contiguous() if kv_lens is not None else q_scale, k_mean, v_inverse,
        q8, k8, v_t, q_scale, k_scale,
        *q.stride(), *k.stride(), *v.stride(),
        heads, n_q, n_k, n_k_padded, QB, KB,
        HEAD_D=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_KV_LENS=kv_lens is not None, ROUND_E4M3=device.type == "cpu",
        num_warps=NUM_WARPS, **dependent_launch(device),
    )
    return Fp8Operands(q8, k8, v_t, q_scale, k_scale, v_scale, k_mean)
