"""Plain-torch reference of `row_order.heavy_rows_first`."""
from __future__ import annotations

import torch


def work_band(n_key_blocks: int, levels: int) -> int:
    """Kept key blocks per work band: `levels` equal bands of a row's kept fraction (the last, of
    full rows, may hold fewer)."""
    return -(-n_key_blocks // levels)


def heavy_rows_first_reference(counts: torch.Tensor, n_key_blocks: int, levels: int) -> torch.Tensor:
    """Flat row indices of `counts` (any shape, int) by decreasing band, rows of a band in row
    order: int32."""
    band = counts.reshape(-1) // work_band(n_key_blocks, levels)
    return torch.argsort(band, descending=True, stable=True).to(torch.int32)
