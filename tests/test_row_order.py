"""The heavy-rows-first order (Triton interpreter) against its torch reference."""
import pytest
import torch

from sparsediff.kernels.row_order import CHUNK, heavy_rows_first
from sparsediff.kernels.row_order_reference import heavy_rows_first_reference


def test_rows_go_by_decreasing_band_and_in_row_order_within_a_band():
    counts = torch.tensor([[[3, 40, 5], [64, 2, 33]]], dtype=torch.int32)  # 64 key blocks, 8 bands of 8
    # bands 0, 5, 0 | 8, 0, 4: row 3 (band 8), row 1 (5), row 5 (4), then rows 0, 2, 4 in order
    assert heavy_rows_first(counts, 64, 8).tolist() == [3, 1, 5, 0, 2, 4]
    assert heavy_rows_first_reference(counts, 64, 8).tolist() == [3, 1, 5, 0, 2, 4]


@pytest.mark.parametrize("n_rows,n_key_blocks,levels", [
    (1, 4, 8), (864, 72, 8), (CHUNK, 512, 8), (CHUNK + 1, 278, 8), (3 * CHUNK + 17, 1862, 8), (500, 10, 3),
])
def test_kernel_equals_reference(n_rows, n_key_blocks, levels):
    gen = torch.Generator().manual_seed(n_rows)
    counts = torch.randint(0, n_key_blocks + 1, (n_rows,), generator=gen, dtype=torch.int32)
    counts[::7] = n_key_blocks  # full rows, as a text segment's
    order = heavy_rows_first(counts.view(1, 1, -1), n_key_blocks, levels)
    assert order.dtype == torch.int32
    assert torch.equal(order, heavy_rows_first_reference(counts, n_key_blocks, levels))
    assert torch.equal(order.sort().values, torch.arange(n_rows, dtype=torch.int32))  # every row once
