"""Plain-torch reference of `block_select`: block-mass estimate from per-row features, then
top-CDF selection per query block."""
from __future__ import annotations

import torch

# Query blocks scored at once; bounds the (rows x key feature rows) score matrix in memory.
_CHUNK_ROWS = 4096


def feature_scores(
    qf: torch.Tensor, kf: torch.Tensor, stride: int, scale: float, k_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores between feature rows: scale / stride * sum_s qf[a*S + S-1-s] . kf[b*S + s].

    stride 1 is a plain scaled dot product (pooled features); stride S > 1 on raw q/k sums each
    S x S sub-block's anti-diagonal (XAttention), averaged over its products of tokens that are
    there: a ragged sub-block (past the end of q or k, or past the valid keys, k_valid: bool
    (B, 1, Nk, 1)) is averaged over its fewer products, not biased towards 0 by padding (softmax
    invariance: a per-query logit offset must not favour it); -inf where it has none. A ragged
    last query sub-row of r < S tokens takes the anti-diagonal of its r x r corner,
    sum_{s<r} qf[a*S + r-1-s] . kf[b*S + s], so that it meets every key sub-row that has a key
    (the full anti-diagonal's products with a last key sub-row of at most S - r keys are all absent).
    """
    def rows(x: torch.Tensor, flip: bool) -> torch.Tensor:
        n = x.shape[-2]
        m = -(-n // stride)
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, m * stride - n))
        x = x.reshape(*x.shape[:-2], m, stride, x.shape[-1])
        if flip:
            x = x.flip(-2)
            if n < m * stride:  # the ragged last row: its r tokens reversed first, the padding after
                x = torch.cat([x[..., :-1, :, :], x[..., -1:, :, :].roll(n - m * stride, dims=-2)], dim=-3)
        return x.flatten(-2)

    if stride == 1:
        return rows(qf, True) @ rows(kf, False).transpose(-1, -2) * scale
    if k_valid is None:
        k_valid = torch.ones(1, 1, kf.shape[-2], 1, dtype=torch.bool, device=kf.device)
    kf = torch.where(k_valid, kf.float(), 0.0)
    q_there = torch.ones(1, 1, qf.shape[-2], 1, device=qf.device)
    count = rows(q_there, True) @ rows(k_valid.float(), False).transpose(-1, -2)
    sums = rows(qf, True) @ rows(kf, False).transpose(-1, -2)
    return torch.where(count > 0, sums * scale / count.clamp_min(1), float("-inf"))


def top_cdf(mass: torch.Tensor, cdf_threshold: torch.Tensor) -> torch.Tensor:
    """Keep, per row of (B, H, nq, nk) `mass`, every block at least as heavy as the lightest of the
    fewest heaviest blocks whose sum reaches cdf_threshold[h] of the row's total (ties kept).
    A threshold >= 1 keeps every block."""
    srt = mass.sort(dim=-1, descending=True).values
    thr = cdf_threshold.to(mass).view(1, -1, 1, 1)
    target = srt.sum(-1, keepdim=True) * thr
    count = (srt.cumsum(-1) < target).sum(-1, keepdim=True).clamp_max(mass.shape[-1] - 1)
    keep = mass >= srt.gather(-1, count)
    return keep | (thr >= 1)


def block_mass_reference(
    qf: torch.Tensor,
    kf: torch.Tensor,
    *,
    stride: int,
    q_tokens: int,
    k_tokens: int,
    n_tokens: int,
    block_m: int,
    block_n: int,
    scale: float,
    kv_lens: torch.Tensor | None = None,
    k_trusted: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted attention mass (B, H, nq, nk) fp32 of each block pair; rows sum to 1.

    Feature row a of qf covers q_tokens query tokens (b of kf: k_tokens keys). For each query
    feature row, softmax over all key feature rows of score + log(#valid keys it covers) (so a
    short or padded row doesn't count as full; untrusted key blocks get -inf), summed over the key
    rows of each key block, then averaged over the rows of each query block weighted by their
    valid query tokens: the blockwise analogue of the true mean-over-queries block mass.
    """
    b, h = qf.shape[:2]
    nq, nk = -(-n_tokens // block_m), -(-n_tokens // block_n)
    rq, rk = block_m // q_tokens, block_n // k_tokens
    mq, mk = nq * rq, nk * rk
    dev = qf.device
    lens = torch.full((b,), n_tokens, device=dev) if kv_lens is None else kv_lens.to(dev)
    kcount = (lens[:, None] - torch.arange(mk, device=dev)[None, :] * k_tokens).clamp(0, k_tokens)
    logw = kcount.float().log()[:, None, :].expand(b, h, mk)  # log 0 = -inf: no valid key
    if k_trusted is not None:
        logw = logw.masked_fill(~k_trusted.repeat_interleave(rk, dim=-1), float("-inf"))
    wq = (n_tokens - torch.arange(mq, device=dev) * q_tokens).clamp(0, q_tokens).float()
    k_valid = (torch.arange(kf.shape[-2], device=dev)[None, :] < lens[:, None])[:, None, :, None] if stride > 1 else None
    mass = torch.empty(b, h, nq, nk, device=dev)
    step = max(1, _CHUNK_ROWS // rq)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        rows = slice(i0 * rq * stride, i1 * rq * stride)
        s = feature_scores(qf[..., rows, :], kf, stride, scale, k_valid)[..., : mk]
        s = torch.nn.functional.pad(s, (0, mk - s.shape[-1]), value=float("-inf")) + logw[:, :, None, :]
        s = torch.nn.functional.pad(s, (0, 0, 0, (i1 - i0) * rq - s.shape[-2]))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no trusted valid key: 0
        w = wq[i0 * rq : i1 * rq].view(i1 - i0, rq)
        p = p.view(b, h, i1 - i0, rq, nk, rk).sum(-1)
        mass[:, :, i0:i1] = (p * w[..., None]).sum(3) / w.sum(-1).clamp_min(1)[:, None]
    return mass


def block_select_reference(qf: torch.Tensor, kf: torch.Tensor, cdf_threshold: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_mass_reference` (keywords as there) then `top_cdf`: returns (mask, mass)."""
    mass = block_mass_reference(qf, kf, **kw)
    return top_cdf(mass, cdf_threshold), mass
