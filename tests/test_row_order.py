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


@pytest.mark.parametrize("shape,n_key_blocks,levels", [
    ((1, 1, 1), 4, 8), ((1, 24, 36), 72, 8), ((1, 12, 256), 512, 8), ((2, 48, 139), 278, 8),
    ((1, 3, CHUNK + 17), 1862, 8), ((1, 1, 2 * CHUNK), 512, 8), ((2, 5, 100), 10, 3),
])
def test_kernel_equals_reference(shape, n_key_blocks, levels):
    # One program per head; heads with rows of one chunk and of several.
    n_rows = shape[0] * shape[1] * shape[2]
    gen = torch.Generator().manual_seed(n_rows)
    counts = torch.randint(0, n_key_blocks + 1, (n_rows,), generator=gen, dtype=torch.int32)
    counts[::7] = n_key_blocks  # full rows, as a text segment's
    counts[3::11] = 0
    order = heavy_rows_first(counts.view(shape), n_key_blocks, levels)
    assert order.dtype == torch.int32
    assert torch.equal(order, heavy_rows_first_reference(counts, n_key_blocks, levels))
    assert torch.equal(order.sort().values, torch.arange(n_rows, dtype=torch.int32))  # every row once
