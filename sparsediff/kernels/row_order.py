"""Triton kernel: the order in which the attention kernel's programs take the LUT rows, heavy rows
first (why: `block_sparse_attn`'s module docstring).

A counting sort of the rows by work band, in one program: a first pass counts the rows of each
band, a second places each row after every row of a heavier band and after the rows of its own
band that precede it, so rows of a band keep their order. One launch whatever the row count, and
a few microseconds at the model shapes, where torch's stable argsort took 30-67 µs (H200,
scripts/tune_row_order.py, 2026-12-02): at FLUX's shape as long as a sparse call's prediction.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available
from sparsediff.kernels.row_order_reference import heavy_rows_first_reference, work_band

CHUNK = 1024  # rows a pass reads at a time
NUM_WARPS = 4


@triton.jit
def _heavy_rows_first_kernel(counts_ptr, order_ptr, n_rows, band_width, LEVELS_P2: tl.constexpr,
                             CHUNK: tl.constexpr):
    levels = tl.arange(0, LEVELS_P2)
    # Pass 1: rows per band.
    rows_in_band = tl.zeros((LEVELS_P2,), dtype=tl.int32)
    for start in range(0, n_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        band = tl.load(counts_ptr + rows, mask=rows < n_rows, other=0) // band_width
        hit = (band[:, None] == levels[None, :]) & (rows < n_rows)[:, None]
        rows_in_band += tl.sum(hit.to(tl.int32), axis=0)
    # A band's first slot: the rows of every heavier band come before it.
    heavier = tl.sum(tl.where(levels[None, :] > levels[:, None], rows_in_band[None, :], 0), axis=1)
    # Pass 2: each row's slot is its band's first slot plus the rows of its band placed before it.
    placed = tl.zeros((LEVELS_P2,), dtype=tl.int32)
    for start in range(0, n_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        ok = rows < n_rows
        band = tl.load(counts_ptr + rows, mask=ok, other=0) // band_width
        hit = ((band[:, None] == levels[None, :]) & ok[:, None]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit  # rows of the same band earlier in this chunk
        slot = tl.sum(hit * (heavier[None, :] + placed[None, :] + before), axis=1)
        tl.store(order_ptr + slot, rows, mask=ok)
        placed += tl.sum(hit, axis=0)


def heavy_rows_first(counts: torch.Tensor, n_key_blocks: int, levels: int) -> torch.Tensor:
    """Flat row indices of a LUT's counts (B, H, QB) by decreasing work band (`levels` equal bands
    of the kept fraction of `n_key_blocks`), rows of a band in row order: int32 (B*H*QB,). The
    Triton kernel where kernels are available, else the torch reference."""
    if not kernels_available(counts.device):
        return heavy_rows_first_reference(counts, n_key_blocks, levels)
    flat = counts.reshape(-1)
    order = torch.empty(flat.numel(), dtype=torch.int32, device=counts.device)
    # Counts never exceed n_key_blocks: bands 0..levels (the full rows' band may stand alone).
    _heavy_rows_first_kernel[(1,)](flat, order, flat.numel(), work_band(n_key_blocks, levels),
                                   LEVELS_P2=triton.next_power_of_2(levels + 1), CHUNK=CHUNK, num_warps=NUM_WARPS)
    return order
