import math

import pytest
import torch
import torch.nn.functional as F

from sparsediff.layout import choose_tile, inverse_permutation, tile_permutation, token_permutation


@pytest.mark.parametrize("grid,tile", [((3, 5, 7), (2, 2, 4)), ((21, 30, 52), (2, 8, 8)), ((1, 9, 9), (1, 4, 4)),
                                       ((4, 8, 8), (2, 4, 4)), ((2, 3), (2, 2))])
def test_tile_permutation_is_a_permutation_even_with_ragged_tiles(grid, tile):
    perm = tile_permutation(grid, tile)
    n = math.prod(grid)
    assert perm.dtype == torch.long
    assert torch.equal(perm.sort().values, torch.arange(n))
    x = torch.randn(n, 3)
    assert torch.equal(x.index_select(0, perm).index_select(0, inverse_permutation(perm)), x)


def test_tiles_are_contiguous_space_time_cubes():
    grid, tile = (4, 8, 8), (2, 4, 4)
    perm = tile_permutation(grid, tile)
    t, rem = perm // 64, perm % 64
    h, w = rem // 8, rem % 8
    for i in range(0, 256, 32):  # every run of 32 tokens is one 2x4x4 cube
        cube = torch.stack([t[i:i + 32], h[i:i + 32], w[i:i + 32]], 1)
        extent = cube.max(0).values - cube.min(0).values + 1
        assert extent.tolist() == [2, 4, 4]
    # inside a tile: raster order; the first tile starts at the origin
    assert perm[:5].tolist() == [0, 1, 2, 3, 8]


def test_ragged_edge_tile_holds_the_leftover_tokens():
    perm = tile_permutation((1, 5, 5), (1, 4, 4))  # tiles of 16, 4, 4, 1 tokens
    assert set(perm[:16].tolist()) == {r * 5 + c for r in range(4) for c in range(4)}
    assert set(perm[16:20].tolist()) == {r * 5 + 4 for r in range(4)}
    assert set(perm[20:24].tolist()) == {20 + c for c in range(4)}
    assert perm[24].item() == 24


@pytest.mark.parametrize("grid", [(21, 30, 52), (13, 30, 45), (33, 45, 80), (2, 16, 24), (64, 64), (1, 5, 7)])
def test_choose_tile_fits_the_grid_and_fills_a_block(grid):
    tile = choose_tile(grid, 128)
    full = grid if len(grid) == 3 else (1, *grid)
    assert len(tile) == 3 and all(1 <= a <= b for a, b in zip(tile, full))
    if all(d >= 8 for d in full[1:]) and full[0] >= 2:
        assert math.prod(tile) == 128
    if len(grid) == 2:
        assert tile[0] == 1


def test_choose_tile_picks_the_most_compact_tile_that_divides_the_grid():
    # every 128-token tile with t <= 4 divides (4, 16, 16); (4, 4, 8) has the least surface
    assert choose_tile((4, 16, 16), 128) == (4, 4, 8)
    assert choose_tile((64, 64), 128) == (1, 8, 16)
    # a ragged fit loses to a divisible one of equal compactness
    assert choose_tile((4, 16, 12), 128) == (4, 8, 4)


def test_token_permutation_puts_text_last():
    grid = (2, 4, 4)
    for text_first in (False, True):
        perm = token_permutation(grid, order="tiles", tile=(1, 2, 2), text_tokens=3, text_first=text_first)
        text = list(range(3)) if text_first else list(range(32, 35))
        assert perm[-3:].tolist() == text
        assert torch.equal(perm.sort().values, torch.arange(35))
    # raster: identity unless text has to move
    assert token_permutation(grid, order="raster", text_tokens=3) is None
    assert token_permutation(32, order="raster", text_tokens=3, text_first=True).tolist() == list(range(3, 35)) + [0, 1, 2]


def test_token_permutation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        token_permutation((2, 4, 4), order="zigzag")
    with pytest.raises(ValueError, match="video"):
        token_permutation(32, order="tiles")
    with pytest.raises(ValueError, match="text_tokens"):
        token_permutation((2, 4, 4), text_tokens=-1)
    with pytest.raises(ValueError, match="grid"):
        tile_permutation((2, 0, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="block_tokens"):
        choose_tile((2, 4, 4), 0)


def test_dense_attention_does_not_change_under_the_layout():
    grid, n_text = (3, 6, 10), 7
    n = math.prod(grid) + n_text
    q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    perm = token_permutation(grid, order="tiles", text_tokens=n_text, text_first=True)
    out = F.scaled_dot_product_attention(*(x.index_select(2, perm) for x in (q, k, v)))
    torch.testing.assert_close(out.index_select(2, inverse_permutation(perm)), ref)
