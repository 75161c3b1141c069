"""Triton kernel: the order in which the attention kernel's programs take the LUT rows, heavy rows
first (why: `block_sparse_attn`'s module docstring).

A counting sort of the rows by work band, stable, with one program per (b, h) head of rows: each
program counts the rows of every band, over all rows and over the heads before its own, which
places its band's first slot after every row of a heavier band and every row of its band in an
earlier head; then it places its own rows in order. The programs need no other's result, so the
order is built in one launch that runs on as many SMs as there are heads: 4.2, 7.6, 13.4 and
65.9 µs at FLUX's, Wan's, CogVideoX's and HunyuanVideo's shapes (H200, 2026-12-02,
scripts/tune_block_select.py). A single program sorting every row cost 17.5, 43.5 and 97.5 µs at
the first three (about 14 µs per 1,024 rows), torch's stable argsort 30-67 µs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available
from sparsediff.kernels import dependent_launch, wait_for_prior_kernel
from sparsediff.kernels.row_order_reference import heavy_rows_first_reference, work_band

CHUNK = 1024  # rows a pass reads at a time, at most (fewer when there are fewer rows)
NUM_WARPS = 4


@triton.jit
def _heavy_rows_first_kernel(counts_ptr, order_ptr, n_rows, head_rows, band_width, LEVELS_P2: tl.constexpr,
                             CHUNK: tl.constexpr, HEAD_CHUNK: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior_kernel(PDL)
    levels = tl.arange(0, LEVELS_P2)
    first_row = tl.program_id(0) * head_rows
    # Pass 1, over every row: rows per band, and rows per band in the heads before this one.
    rows_in_band = tl.zeros((LEVELS_P2,), dtype=tl.int32)
    earlier_in_band = tl.zeros((LEVELS_P2,), dtype=tl.int32)
    for start in range(0, n_rows, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        band = tl.load(counts_ptr + rows, mask=rows < n_rows, other=0) // band_width
        hit = ((band[:, None] == levels[None, :]) & (rows < n_rows)[:, None]).to(tl.int32)
        rows_in_band += tl.sum(hit, axis=0)
        earlier_in_band += tl.sum(hit * (rows < first_row).to(tl.int32)[:, None], axis=0)
    # This head's first slot in each band: every row of a heavier band, and its band's rows in
    # earlier heads, come before it.
    heavier = tl.sum(tl.where(levels[None, :] > levels[:, None], rows_in_band[None, :], 0), axis=1)
    placed = heavier + earlier_in_band
    # Pass 2, over this head's rows: each row's slot is its band's next one.
    for start in range(first_row, first_row + head_rows, HEAD_CHUNK):
        rows = start + tl.arange(0, HEAD_CHUNK)
        ok = rows < first_row + head_rows
        band = tl.load(counts_ptr + rows, mask=ok, other=0) // band_width
        hit = ((band[:, None] == levels[None, :]) & ok[:, None]).to(tl.int32)
        before = tl.cumsum(hit, axis=0) - hit  # rows of the same band earlier in this chunk
        slot = tl.sum(hit * (placed[None, :] + before), axis=1)
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
    head_rows = counts.shape[-1]
    # Counts never exceed n_key_blocks: bands 0..levels (the full rows' band may stand alone).
    # The second pass's prefix sum costs by chunk size: a head's rows alone, not CHUNK.
    _heavy_rows_first_kernel[(flat.numel() // head_rows,)](
        flat, order, flat.numel(), head_rows, work_band(n_key_blocks, levels),
        LEVELS_P2=triton.next_power_of_2(levels + 1), CHUNK=min(CHUNK, triton.next_power_of_2(flat.numel())),
        HEAD_CHUNK=min(CHUNK, triton.next_power_of_2(head_rows)), num_warps=NUM_WARPS,
        **dependent_launch(counts.device))
    return order
