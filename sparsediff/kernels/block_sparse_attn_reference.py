"""Plain-torch reference of block-sparse attention; also the CPU fallback without the interpreter.

Materialises the token-level mask and the full score matrix, so it is meant for small shapes.
"""
from __future__ import annotations

import math

import torch

from sparsediff.kernels.quantize_fp8_reference import E4M3_MAX, quantize_fp8_reference, to_e4m3, valid_keys


def expand_block_mask(
    block_mask: torch.Tensor, n_q: int, n_k: int, block_m: int, block_n: int
) -> torch.Tensor:
    """Token-level bool mask (B, H, n_q, n_k) from a block mask (B, H, ceil(n_q/block_m), ceil(n_k/block_n))."""
    rows = block_mask.repeat_interleave(block_m, dim=2)[:, :, :n_q]
    return rows.repeat_interleave(block_n, dim=3)[:, :, :, :n_k]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    scale: float | None = None,
    *,
    block_m: int,
    block_n: int,
    kv_lens: torch.Tensor | None = None,
    fp8: bool = False,
) -> torch.Tensor:
    """Masked softmax attention in fp32; rows that keep no valid key return zeros.

    Arguments are assumed validated (see `block_sparse_attention`): q (B, H, Nq, D), k/v (B, H, Nk, D),
    block_mask bool (B, H, ceil(Nq/block_m), ceil(Nk/block_n)), kv_lens int (B,) or None.
    fp8: the FP8 kernel's arithmetic instead (`_fp8_attention`).
    """
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    keep = expand_block_mask(block_mask.to(torch.bool), n_q, n_k, block_m, block_n)
    if kv_lens is not None:
        keep = keep & valid_keys(kv_lens, q.shape[0], n_k, q.device).transpose(-1, -2)  # (B, 1, 1, Nk)
    if fp8:
        return _fp8_attention(q, k, v, keep, scale, block_m, block_n, kv_lens).to(q.dtype)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with every key masked is all -inf, and softmax turns it into NaN: those rows are zeros.
    probs = probs.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    block_m: int,
    block_n: int,
    kv_lens: torch.Tensor | None,
) -> torch.Tensor:
    """The FP8 kernel's computation (with one key block per step), fp32 (B, H, Nq, D).

    e4m3 operands from `quantize_fp8_reference`; an online softmax over the key blocks in ascending
    order, because P is quantised against the running row maximum, not the final one.
    keep: bool (B, H, Nq, Nk) token-level mask, kv_lens included.
    """
    n_q, n_k = q.shape[2], k.shape[2]
    ops = quantize_fp8_reference(q, k, v, block_m=block_m, block_n=block_n, kv_lens=kv_lens)
    # Scores in log2 units: the kernel folds scale * log2(e) into each query block's scale.
    row_scale = (ops.q_scale * (scale * math.log2(math.e))).repeat_interleave(block_m, dim=2)[:, :, :n_q, None]
    scores = torch.matmul(ops.q.float(), ops.k.float().transpose(-1, -2))
    v8 = ops.v_t[..., :n_k].float().transpose(-1, -2)
    m = torch.full(scores.shape[:3] + (1,), float("-inf"), device=q.device)
    l = torch.zeros_like(m)
    acc = torch.zeros(*scores.shape[:3], q.shape[3], device=q.device)
    log2_max = math.log2(E4M3_MAX)
    for j in range(ops.k_scale.shape[2]):
        cols = slice(j * block_n, min((j + 1) * block_n, n_k))
        kept = keep[..., cols]
        rows = kept.any(dim=-1, keepdim=True)  # the rows whose query block computes key block j
        step_scale = row_scale * ops.k_scale[:, :, j, None, None]
        s = scores[..., cols].masked_fill(~kept, float("-inf"))
        m_new = torch.where(rows, torch.maximum(m, s.amax(dim=-1, keepdim=True) * step_scale), m)
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s * step_scale - (m_new - log2_max))  # P * 448, as the kernel
        l = torch.where(rows, l * alpha + p.sum(dim=-1, keepdim=True), l)
        acc = torch.where(rows, acc * alpha + torch.matmul(to_e4m3(p).float(), v8[:, :, cols]), acc)
        m = m_new
    return acc / torch.where(l > 0, l, 1.0) * ops.v_scale[:, :, None, :]


def valid_key_blocks(
    batch: int, n_blocks: int, block_n: int, n_keys: int, kv_lens: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """bool (batch, n_blocks): the key blocks holding at least one valid key, i.e. starting before
    n_keys (or kv_lens[b], where smaller)."""
    n_valid = torch.full((batch,), n_keys, device=device)
    if kv_lens is not None:
        n_valid = torch.minimum(n_valid, kv_lens.to(device).long())
    return torch.arange(n_blocks, device=device)[None, :] * block_n < n_valid[:, None]


def block_lut_reference(
    block_mask: torch.Tensor, n_keys: int, block_n: int, kv_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, query block): count of kept key blocks and their indices in ascending order.

    Key blocks that start at or past the valid key count (n_keys, or kv_lens[b]) are dropped. Returns
    (counts int32 (B, H, QB), indices int64 (B, H, QB, KB)); entries past a row's count are -1.
    """
    batch, n_blocks = block_mask.shape[0], block_mask.shape[-1]
    valid = valid_key_blocks(batch, n_blocks, block_n, n_keys, kv_lens, block_mask.device)
    keep = block_mask.to(torch.bool) & valid[:, None, None, :]
    # A stable sort of "dropped" flags lists kept indices first, in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    counts = keep.sum(dim=-1, dtype=torch.int32)
    slot = torch.arange(n_blocks, device=block_mask.device)
    indices = torch.where(slot < counts[..., None], order, torch.full_like(order, -1))
    return counts, indices
