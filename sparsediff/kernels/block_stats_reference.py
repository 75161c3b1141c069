"""Plain-torch reference of `block_stats`: per-block mean token and self-similarity."""
from __future__ import annotations

import torch


def block_stats_reference(
    x: torch.Tensor, block: int, valid_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool (B, H, N, D) `x` and measure how alike each block's tokens are.

    Returns `pooled` (B, H, ceil(N/block), D) fp32, the mean of each block's valid tokens (0 where
    none is valid), and `sim` (B, H, ceil(N/block)) fp32, each block's mean pairwise cosine
    similarity over its valid tokens, excluding self-pairs: (|sum x_hat|^2 - n) / (n (n - 1)), 1
    for blocks with fewer than two valid tokens. (SpargeAttn's code includes the self-pairs,
    |sum x_hat|^2 / n^2.) Tokens at index >= valid_len[b] are absent (right padding);
    valid_len=None means all are valid.
    """
    b, h, n, d = x.shape
    nb = -(-n // block)
    xf = x.float()
    idx = torch.arange(n, device=x.device)
    lens = torch.full((b,), n, device=x.device) if valid_len is None else valid_len.to(x.device)
    valid = (idx[None, :] < lens[:, None]).float()[:, None, :, None]  # (B, 1, N, 1)
    xf = xf * valid
    xhat = xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def block_sums(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t, (0, 0, 0, nb * block - n))
        return t.reshape(*t.shape[:2], nb, block, t.shape[-1]).sum(dim=3)

    counts = block_sums(valid.expand(b, 1, n, 1))  # (B, 1, nb, 1)
    pooled = block_sums(xf) / counts.clamp_min(1)
    cnt = counts[..., 0]
    s2 = block_sums(xhat).pow(2).sum(-1)
    sim = torch.where(cnt >= 2, (s2 - cnt) / (cnt * (cnt - 1)).clamp_min(1), torch.ones_like(s2))
    return pooled, sim
