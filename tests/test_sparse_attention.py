"""sparse_attention end to end, and the video-like workloads the predictors are judged on."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsediff.attention import (
    BLOCK_M,
    BLOCK_N,
    block_sparse_attention,
    predict_block_mask,
    sparse_attention,
)
from sparsediff.kernels import block_sparse_attn
from sparsediff.layout import tile_permutation
from sparsediff.workloads import to_tile_order, video_workload


def test_reexports_the_kernel():
    assert block_sparse_attention is block_sparse_attn.block_sparse_attention
    assert (BLOCK_M, BLOCK_N) == (block_sparse_attn.BLOCK_M, block_sparse_attn.BLOCK_N)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("method", ["qpool", "pooled"])
def test_cdf_one_equals_dense_sdpa(dtype, tol, method):
    q, k, v = (torch.randn(1, 2, 200, 32).to(dtype) for _ in range(3))
    o, sparsity = sparse_attention(q, k, v, 1.0, 0.0, return_sparsity=True, method=method)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)
    assert sparsity == 0.0


def test_cdf_one_with_kv_lens_equals_masked_sdpa():
    q, k, v = (torch.randn(2, 1, 160, 16) for _ in range(3))
    lens = torch.tensor([160, 90])
    o = sparse_attention(q, k, v, 1.0, 0.6, kv_lens=lens, scale=0.2)
    key_ok = torch.arange(160)[None, :] < lens[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok[:, None, None, :], scale=0.2)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
    # Key blocks wholly in the padding are no pairs to skip (mutation round 2: they were counted as skipped).
    assert sparse_attention(q, k, v, 1.0, 0.6, kv_lens=lens, scale=0.2, return_sparsity=True)[1] == 0.0


@pytest.fixture(scope="module")
def workload():
    return video_workload((4, 8, 16), heads=2, head_dim=32, text_tokens=30, seed=5)


def test_sparse_output_and_sparsity_follow_the_predicted_mask(workload):
    q, k, v = workload.q, workload.k, workload.v
    lens = torch.tensor([q.shape[2] - 10])
    kw = dict(kv_lens=lens, dense_tail_tokens=30)
    o, sparsity = sparse_attention(q, k, v, 0.98, 0.1, return_sparsity=True, **kw)
    mask = predict_block_mask(q, k, 0.98, 0.1, **kw)
    torch.testing.assert_close(o, block_sparse_attention(q, k, v, mask, kv_lens=lens))
    assert isinstance(sparsity, float)
    assert sparsity == pytest.approx(1.0 - mask.float().mean().item())  # every key block is valid here
    assert 0.0 < sparsity < 1.0
    # The predicted sparse output stays close to dense on this local workload (measured 0.058).
    key_ok = (torch.arange(q.shape[2]) < lens[0])[None, None, None, :]
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=key_ok)
    assert ((o - dense).abs().sum() / dense.abs().sum()).item() < 0.1


def test_pv_threshold_reaches_the_kernel(workload):
    q, k, v = workload.q, workload.k, workload.v
    full = torch.ones(1, 2, -(-q.shape[2] // BLOCK_M), -(-q.shape[2] // BLOCK_N), dtype=torch.bool)
    expected, skips = block_sparse_attention(q, k, v, full, pv_threshold=1.0, return_pv_skips=True)
    assert skips.sum() > 0  # the threshold does drop blocks here, so the comparison means something
    torch.testing.assert_close(sparse_attention(q, k, v, 1.0, pv_threshold=1.0), expected)
    with pytest.raises(ValueError, match="pv_threshold"):
        sparse_attention(q, k, v, pv_threshold=2.0)


def test_workload_is_deterministic_and_shaped():
    a = video_workload((2, 4, 6), heads=3, head_dim=16, text_tokens=5, seed=7, dtype=torch.bfloat16)
    b = video_workload((2, 4, 6), heads=3, head_dim=16, text_tokens=5, seed=7, dtype=torch.bfloat16)
    c = video_workload((2, 4, 6), heads=3, head_dim=16, text_tokens=5, seed=8, dtype=torch.bfloat16)
    assert a.q.shape == a.k.shape == a.v.shape == (1, 3, 2 * 4 * 6 + 5, 16)
    assert a.q.dtype == torch.bfloat16 and a.grid == (2, 4, 6) and a.text_tokens == 5
    assert torch.equal(a.q, b.q) and torch.equal(a.v, b.v) and not torch.equal(a.q, c.q)
    assert len(a.head_sigmas) == 3


def test_workload_attention_decays_with_distance():
    # A space-time-local head: a token's attention to its grid neighbours beats that to far tokens.
    w = video_workload((4, 8, 8), heads=1, head_dim=64, sinks=0, noise=0.1, seed=0)
    assert all(math.isfinite(s) for s in w.head_sigmas[0])
    p = torch.softmax(w.q[0, 0] @ w.k[0, 0].T / 8, dim=-1)
    i = 2 * 64 + 4 * 8 + 4  # (t=2, h=4, w=4)
    assert p[i, i + 1] > 10 * p[i, 0]


def test_tile_order_keeps_text_last():
    x = torch.arange(2 * 4 * 4 + 3, dtype=torch.float32).view(1, 1, -1, 1)
    y = to_tile_order(x, (2, 4, 4), (1, 2, 2))
    perm = tile_permutation((2, 4, 4), (1, 2, 2))
    assert torch.equal(y[0, 0, :32, 0], perm.float())
    assert y[0, 0, 32:, 0].tolist() == [32.0, 33.0, 34.0]
    with pytest.raises(ValueError, match=r"^x has 10 tokens, fewer than the grid's 32"):
        to_tile_order(x[..., :10, :], (2, 4, 4), (1, 2, 2))


def test_inputs_the_kernel_refuses_are_refused_before_predicting(monkeypatch):
    def no_prediction(*args, **kwargs):
        raise AssertionError("predicted before checking q, k, v")

    monkeypatch.setattr("sparsediff.attention._checked_predict", no_prediction)
    wide = torch.randn(1, 2, 256, 129)
    with pytest.raises(ValueError, match="head dim 129"):
        sparse_attention(wide, wide, wide)
    q = torch.randn(1, 2, 256, 32, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad, but sparse attention has no backward"):
        sparse_attention(q, q.detach(), q.detach())


def test_inputs_that_require_grad_are_refused_outside_no_grad():
    # The kernel writes its output outside autograd: a silent cut in the gradient is refused instead.
    q = torch.nn.Linear(32, 32)(torch.randn(1, 2, 256, 32))
    k, v = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    full = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="torch.no_grad"):
        block_sparse_attention(q, k, v, full)
    with torch.no_grad():
        torch.testing.assert_close(block_sparse_attention(q, k, v, full), F.scaled_dot_product_attention(q, k, v),
                                   atol=1e-5, rtol=1e-5)


def test_kv_lens_past_int32_are_clamped_not_wrapped():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32) for _ in range(3))
    full = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    dense = block_sparse_attention(q, k, v, full)
    for huge in (2**31, 2**32 + 100):  # int32 would read these as negative and as 100
        torch.testing.assert_close(block_sparse_attention(q, k, v, full, kv_lens=torch.tensor([huge])), dense)


def test_numpy_scale_and_dense_tail_tokens_are_taken_as_their_values():
    # np.float32(0.2) was refused as "scale must be a finite float > 0, got np.float32(0.2)", and
    # np.int64(40) as "dense_tail_tokens must be an int in [0, 300], got np.int64(40)".
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    kw = dict(cdf_threshold=0.5, sim_threshold=0.0)
    assert torch.equal(predict_block_mask(q, k, **kw, scale=np.float32(0.25), dense_tail_tokens=np.int64(40)),
                       predict_block_mask(q, k, **kw, scale=0.25, dense_tail_tokens=40))
    torch.testing.assert_close(sparse_attention(q, k, v, **kw, scale=np.float32(0.25), dense_tail_tokens=np.int64(40)),
                               sparse_attention(q, k, v, **kw, scale=0.25, dense_tail_tokens=40))
    with pytest.raises(ValueError, match="scale"):
        predict_block_mask(q, k, scale=np.float32("nan"))
    with pytest.raises(ValueError, match="dense_tail_tokens"):
        predict_block_mask(q, k, dense_tail_tokens=np.int64(301))


@pytest.mark.parametrize("grid", [(1.5, 2, 2), (2, 2, 0.5), ("a", 2, 2), (True, 2, 2), (2, 2)])
def test_workload_refuses_a_grid_of_non_integers(grid):
    # (1.5, 2, 2) was built as a (1, 2, 2) grid and recorded as one, without a word.
    with pytest.raises(ValueError, match="grid must be three positive ints"):
        video_workload(grid, heads=1, head_dim=8)
    assert video_workload((2.0, np.int64(2), 2), heads=1, head_dim=8).grid == (2, 2, 2)
