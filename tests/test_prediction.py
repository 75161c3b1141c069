"""Block-mask prediction: Triton kernels vs references, stage-1 rules, thresholds, arguments."""
import numpy as np
import pytest
import torch

from sparsediff.attention import (
    BLOCK_M, BLOCK_N, METHODS, SAMPLED_QUERIES, head_thresholds, predict_block_mask, predict_block_masks, predict_with,
    sample_rows,
)
from sparsediff.kernels import block_select as block_select_module
from sparsediff.kernels import block_sparse_attn as block_sparse_attn_module
from sparsediff.kernels import block_stats as block_stats_module
from sparsediff.kernels.block_select import block_select, select_top_cdf
from sparsediff.kernels.block_select_reference import block_mass_reference, block_select_reference, top_cdf
from sparsediff.kernels.block_stats import block_stats
from sparsediff.kernels.block_stats_reference import block_stats_reference
from sparsediff.workloads import video_workload


def _strided(x: torch.Tensor) -> torch.Tensor:
    """The same values as a (B, N, H, D) tensor viewed as (B, H, N, D), like diffusers passes."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,block,lens",
    [((1, 2, 300, 16), 128, None), ((2, 1, 200, 64), 64, [200, 70]), ((1, 1, 64, 40), 128, None),
     ((1, 1, 70, 8), 16, [50])],  # the last: blocks shorter than a chunk of rows
)
@pytest.mark.parametrize("chunked", [False, True])  # True: the GPU's row chunks, run by the interpreter
def test_block_stats_matches_reference(dtype, shape, block, lens, chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(block_stats_module, "triton_interpreting", lambda: False)
    x = _strided(torch.randn(*shape).to(dtype))
    lens = torch.tensor(lens) if lens is not None else None
    pooled, sim, below = block_stats(x, block, lens)
    ref_pooled, ref_sim = block_stats_reference(x, block, lens)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sim, ref_sim, atol=1e-5, rtol=1e-5)
    assert below is None
    # Per-head thresholds at the blocks' own similarities (ties count as not below) and beside them.
    heads = shape[1]
    for thresholds in (ref_sim[0, :, 0], ref_sim[0, :, 0] + 1e-3, torch.full((heads,), float("nan"))):
        unpooled, sim_alone, below = block_stats(x, block, lens, pooled=False, sim_below=thresholds.float().contiguous())
        assert unpooled is None
        torch.testing.assert_close(sim_alone, ref_sim, atol=1e-5, rtol=1e-5)
        thr = thresholds.view(1, -1, 1)
        assert torch.equal(below, ~(sim_alone >= thr) & ~(thr <= 0))  # a threshold of 0 (or below) trusts all
    with pytest.raises(ValueError, match="sim_below"):
        block_stats(x, block, lens, sim_below=torch.zeros(heads + 1))


def test_self_similarity_definition():
    x = torch.randn(1, 1, 3, 8)
    x[0, 0, 1] = 2 * x[0, 0, 0]  # a copy (cosine 1) of token 0
    cos = torch.nn.functional.cosine_similarity
    pairs = [cos(x[0, 0, i], x[0, 0, j], dim=0) for i, j in ((0, 1), (0, 2), (1, 2))]
    sim = block_stats_reference(x, 4)[1]
    torch.testing.assert_close(sim, torch.stack(pairs).mean().view(1, 1, 1))
    assert block_stats_reference(x[..., :1, :], 4)[1].item() == 1.0  # one token: trusted


def _features(method, q, k, lens):
    if method in SAMPLED_QUERIES:
        samples = SAMPLED_QUERIES[method]
        return q[:, :, sample_rows(q.shape[2], samples)], k, dict(stride=1, q_tokens=128 // samples, k_tokens=1)
    if method == "qpool":
        return block_stats_reference(q, 128)[0], k, dict(stride=1, q_tokens=128, k_tokens=1)
    if method == "pooled":
        qf, kf = block_stats_reference(q, 128)[0], block_stats_reference(k, 64, lens)[0]
        return qf, kf, dict(stride=1, q_tokens=128, k_tokens=64)
    return q, k, dict(stride=8, q_tokens=8, k_tokens=8)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape,dtype,lens,trust",
    [((1, 2, 300, 32), torch.float32, None, False), ((2, 2, 520, 64), torch.bfloat16, [520, 300], True),
     ((1, 1, 130, 16), torch.float16, None, True),
     ((1, 1, 200, 20), torch.bfloat16, None, False)],  # rows of 40 bytes: copied for TMA, head dim padded
)
def test_block_select_matches_reference(method, shape, dtype, lens, trust):
    b, h, n, d = shape
    q, k = _strided(torch.randn(*shape).to(dtype) * 2), torch.randn(*shape).to(dtype) * 2
    lens = torch.tensor(lens) if lens is not None else None
    k_trusted = torch.rand(b, h, -(-n // 64)) > 0.3 if trust else None
    qf, kf, geometry = _features(method, q, k, lens)
    kw = dict(n_tokens=n, block_m=128, block_n=64, scale=d**-0.5, kv_lens=lens, k_trusted=k_trusted, **geometry)
    thr = torch.tensor([0.9, 0.6])[:h]
    mask, mass = block_select(qf, kf, thr, **kw)
    ref_mask, ref_mass = block_select_reference(qf, kf, thr, **kw)
    torch.testing.assert_close(mass, ref_mass, atol=1e-5, rtol=1e-4)
    # Float sums in another order may move a cutoff that sits exactly on a tie: allow 1%.
    assert (mask != ref_mask).float().mean() <= 0.01
    rows = mass.sum(-1)
    assert torch.allclose(rows[rows > 0], torch.ones_like(rows[rows > 0]), atol=1e-4)


def test_strided_thresholds_and_query_rows_are_read_as_their_values():
    # (H,) thresholds and (M,) row indices of stride 2: the kernels read entry i, not offset i.
    x = torch.randn(1, 2, 300, 32) + 0.3
    sim = torch.tensor([0.9, 0.9, 0.0, 0.9])[::2]
    assert torch.equal(block_stats(x, 64, sim_below=sim)[2], block_stats(x, 64, sim_below=sim.contiguous())[2])
    rows = sample_rows(300, 2)
    kw = dict(stride=1, q_tokens=64, k_tokens=1, n_tokens=300, block_m=BLOCK_M, block_n=BLOCK_N, scale=0.2)
    strided = block_select(x, x, torch.full((2,), 0.9), q_rows=rows.repeat_interleave(2)[::2], **kw)
    assert torch.equal(strided[1], block_select(x, x, torch.full((2,), 0.9), q_rows=rows, **kw)[1])


@pytest.mark.parametrize("method", ["sampled", "antidiag"])
def test_block_select_chunks_and_tile_groups_agree(monkeypatch, method):
    # Scratch-bounded chunks of query blocks and several key tiles per program give the same result.
    q, k = torch.randn(2, 2, 600, 32) * 2, torch.randn(2, 2, 600, 32) * 2
    qf, kf, geometry = _features(method, q, k, None)
    kw = dict(n_tokens=600, block_m=128, block_n=64, scale=32**-0.5, **geometry)
    thr = torch.tensor([0.9, 0.7])
    whole = block_select(qf, kf, thr, **kw)
    monkeypatch.setattr(block_select_module, "PARTIAL_ELEMENTS", 1)  # one query block a chunk
    monkeypatch.setattr(block_select_module, "KEY_ROWS", 64 if method == "sampled" else 16)
    monkeypatch.setattr(block_select_module, "TARGET_PROGRAMS", 1)  # as many key tiles a program as allowed
    configs = {key: config._replace(max_tiles=3) for key, config in block_select_module.PARTIAL_CONFIGS.items()}
    monkeypatch.setattr(block_select_module, "PARTIAL_CONFIGS", configs)  # 3 tiles: not dividing the tile count
    parts = block_select(qf, kf, thr, **kw)
    torch.testing.assert_close(parts[1], whole[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts[1], block_mass_reference(qf, kf, **kw), atol=1e-5, rtol=1e-4)
    assert (parts[0] != whole[0]).float().mean() <= 0.01


def test_block_select_rejects_non_positive_scale():
    q, k = torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    qf, kf, geometry = _features("sampled", q, k, None)
    with pytest.raises(ValueError, match="scale"):
        block_select(qf, kf, torch.tensor([0.9]), n_tokens=64, block_m=128, block_n=64, scale=-1.0, **geometry)


@pytest.mark.parametrize("thr", [[0.5, 0.95, 1.0], [0.0, 0.999, 0.3]])
def test_select_top_cdf_matches_reference(thr):
    # The bisection starts from a cutoff bound by the threshold: thresholds at both ends, a row of
    # zeros, a row of ties and rows spanning many binades give the sort-based reference's blocks.
    mass = torch.rand(2, 3, 5, 70) ** 4
    mass[0, 0, 0] = 0.0
    mass[0, 1, 1] = 0.25
    mass[1, :, 2] = torch.logspace(-30, 0, 70)
    thr = torch.tensor(thr)
    assert torch.equal(select_top_cdf(mass, thr), top_cdf(mass, thr))


@pytest.mark.parametrize("gpu_geometry,elements_per_warp,warps", [(True, 2048, 1), (True, 16, 4), (False, 64, 2)])
def test_selection_geometries_agree(monkeypatch, gpu_geometry, elements_per_warp, warps):
    # A GPU's selection takes one row a program, with one warp or several for a wide row; the
    # interpreter's takes many rows a program: the same blocks come out.
    mass = torch.rand(2, 3, 9, 70) ** 4
    thr = torch.tensor([0.5, 0.95, 1.0])
    monkeypatch.setattr(block_select_module, "SELECT_ELEMENTS_PER_WARP", elements_per_warp)
    if gpu_geometry:
        monkeypatch.setattr(block_select_module, "triton_interpreting", lambda: False)
    rows = 1 if gpu_geometry else block_select_module.INTERPRETED_SELECT_ELEMENTS // 128
    assert block_select_module._select_geometry(70) == (128, rows, warps)
    assert torch.equal(select_top_cdf(mass, thr), top_cdf(mass, thr))
    q, k = torch.randn(2, 3, 1100, 32) * 2, torch.randn(2, 3, 1100, 32) * 2
    qf, kf, geometry = _features("sampled", q, k, None)
    kw = dict(n_tokens=1100, block_m=128, block_n=64, scale=32**-0.5, **geometry)
    mask, mass = block_select(qf, kf, thr, **kw)
    assert torch.equal(mask, top_cdf(mass, thr))
    torch.testing.assert_close(mass, block_mass_reference(qf, kf, **kw), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("interpret", ["1", "0"])  # the Triton kernels, then the torch reference
def test_sampled_query_rows_are_read_in_place(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    q, k = _strided(torch.randn(1, 2, 700, 64) * 2), torch.randn(1, 2, 700, 64) * 2
    rows = sample_rows(700, SAMPLED_QUERIES["sampled"])
    qf, kf, geometry = _features("sampled", q, k, None)
    kw = dict(n_tokens=700, block_m=128, block_n=64, scale=0.125, **geometry)
    thr = torch.tensor([0.9, 0.6])
    gathered = block_select(qf, kf, thr, **kw)
    in_place = block_select(q, k, thr, q_rows=rows, **kw)
    torch.testing.assert_close(in_place[1], gathered[1], atol=1e-6, rtol=1e-5)
    assert torch.equal(in_place[0], gathered[0])
    with pytest.raises(ValueError, match="q_rows"):
        block_select(q, k, thr, q_rows=rows.int(), **kw)


@pytest.mark.parametrize("method", METHODS)
def test_several_thresholds_share_one_estimate(workload, method):
    q, k = workload.q, workload.k
    cdfs = [0.5, torch.tensor([0.9, 0.7]), 1.0]
    together = predict_block_masks(q, k, cdfs, 0.2, method=method, dense_tail_tokens=40)
    for cdf, mask in zip(cdfs, together):
        assert torch.equal(mask, predict_block_mask(q, k, cdf, 0.2, method=method, dense_tail_tokens=40))


def test_top_cdf_keeps_fewest_blocks_reaching_threshold():
    mass = torch.tensor([0.05, 0.5, 0.15, 0.3]).view(1, 1, 1, 4)
    keep = lambda t: top_cdf(mass, torch.tensor([t]))[0, 0, 0].tolist()  # noqa: E731
    assert keep(0.8) == [False, True, False, True]
    assert keep(0.81) == [False, True, True, True]
    assert keep(0.0) == [False, True, False, False]
    assert keep(1.0) == [True] * 4


def test_ragged_key_block_counts_by_its_valid_keys():
    # Two key blocks with identical pooled keys; the second holds 1 valid key of 64 (kv_lens),
    # so it must get 1/65 of the pooled mass, not half.
    q = torch.zeros(1, 1, 128, 16)
    k = torch.ones(1, 1, 128, 16)
    mass = block_mass_reference(
        block_stats_reference(q, 128)[0], block_stats_reference(k, 64)[0], stride=1, q_tokens=128,
        k_tokens=64, n_tokens=128, block_m=128, block_n=64, scale=0.25, kv_lens=torch.tensor([65]),
    )
    torch.testing.assert_close(mass[0, 0, 0], torch.tensor([64 / 65, 1 / 65]))


@pytest.fixture(scope="module")
def workload():
    return video_workload((4, 8, 16), heads=2, head_dim=32, text_tokens=40, seed=3)


@pytest.mark.parametrize("method", METHODS)
def test_extreme_thresholds(workload, method):
    q, k = workload.q, workload.k
    full = torch.ones(1, 2, -(-q.shape[2] // BLOCK_M), -(-q.shape[2] // BLOCK_N), dtype=torch.bool)
    assert torch.equal(predict_block_mask(q, k, 1.0, 0.0, method=method), full)
    assert torch.equal(predict_block_mask(q, k, 0.5, 1.0, method=method), full)
    trusted = predict_block_mask(q, k, 0.5, 0.0, method=method)
    assert trusted.float().mean() < 0.6  # trusting every block lets the CDF cut most of them


def test_sim_zero_trusts_blocks_of_negative_similarity():
    # Mean pairwise cosine can be negative (down to -1 / (n - 1): opposite tokens, zero padding):
    # sim 0.0 still trusts every block, with every method and as one head's per-head value. A last
    # query block and a last key block of two opposite tokens (similarity -1) were kept whole.
    torch.manual_seed(0)
    n, d = 2 * BLOCK_M + 2, 16
    q, k = torch.randn(1, 2, n, d), torch.randn(1, 2, n, d)
    q[:, :, -1] = -0.5 * q[:, :, -2]
    k[:, :, -1] = -0.5 * k[:, :, -2]
    assert not block_stats(q, BLOCK_M, sim_below=torch.zeros(2))[2].any()
    assert block_stats(q, BLOCK_M)[1][:, :, -1].lt(0).all()
    for method in METHODS:
        mask = predict_block_mask(q, k, 0.3, 0.0, method=method)
        qf, kf, geometry = _features(method, q, k, None)
        trusted = block_select_reference(qf, kf, torch.full((2,), 0.3), n_tokens=n, block_m=BLOCK_M, block_n=BLOCK_N,
                                         scale=d**-0.5, **geometry)[0]
        assert (mask != trusted).float().mean() <= 0.01, method
        assert not mask[:, :, -1].all(), method
        per_head = predict_block_mask(q, k, 0.3, torch.tensor([0.0, 0.5]), method=method)
        assert torch.equal(per_head[:, 0], mask[:, 0]), method


def test_antidiag_ragged_sub_blocks_average_the_products_they_have():
    # A per-query logit offset leaves attention unchanged. A sub-block past the end of the sequence
    # (n % 8 != 0) summed its fewer products over 8, so an offset moved its score towards 0 against
    # full ones: at an offset of ~10 logits the last key block (2 keys, 1.6% of the mass) was kept
    # and the two holding 98% dropped. Keys past kv_lens are not there either: their values must not
    # change the estimate.
    torch.manual_seed(0)
    n, d = 2 * BLOCK_N + 2, 32
    q, k = torch.randn(1, 1, n, d), torch.randn(1, 1, n, d)
    q[..., 0] = -1.0
    masks = []
    for offset in (0.0, 20.0, 60.0):
        shifted = k.clone()
        shifted[..., 0] = offset  # q . k - offset for every key
        masks.append(predict_block_mask(q, shifted, 0.9, 0.0, method="antidiag"))
        assert not masks[-1][..., -1].any()
    assert all(torch.equal(m, masks[0]) for m in masks)
    lens = torch.tensor([BLOCK_N + 3])
    padded = k.clone()
    padded[:, :, BLOCK_N + 3:] = 50.0 * torch.randn(n - BLOCK_N - 3, d)
    for qf in (q, torch.randn(1, 1, n, d)):
        _, kf, geometry = _features("antidiag", qf, k, lens)
        kw = dict(n_tokens=n, block_m=BLOCK_M, block_n=BLOCK_N, scale=d**-0.5, kv_lens=lens, **geometry)
        torch.testing.assert_close(block_select(qf, padded, torch.ones(1), **kw)[1],
                                   block_select(qf, k, torch.ones(1), **kw)[1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block_mass_reference(qf, padded, **kw), block_mass_reference(qf, k, **kw),
                                   atol=1e-6, rtol=1e-5)


def test_sim_one_distrusts_even_blocks_of_similarity_one():
    # A constant block and a one-token last block have similarity exactly 1: sim 1.0 still keeps them whole.
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 2 * BLOCK_M + 1, 32), torch.randn(1, 2, 2 * BLOCK_M + 1, 32)
    q[:, :, BLOCK_M:2 * BLOCK_M] = q[:, :, BLOCK_M:BLOCK_M + 1]
    assert not predict_block_mask(q, k, 0.01, 0.99)[:, :, 1:].all()  # below 1 they are trusted
    assert predict_block_mask(q, k, 0.01, 1.0).all()
    assert predict_block_mask(q, k, 0.01, torch.tensor([1.0, 0.0]))[:, 0].all()


def test_numpy_thresholds_and_narrow_kv_lens_dtypes_are_taken_as_their_values(workload):
    q, k = workload.q, workload.k
    n = q.shape[2]
    assert torch.equal(predict_block_mask(q, k, np.float32(0.5), np.float64(0.1)), predict_block_mask(q, k, 0.5, 0.1))
    short = torch.tensor([n - 200])
    assert torch.equal(predict_block_mask(q, k, 0.5, kv_lens=short.to(torch.int16)),
                       predict_block_mask(q, k, 0.5, kv_lens=short))


@pytest.mark.parametrize("method", ["sampled", "pooled"])
def test_strided_kv_lens_are_read_as_their_values(method):
    # kv_lens a column of a (B, 2) table (stride 2): the kernels read entry b, not memory offset b.
    q, k = (torch.randn(3, 2, 300, 32) for _ in range(2))
    table = torch.tensor([[300, 7], [100, 7], [200, 7]], dtype=torch.int32)
    sim = 0.5 if method == "pooled" else 0.0
    assert torch.equal(predict_block_mask(q, k, 0.9, sim, method=method, kv_lens=table[:, 0]),
                       predict_block_mask(q, k, 0.9, sim, method=method, kv_lens=table[:, 0].contiguous()))


def test_per_head_thresholds(workload):
    q, k = workload.q, workload.k
    mixed = predict_block_mask(q, k, torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.0]))
    half = predict_block_mask(q, k, 0.5, 0.0)
    assert mixed[:, 0].all()
    assert torch.equal(mixed[:, 1], half[:, 1])
    distrust = predict_block_mask(q, k, 0.5, torch.tensor([1.0, 0.0]))
    assert distrust[:, 0].all() and torch.equal(distrust[:, 1], half[:, 1])


def test_pooled_stage1_key_similarity_rule():
    # Coherent keys everywhere except key block 2 (random directions): with sim 0.5 it is not
    # trusted, so it is kept for every query block even though its pooled score is tiny.
    torch.manual_seed(1)
    d, n = 32, 256
    base = torch.randn(d)
    k = base + 0.1 * torch.randn(1, 1, n, d)
    k[..., 128:192, :] = torch.randn(64, d)
    q = -base + 0.1 * torch.randn(1, 1, n, d)
    mask = predict_block_mask(q, k, 0.5, 0.5, method="pooled")
    assert mask[..., 2].all()
    assert not mask[..., [0, 1, 3]].all()
    # sampled and qpool do not pool keys, so the key rule does not apply to them.
    assert predict_block_mask(q, k, 0.5, 0.5, method="qpool").float().mean() < 1.0
    assert predict_block_mask(q, k, 0.5, 0.5).float().mean() < 1.0


def test_query_similarity_rule():
    d, n = 32, 256
    q = torch.randn(1, 1, n, d)
    q[..., :128, :] = torch.randn(d) + 0.05 * torch.randn(128, d)  # block 0 coherent, block 1 not
    k = torch.randn(1, 1, n, d)
    mask = predict_block_mask(q, k, 0.3, 0.5)
    assert mask[..., 1, :].all() and not mask[..., 0, :].all()


def test_dense_tail_and_kv_lens(workload):
    q, k = workload.q.expand(2, -1, -1, -1), workload.k.expand(2, -1, -1, -1)
    n = q.shape[2]
    lens = torch.tensor([n, n - 100])
    mask = predict_block_mask(q, k, 0.3, 0.0, kv_lens=lens, dense_tail_tokens=40)
    first_tail_q, first_tail_k = (n - 40) // BLOCK_M, (n - 40) // BLOCK_N
    assert mask[0, :, first_tail_q:].all() and mask[0, :, :, first_tail_k:].all()
    dead = torch.arange(mask.shape[-1]) * BLOCK_N >= n - 100
    assert not mask[1][..., dead].any()
    assert mask[1, :, first_tail_q:][..., ~dead].all()
    assert torch.equal(mask[0], predict_block_mask(q[:1], k[:1], 0.3, 0.0, dense_tail_tokens=40)[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kernels", [True, False])
def test_the_first_selection_builds_the_lookup_table_build_block_lut_would(workload, method, kernels, monkeypatch):
    # The first threshold's selection is completed into its lookup table inside the selection kernel;
    # a second threshold (the same value) goes through select_top_cdf and build_block_lut. Untrusted
    # query blocks (sim 0.62: head 0's blocks 2 and 3), untrusted key blocks ("pooled"), the text tail
    # and kv_lens all apply.
    if not kernels:
        for module in (block_select_module, block_sparse_attn_module):
            monkeypatch.setattr(module, "kernels_available", lambda device: False)
    q, k = workload.q.expand(2, -1, -1, -1), workload.k.expand(2, -1, -1, -1)
    n = q.shape[2]
    lens = torch.tensor([n, n - 100])
    thresholds = head_thresholds([0.6, 0.6], 0.62, q.shape[1], q.device)
    fused, plain = predict_with(q, k, thresholds, method=method, scale=q.shape[-1] ** -0.5, kv_lens=lens,
                                dense_tail_tokens=40)
    assert torch.equal(fused.mask, plain.mask)
    dead = torch.arange(fused.mask.shape[-1]) * BLOCK_N >= n - 100
    assert not fused.mask[1][..., dead].any() and fused.mask[:, :, (n - 40) // BLOCK_M].all(dim=0)[:, ~dead].all()
    assert fused.mask[0, 0, 2:4].all() and not fused.mask[0, 0, :2].all()  # untrusted query blocks' whole rows
    assert not fused.mask.all()
    assert torch.equal(fused.lut.counts, fused.mask.sum(-1, dtype=torch.int32))
    listed = torch.arange(fused.mask.shape[-1]) < fused.lut.counts[..., None]
    for lut in (fused.lut, plain.lut):
        assert torch.equal(torch.where(listed, lut.indices.long(), -1),
                           torch.where(listed, fused.mask.long().argsort(dim=-1, descending=True, stable=True), -1))
    assert torch.equal(fused.lut.counts, plain.lut.counts) and torch.equal(fused.lut.order, plain.lut.order)


def test_key_resolved_estimates_beat_pooled(workload):
    # Against the true mean-over-queries block mass, the estimates that score every key (sampled,
    # qpool) are closer (total variation) than SpargeAttn's pooled one: key outliers such as
    # attention sinks keep their full logit.
    q, k = workload.q, workload.k
    n, d = q.shape[2], q.shape[3]
    p = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
    nq, nk = -(-n // 128), -(-n // 64)
    p = torch.nn.functional.pad(p, (0, nk * 64 - n, 0, nq * 128 - n))
    true = p.view(1, 2, nq, 128, nk, 64).sum(-1).sum(3) / torch.tensor(
        [128] * (nq - 1) + [n - 128 * (nq - 1)]).view(1, 1, nq, 1)
    common = dict(n_tokens=n, block_m=128, block_n=64, scale=d**-0.5)
    tv = {}
    for method in ("sampled", "sampled8", "qpool", "pooled"):
        qf, kf, geometry = _features(method, q, k, None)
        tv[method] = (block_mass_reference(qf, kf, **geometry, **common) - true).abs().sum(-1).mean() / 2
    assert tv["sampled"] < 0.7 * tv["pooled"] and tv["qpool"] < 0.7 * tv["pooled"]
    assert tv["sampled8"] < 0.7 * tv["sampled"]  # more samples, a closer estimate


@pytest.mark.parametrize("samples", sorted(SAMPLED_QUERIES.values()))
def test_sample_rows_cover_each_block_segment(samples):
    rows = sample_rows(300, samples).view(-1, samples)  # 3 blocks, the last one ragged
    seg = BLOCK_M // samples
    assert rows.shape[0] == 3 and int(rows.max()) == 299
    for i, block in enumerate(rows[:2]):
        assert ((block - i * BLOCK_M) // seg).tolist() == list(range(samples))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(cdf_threshold=1.5), "cdf_threshold"),
        (dict(cdf_threshold=-0.1), "cdf_threshold"),
        (dict(cdf_threshold=0.0), r"cdf_threshold must lie in \(0.0, 1.0\]"),  # as profiles: no mass asked for
        (dict(sim_threshold=float("nan")), "sim_threshold"),
        (dict(sim_threshold=True), "sim_threshold"),
        (dict(sim_threshold=torch.tensor([True, True])), "sim_threshold.*bool tensor"),  # was read as 1.0
        (dict(cdf_threshold=torch.tensor(True)), "cdf_threshold.*bool tensor"),
        (dict(sim_threshold=torch.tensor([0.5, 0.5, 0.5])), "sim_threshold"),
        (dict(sim_threshold=torch.tensor([0.5, float("nan")])), "sim_threshold"),
        (dict(cdf_threshold=torch.tensor([0.5, 2.0])), "cdf_threshold"),
        (dict(cdf_threshold="high"), "cdf_threshold"),
        (dict(method="topk"), "method"),
        (dict(dense_tail_tokens=-1), "dense_tail_tokens"),
        (dict(kv_lens=torch.tensor([1.0])), "kv_lens"),
        (dict(kv_lens=torch.tensor([10, 10])), "kv_lens"),
        (dict(kv_lens=torch.tensor([0])), "kv_lens"),
        # Mutation round 2: past the sequence and bool lengths were not caught by the cases above.
        (dict(kv_lens=torch.tensor([65])), r"kv_lens values must lie in \[1, 64\]"),
        (dict(kv_lens=torch.tensor([True])), "kv_lens must be an integer tensor, got torch.bool"),
        # A CPU kv_lens beside CUDA q, k ended in Triton's "Pointer argument (at 5) cannot be accessed"
        # (H100, 2026-12-06); meta stands for the other device here.
        (dict(kv_lens=torch.tensor([64], device="meta")), "kv_lens is on meta but q is on cpu"),
        (dict(scale=0.0), "scale"),
        (dict(scale=True), "scale"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match=name):
        predict_block_mask(q, k, **kwargs)


def test_bad_threshold_lists_name_themselves():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    for bad in ([], 0.5, "0.5"):
        with pytest.raises(ValueError, match="cdf_thresholds"):
            predict_block_masks(q, k, bad)
    with pytest.raises(ValueError, match="cdf_threshold"):
        predict_block_masks(q, k, [0.5, 1.2])


def test_a_text_tail_of_the_whole_sequence_keeps_every_block():
    # Mutation round 2: dense_tail_tokens == N (the whole sequence is text) was not covered by any case.
    q, k = torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16)
    assert predict_block_mask(q, k, 0.1, 0.0, dense_tail_tokens=200).all()


@pytest.mark.parametrize("q,k,name", [
    (torch.randn(2, 64, 16), torch.randn(2, 64, 16), "q"),
    (torch.randn(1, 2, 64, 16), torch.randn(1, 2, 32, 16), "k"),
    (torch.randn(1, 2, 64, 16).int(), torch.randn(1, 2, 64, 16), "q"),
    (torch.randn(1, 2, 64, 16).half(), torch.randn(1, 2, 64, 16).bfloat16(), "k has dtype"),
    # D=256 ran out of shared memory on an H100 (antidiag, fp32) instead of being refused as sparse_attention does
    (torch.randn(1, 1, 64, 256), torch.randn(1, 1, 64, 256), "q head dim 256 is not supported"),
])
def test_bad_tensors_name_themselves(q, k, name):
    with pytest.raises(ValueError, match=name):
        predict_block_mask(q, k)


@pytest.mark.parametrize("r", [1, 2, 3, 4])
def test_antidiag_ragged_last_query_block_meets_the_last_key_block(r):
    # n % 128 = r <= 4: the last query block and the last key block are each one 8-token sub-row of
    # r tokens. The full anti-diagonal pairs query offset i with key offset 7 - i, none of them
    # there: the block scored -inf, got mass 0 and was dropped at any cdf below 1, even under local
    # attention, where the last queries put most of their mass on it (they attend to themselves).
    # Likewise a key block of 8 - r valid keys (kv_lens) against that last query block.
    n, d = 2 * BLOCK_M + r, 32
    pos = torch.arange(n).float()[:, None]
    freq = 1.0 / (4.0 ** (torch.arange(d // 2).float() / (d // 2)) * 3.0)
    pe = 2.2 * torch.cat([torch.cos(pos * freq), torch.sin(pos * freq)], -1)
    q, k = pe + 0.3 * torch.randn(1, 1, n, d), pe + 0.3 * torch.randn(1, 1, n, d)
    true = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, -1)[0, 0, 2 * BLOCK_M:, 4 * BLOCK_N:].sum(-1).mean()
    assert true > 0.3  # the last query block puts 0.44-0.9 of its attention on its own key block
    for lens, kb in ((None, -1), (torch.tensor([BLOCK_N + 8 - r]), 1)):
        kw = dict(stride=8, q_tokens=8, k_tokens=8, n_tokens=n, block_m=BLOCK_M, block_n=BLOCK_N, scale=d**-0.5,
                  kv_lens=lens)
        ref = block_mass_reference(q, k, **kw)
        mass = block_select(q, k, torch.tensor([0.9]), **kw)[1]
        torch.testing.assert_close(mass, ref, atol=1e-5, rtol=1e-4)
        assert ref[0, 0, -1, kb] > 0, (r, lens)
    assert predict_block_mask(q, k, 0.9, 0.0, method="antidiag")[0, 0, -1, -1]
