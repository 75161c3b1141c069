"""Token orders for block-sparse attention: 3D space-time tiles (2D for images) and their inverses.

A block of BLOCK_M consecutive tokens is what the mask predictor pools into one summary, so the order
of the tokens decides what a block *is*. In raster (t, h, w) order a block of 128 tokens is a thin
strip of a few latent rows; in tile order it is a small space-time cube. Which order lets the pooled
predictor skip more blocks is an empirical question (see DESIGN.md), so both are offered.

Conventions: a permutation `perm` is a LongTensor where position i of the new order holds the token
at old index perm[i], i.e. `x_new = x.index_select(dim, perm)`; `inverse_permutation(perm)` undoes it.
Text/conditioning tokens form their own segment, always placed LAST in the new order, so the
attention call can pass `dense_tail_tokens=<text length>`.
"""
from __future__ import annotations

import math
from itertools import product

import torch

TOKEN_ORDERS = ("tiles", "raster")

Grid = tuple[int, int, int]


def _as_grid(grid: tuple[int, ...], name: str) -> Grid:
    """A 3-tuple (t, h, w) of positive ints; a 2-tuple (h, w) is an image, t = 1."""
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3):
        raise ValueError(f"{name} must be a tuple (t, h, w) or (h, w), got {grid!r}")
    dims = tuple(grid) if len(grid) == 3 else (1, *grid)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
        raise ValueError(f"{name} must hold positive ints, got {grid!r}")
    return dims  # type: ignore[return-value]


def tile_permutation(grid: tuple[int, ...], tile: tuple[int, ...], device: torch.device | str | None = None) -> torch.LongTensor:
    """Order of the raster (t, h, w) tokens of `grid` that walks `tile`-shaped tiles one after another.

    Tiles are visited in raster order of the tile grid and tokens in raster order inside each tile.
    Where a grid size is not a multiple of the tile size the last tile along that axis is smaller
    (ragged edge): the result is still a permutation of range(t*h*w).
    """
    t, h, w = _as_grid(grid, "grid")
    tt, th, tw = _as_grid(tile, "tile")
    idx = torch.arange(t * h * w, device=device)
    ti, rem = idx // (h * w), idx % (h * w)
    hi, wi = rem // w, rem % w
    n_th, n_tw = math.ceil(h / th), math.ceil(w / tw)
    tile_id = ((ti // tt) * n_th + hi // th) * n_tw + wi // tw
    # Raster index is monotone in (t, h, w), so sorting by (tile id, raster index) gives raster order
    # inside each tile.
    return torch.argsort(tile_id * (t * h * w) + idx)


def inverse_permutation(perm: torch.Tensor) -> torch.LongTensor:
    """The permutation `inv` with x.index_select(0, perm).index_select(0, inv) == x."""
    if perm.ndim != 1 or perm.dtype != torch.long:
        raise ValueError(f"perm must be a 1-D LongTensor, got {perm.dtype} {tuple(perm.shape)}")
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tile(grid: tuple[int, ...], block_tokens: int) -> Grid:
    """A tile shape for `grid` whose volume is `block_tokens` (one query block = one tile).

    Candidates are the factorisations of `block_tokens` that fit in the grid. Among them the tile
    minimises (tiles needed / ideal tile count) x (tile surface / surface of a cube of equal volume):
    the first factor counts the ragged edge fragments a block then straddles, the second how far from
    a compact cube the tile is. If no factorisation fits (small grids), the largest fitting tile made
    of divisors of `block_tokens` is used. A 2-tuple grid (image) gets a (1, th, tw) tile.
    """
    t, h, w = _as_grid(grid, "grid")
    if not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens must be a positive int, got {block_tokens!r}")
    divs = _divisors(block_tokens)
    fitting = [c for c in product(divs, repeat=3) if c[0] <= t and c[1] <= h and c[2] <= w
               and c[0] * c[1] * c[2] <= block_tokens]
    best_volume = max(math.prod(c) for c in fitting)  # (1, 1, 1) always fits
    n_tokens = t * h * w

    def cost(c: Grid) -> tuple[float, Grid]:
        tiles = math.ceil(t / c[0]) * math.ceil(h / c[1]) * math.ceil(w / c[2])
        fill = tiles * math.prod(c) / n_tokens
        surface = c[0] * c[1] + c[1] * c[2] + c[0] * c[2]
        cube = 3 * math.prod(c) ** (2 / 3)
        return fill * surface / cube, c  # the tile itself breaks ties deterministically

    return min((c for c in fitting if math.prod(c) == best_volume), key=cost)


def token_permutation(
    video: tuple[int, ...] | int,
    *,
    order: str = "tiles",
    text_tokens: int = 0,
    text_first: bool = False,
    block_tokens: int = 128,
    tile: tuple[int, ...] | None = None,
    device: torch.device | str | None = None,
) -> torch.LongTensor | None:
    """Permutation of a joint [video ; text] (or [text ; video]) sequence into the attention order.

    `video` is the latent grid (t, h, w) / (h, w) of the video tokens, held in raster order, or just
    their count when their arrangement is unknown (then only order="raster" is possible). The video
    segment is put in `order` ("tiles": `tile`, or `choose_tile(grid, block_tokens)`; "raster":
    unchanged) and the `text_tokens` text tokens follow it in their own order. Returns None when the
    result is the identity, so callers can skip the gather.
    """
    if order not in TOKEN_ORDERS:
        raise ValueError(f"order must be one of {TOKEN_ORDERS}, got {order!r}")
    if not isinstance(text_tokens, int) or isinstance(text_tokens, bool) or text_tokens < 0:
        raise ValueError(f"text_tokens must be a non-negative int, got {text_tokens!r}")
    if isinstance(video, int) and not isinstance(video, bool):
        if video < 0:
            raise ValueError(f"video must be a grid or a non-negative token count, got {video!r}")
        if order == "tiles":
            raise ValueError("video must be a grid (t, h, w) for order='tiles', got a token count")
        n_video = video
    else:
        n_video = math.prod(_as_grid(video, "video"))
    if order == "raster":
        if text_tokens == 0 or not text_first:
            return None
        idx = torch.arange(text_tokens + n_video, device=device)
        return torch.cat([idx[text_tokens:], idx[:text_tokens]])
    perm = tile_permutation(video, tile if tile is not None else choose_tile(video, block_tokens), device)
    if text_first:
        return torch.cat([perm + text_tokens, torch.arange(text_tokens, device=device)])
    return torch.cat([perm, torch.arange(n_video, n_video + text_tokens, device=device)])


def stored_bnhd(x: torch.Tensor) -> bool:
    """x (B, H, N, D) is a view of a (B, N, H, D) tensor (diffusers' dispatch layout)."""
    return x.stride(1) < x.stride(2)


def empty_stored_like(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """An empty (B, H, n_tokens, D) tensor of x's dtype and device, stored as x is: (B, N, H, D) or (B, H, N, D)."""
    b, h, _, d = x.shape
    if stored_bnhd(x):
        return torch.empty(b, n_tokens, h, d, dtype=x.dtype, device=x.device).transpose(1, 2)
    return torch.empty(b, h, n_tokens, d, dtype=x.dtype, device=x.device)
