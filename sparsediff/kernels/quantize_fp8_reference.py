"""Plain-torch reference of the FP8 (e4m3) quantisation of q, k, v for the attention kernel.

SageAttention's recipe: K is smoothed (its per-(b, h, channel) mean over the valid keys is
subtracted: q·mean(k) is the same for every key of a query row, so the softmax does not change)
and quantised with one scale per key block; Q with one scale per query block; V with one scale per
channel, stored transposed (B, H, D, N) so that the P·V product reads it K-major, as Hopper's fp8
MMA requires. scale = amax / 448 (e4m3's largest finite value); an all-zero block gets scale 1.
Keys at index >= kv_lens[b] are left out of the statistics and stored as zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
# Rows of the transposed V are padded to a multiple of this many keys (bytes): 16-byte aligned rows.
V_ROW_ALIGN = 16


@dataclass(frozen=True)
class Fp8Operands:
    """q, k, v quantised for the FP8 attention kernel; x ≈ x_fp8 * its scale (k: after smoothing).

    q: e4m3 (B, H, Nq, D); k: e4m3 (B, H, Nk, D), smoothed; v_t: e4m3 (B, H, D, Nk rounded up to
    V_ROW_ALIGN), V transposed (entries past Nk are zero); q_scale: fp32 (B, H, ceil(Nq/block_m));
    k_scale: fp32 (B, H, ceil(Nk/block_n)); v_scale: fp32 (B, H, D); k_mean: fp32 (B, H, D), the
    mean subtracted from k.
    """

    q: torch.Tensor
    k: torch.Tensor
    v_t: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_mean: torch.Tensor


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3, round to nearest even, saturating at ±448 (as the GPU's cvt.rn.satfinite)."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e4m3_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1 / scale) for blocks with absolute maximum `amax` (fp32); 1 where amax is 0.

    Both are IEEE-rounded divisions (tensor by tensor: torch rounds a scalar-by-tensor division
    through a reciprocal), which the kernel reproduces bit for bit."""
    safe = torch.where(amax > 0, amax, E4M3_MAX)
    return safe / E4M3_MAX, torch.full_like(safe, E4M3_MAX) / safe


def valid_keys(kv_lens: torch.Tensor | None, batch: int, n_keys: int, device: torch.device) -> torch.Tensor:
    """bool (B, 1, Nk, 1): keys below kv_lens[b] (every key without kv_lens)."""
    lens = torch.full((batch,), n_keys, device=device) if kv_lens is None else kv_lens.to(device).long()
    return (torch.arange(n_keys, device=device)[None, :] < lens[:, None])[:, None, :, None]


def channel_stats(
    k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of k, absolute maximum of v) per (b, h, channel) over the valid keys, fp32 (B, H, D).

    The reference of `kernels/channel_stats.py` (whose means differ in summation order only)."""
    if kv_lens is None:
        return k.mean(dim=2, dtype=torch.float32), torch.linalg.vector_norm(v, ord=float("inf"), dim=2, dtype=torch.float32)
    valid = valid_keys(kv_lens, k.shape[0], k.shape[2], k.device)
    n_valid = valid.sum(dim=2, dtype=torch.float32).clamp_min(1.0)  # (B, 1, 1)
    k_mean = torch.where(valid, k, 0).sum(dim=2, dtype=torch.float32) / n_valid
    v_amax = torch.where(valid, v, 0).abs().amax(dim=2).float()
    return k_mean, v_amax


def _quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x fp32 (B, H, N, D) in blocks of `block` rows: (e4m3 x, fp32 scale (B, H, ceil(N/block)))."""
    B, H, n, D = x.shape
    n_blocks = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, n_blocks * block - n))
    scale, inverse = e4m3_scales(padded.reshape(B, H, n_blocks, block * D).abs().amax(dim=-1))
    return to_e4m3(x * inverse.repeat_interleave(block, dim=2)[:, :, :n, None]), scale


def quantize_fp8_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_m: int,
    block_n: int,
    kv_lens: torch.Tensor | None = None,
    k_mean: torch.Tensor | None = None,
) -> Fp8Operands:
    """q (B, H, Nq, D), k and v (B, H, Nk, D), any float dtype; see the module docstring.

    k_mean: fp32 (B, H, D), K's channel means to smooth with instead of `channel_stats`' (the
    kernel's, which differ in summation order, to compare the quantisation bit for bit)."""
    batch, heads, n_k, head_dim = k.shape
    valid = valid_keys(kv_lens, batch, n_k, k.device)
    computed_mean, v_amax = channel_stats(k, v, kv_lens)
    k_mean = computed_mean if k_mean is None else k_mean
    q8, q_scale = _quantize_blocks(q.float(), block_m)
    k8, k_scale = _quantize_blocks(torch.where(valid, k.float() - k_mean[:, :, None, :], 0.0), block_n)
    v_scale, v_inverse = e4m3_scales(v_amax)
    v8 = to_e4m3(torch.where(valid, v.float(), 0.0) * v_inverse[:, :, None, :])
    v_t = torch.zeros(batch, heads, head_dim, -(-n_k // V_ROW_ALIGN) * V_ROW_ALIGN, dtype=torch.float8_e4m3fn,
                      device=v.device)
    v_t[..., :n_k] = v8.transpose(-1, -2)
    return Fp8Operands(q8, k8, v_t, q_scale, k_scale, v_scale, k_mean)
