"""Plain-torch reference of block-sparse attention; also the CPU fallback without the interpreter.

Materialises the token-level mask and the full score matrix, so it is meant for small shapes.
"""
from __future__ import annotations

import math

import torch


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
) -> torch.Tensor:
    """Masked softmax attention in fp32; rows that keep no valid key return zeros.

    Arguments are assumed validated (see `block_sparse_attention`): q (B, H, Nq, D), k/v (B, H, Nk, D),
    block_mask bool (B, H, ceil(Nq/block_m), ceil(Nk/block_n)), kv_lens int (B,) or None.
    """
    n_q, n_k, head_dim = q.shape[2], k.shape[2], q.shape[3]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    keep = expand_block_mask(block_mask.to(torch.bool), n_q, n_k, block_m, block_n)
    if kv_lens is not None:
        key_ok = torch.arange(n_k, device=q.device)[None, :] < kv_lens.to(q.device).long()[:, None]
        keep = keep & key_ok[:, None, None, :]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A row with every key masked is all -inf, and softmax turns it into NaN: those rows are zeros.
    probs = probs.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, v.float()).to(q.dtype)


def block_lut_reference(
    block_mask: torch.Tensor, n_keys: int, block_n: int, kv_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (b, h, query block): count of kept key blocks and their indices in ascending order.

    Key blocks that start at or past the valid key count (n_keys, or kv_lens[b]) are dropped. Returns
    (counts int32 (B, H, QB), indices int64 (B, H, QB, KB)); entries past a row's count are -1.
    """
    n_blocks = block_mask.shape[-1]
    n_valid = torch.full((block_mask.shape[0],), n_keys, dtype=torch.long, device=block_mask.device)
    if kv_lens is not None:
        n_valid = torch.minimum(n_valid, kv_lens.to(block_mask.device).long())
    block_start = torch.arange(n_blocks, device=block_mask.device) * block_n
    keep = block_mask.to(torch.bool) & (block_start[None, :] < n_valid[:, None])[:, None, None, :]
    # A stable sort of "dropped" flags lists kept indices first, in ascending order.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    counts = keep.sum(dim=-1, dtype=torch.int32)
    slot = torch.arange(n_blocks, device=block_mask.device)
    indices = torch.where(slot < counts[..., None], order, torch.full_like(order, -1))
    return counts, indices
