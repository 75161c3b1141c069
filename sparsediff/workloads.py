"""Video-like attention workloads for judging block-mask predictors.

Tokens sit on a (T, H, W) latent grid in raster order (t slowest, w fastest), optionally followed
by a text segment. Every head attends locally with its own reach: q and k carry random Fourier
features of the token position, so q_i . k_j ~ beta * exp(-sum_d (p_i - p_j)_d^2 / (2 sigma_d^2))
(the characteristic function of a Gaussian), i.e. the logit decays with space-time distance on the
head's length scales sigma = (sigma_t, sigma_h, sigma_w); an infinite sigma makes the head global
along that axis. Content noise, a per-head shared mean (which raises block self-similarity
without changing the attention), a few global sink keys and the text segment make it less ideal.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from sparsediff.layout import tile_permutation

# Head kinds: which axes a head is local along (the others it attends across fully).
HEAD_KINDS = ("spacetime", "space", "time")


@dataclass
class Workload:
    q: torch.Tensor  # (B, H, N, D)
    k: torch.Tensor
    v: torch.Tensor
    grid: tuple[int, int, int]  # (T, H, W) of the video tokens, which come first
    text_tokens: int  # tokens after the video tokens
    head_sigmas: list[tuple[float, float, float]]  # per head (sigma_t, sigma_h, sigma_w), inf = global


def _check_grid(grid: tuple[int, int, int], name: str) -> tuple[int, int, int]:
    # `g != int(g)`: a fractional size (1.5) was truncated to a smaller grid without a word.
    if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, numbers.Real) or g != int(g) or g < 1 for g in grid):
        raise ValueError(f"{name} must be three positive ints (t, h, w), got {grid!r}")
    return tuple(int(g) for g in grid)  # type: ignore[return-value]


def grid_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """(T*H*W, 3) float positions (t, h, w) of the grid's tokens in raster order."""
    t, h, w = _check_grid(grid, "grid")
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww], dim=-1).reshape(-1, 3).float()


def to_tile_order(x: torch.Tensor, grid: tuple[int, int, int], tile: tuple[int, int, int]) -> torch.Tensor:
    """Reorder the video tokens of (B, H, N, D) `x` from raster into `tile` order
    (`sparsediff.layout.tile_permutation`); tokens after the grid (text) stay last."""
    n_video = math.prod(grid)
    if x.shape[-2] < n_video:
        raise ValueError(f"x has {x.shape[-2]} tokens, fewer than the grid's {n_video}")
    perm = tile_permutation(grid, tile, device=x.device)
    return torch.cat([x[..., perm, :], x[..., n_video:, :]], dim=-2)


def _fourier(pos: torch.Tensor, sigma: tuple[float, float, float], n_freq: int, gen: torch.Generator) -> torch.Tensor:
    """(N, 2*n_freq) features with phi(p).phi(p') ~ exp(-|(p-p')/sigma|^2 / 2) (unit norm)."""
    inv = torch.tensor([0.0 if math.isinf(s) else 1.0 / s for s in sigma], device=pos.device)
    omega = torch.randn(n_freq, 3, generator=gen, device=pos.device) * inv
    ang = pos @ omega.T
    return torch.cat([ang.cos(), ang.sin()], dim=-1) / math.sqrt(n_freq)


def video_workload(
    grid: tuple[int, int, int] = (8, 16, 16),
    heads: int = 8,
    head_dim: int = 64,
    *,
    batch: int = 1,
    text_tokens: int = 0,
    sinks: int = 4,
    sharpness: float = 12.0,
    noise: float = 0.35,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Workload:
    """Build deterministic video-like q, k, v (see the module doc).

    Deterministic for a seed and device type (the generator lives on `device`).
    sharpness: logit gap (nats) between a token's own position and a far one; noise: std of the
    content noise relative to the positional signal. Head kinds cycle through HEAD_KINDS with
    per-head random reaches (1-3 frames, 1.5-6 rows/columns).
    """
    grid = _check_grid(grid, "grid")
    if heads < 1 or head_dim < 8 or head_dim % 2:
        raise ValueError(f"heads must be >= 1 and head_dim even and >= 8, got {heads}, {head_dim}")
    if batch < 1 or text_tokens < 0 or sinks < 0:
        raise ValueError("batch must be >= 1, text_tokens and sinks >= 0")
    dev = torch.device(device)
    gen = torch.Generator(dev).manual_seed(seed)  # built on `device`: values differ per device type
    pos = grid_positions(grid).to(dev)
    n_video, d = pos.shape[0], head_dim
    n = n_video + text_tokens
    amp = math.sqrt(sharpness * math.sqrt(d))  # q.k * d**-0.5 reaches `sharpness` at distance 0
    qs, ks, vs, sigmas = [], [], [], []
    for hd in range(heads):
        kind = HEAD_KINDS[hd % len(HEAD_KINDS)]
        st = 1.0 + 2.0 * torch.rand(1, generator=gen, device=dev).item()
        ss = 1.5 + 4.5 * torch.rand(1, generator=gen, device=dev).item()
        sigma = {
            "spacetime": (st, ss, ss),
            "space": (math.inf, ss, ss),
            "time": (st, math.inf, math.inf),
        }[kind]
        sigmas.append(sigma)
        # Positional part: the same features in q and k, so the logit peaks at zero distance.
        feat = _fourier(pos, sigma, d // 2, gen) * amp  # (n_video, d)
        qh = torch.zeros(batch, n, d, device=dev)
        kh = torch.zeros(batch, n, d, device=dev)
        qh[:, :n_video] = feat
        kh[:, :n_video] = feat
        # Text: content-only tokens that every query attends to a little, and that attend broadly.
        qh[:, n_video:] = torch.randn(batch, text_tokens, d, generator=gen, device=dev) * amp / math.sqrt(d)
        kh[:, n_video:] = torch.randn(batch, text_tokens, d, generator=gen, device=dev) * amp / math.sqrt(d)
        qh += torch.randn(batch, n, d, generator=gen, device=dev) * noise * amp / math.sqrt(d)
        kh += torch.randn(batch, n, d, generator=gen, device=dev) * noise * amp / math.sqrt(d)
        # Shared means along two fixed orthogonal directions: raises the self-similarity of
        # blocks by a per-head amount while adding (almost) nothing to q.k.
        basis = torch.linalg.qr(torch.randn(d, 3, generator=gen, device=dev))[0].T  # 3 orthonormal rows
        mean_strength = 1.5 * torch.rand(1, generator=gen, device=dev).item() * amp
        qh += mean_strength * basis[0]
        kh += mean_strength * basis[1]
        # Sinks: a few video keys that every query likes (logit bonus ~ sharpness).
        if sinks:
            idx = torch.randperm(n_video, generator=gen, device=dev)[:sinks]
            g = math.sqrt(sharpness * math.sqrt(d))
            qh += 0.5 * g * basis[2]
            kh[:, idx] += 2.0 * g * basis[2]
        # Values: smooth in space-time plus content, so errors are measured on a realistic signal.
        vfeat = _fourier(pos, (4.0, 8.0, 8.0), d // 2, gen) * math.sqrt(d)
        vh = torch.randn(batch, n, d, generator=gen, device=dev) * 0.5
        vh[:, :n_video] += vfeat
        qs.append(qh)
        ks.append(kh)
        vs.append(vh)
    q, k, v = (torch.stack(xs, dim=1).to(device=device, dtype=dtype) for xs in (qs, ks, vs))
    return Workload(q, k, v, grid, text_tokens, sigmas)
