"""Block-sparse attention kernel and LUT builder (Triton interpreter) against plain torch."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsediff.kernels.block_sparse_attn import (
    BLOCK_M,
    BLOCK_N,
    TILE_CONFIGS,
    WORK_LEVELS,
    BlockLut,
    TileConfig,
    attention_from_lut,
    block_sparse_attention,
    build_block_lut,
)
from sparsediff.kernels.block_sparse_attn_reference import (
    block_lut_reference,
    block_sparse_attention_reference,
)
from sparsediff.kernels.row_order_reference import heavy_rows_first_reference

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}

# (B, H, Nq, Nk, D, dtype): ragged lengths, padded head dim (96, 48), cross lengths.
CASES = [
    (1, 2, 256, 256, 64, torch.float16),
    (2, 1, 200, 200, 128, torch.bfloat16),
    (1, 1, 321, 321, 96, torch.float32),
    (1, 3, 130, 130, 64, torch.bfloat16),
    (2, 2, 129, 300, 48, torch.float16),
]


def _qkv(B, H, n_q, n_k, D, dtype):
    q = torch.randn(B, H, n_q, D, dtype=dtype)
    k = torch.randn(B, H, n_k, D, dtype=dtype)
    v = torch.randn(B, H, n_k, D, dtype=dtype)
    return q, k, v


def _mask_shape(B, H, n_q, n_k):
    return (B, H, math.ceil(n_q / BLOCK_M), math.ceil(n_k / BLOCK_N))


def _reference(q, k, v, mask, **kw):
    return block_sparse_attention_reference(q, k, v, mask, block_m=BLOCK_M, block_n=BLOCK_N, **kw)


def _assert_close(out, ref, dtype):
    assert out.dtype == ref.dtype
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype], err


def test_block_sizes():
    assert (BLOCK_M, BLOCK_N) == (128, 64)


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype", CASES)
def test_all_kept_equals_sdpa(B, H, n_q, n_k, D, dtype):
    q, k, v = _qkv(B, H, n_q, n_k, D, dtype)
    mask = torch.ones(_mask_shape(B, H, n_q, n_k), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
    _assert_close(out, ref, dtype)


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype", CASES)
def test_random_mask_equals_reference_with_empty_rows(B, H, n_q, n_k, D, dtype):
    q, k, v = _qkv(B, H, n_q, n_k, D, dtype)
    mask = torch.rand(_mask_shape(B, H, n_q, n_k)) < 0.4
    mask[0, 0, 0] = False  # an empty query block
    mask[-1, -1, -1, -1] = True  # the ragged last key block
    out = block_sparse_attention(q, k, v, mask, scale=0.3)
    _assert_close(out, _reference(q, k, v, mask, scale=0.3), dtype)
    assert torch.count_nonzero(out[0, 0, :BLOCK_M]) == 0


@pytest.mark.parametrize("config", [TileConfig(1, 4, 2), TileConfig(2, 4, 2), TileConfig(4, 4, 2)])
def test_step_blocks_configs(config):
    q, k, v = _qkv(1, 2, 256, 600, 64, torch.float16)
    mask = torch.rand(_mask_shape(1, 2, 256, 600)) < 0.6
    kv_lens = torch.tensor([550])
    lut = build_block_lut(mask, 600, kv_lens.int())
    out = attention_from_lut(q, k, v, lut, 0.125, kv_lens=kv_lens.int(), config=config)
    _assert_close(out, _reference(q, k, v, mask, scale=0.125, kv_lens=kv_lens), torch.float16)


@pytest.mark.parametrize("B,H,n,D,dtype", [(2, 2, 600, 64, torch.float16), (1, 3, 330, 48, torch.bfloat16)])
def test_tma_tiles_equal_pointer_tiles(B, H, n, D, dtype):
    # Diffusers' (B, N, H, D) layout, rows of several steps (TMA serves the unmasked ones), a padded
    # head dim (48: the descriptor reads columns past D as 0), ragged kv_lens.
    q, k, v = (torch.randn(B, n, H, D, dtype=dtype).transpose(1, 2) for _ in range(3))
    mask = torch.rand(_mask_shape(B, H, n, n)) < 0.7
    mask[0, 0, 0] = True
    kv_lens = torch.tensor([n - 70] + [n] * (B - 1), dtype=torch.int32)
    lut = build_block_lut(mask, n, kv_lens)
    pointer, tma = (attention_from_lut(q, k, v, lut, 0.125, kv_lens=kv_lens, config=TileConfig(1, 4, 2, tma=t))
                    for t in (False, True))
    torch.testing.assert_close(tma, pointer, rtol=0, atol=0)
    _assert_close(tma, _reference(q, k, v, mask, scale=0.125, kv_lens=kv_lens), dtype)


@pytest.fixture
def descriptors_made(monkeypatch):
    """The arguments of every TMA descriptor the attention launcher makes, in order."""
    import sparsediff.kernels.block_sparse_attn as bsa

    made = []
    monkeypatch.setattr(bsa, "TensorDescriptor", lambda *args: made.append(args) or TensorDescriptor(*args))
    return made


def test_tma_falls_back_to_pointers_where_the_layout_does_not_suit_it(descriptors_made):
    made = descriptors_made
    q, k, v = _qkv(1, 1, 300, 300, 64, torch.float16)
    mask = torch.ones(_mask_shape(1, 1, 300, 300), dtype=torch.bool)
    lut = build_block_lut(mask, 300)
    config = TileConfig(1, 4, 2, tma=True)
    ref = _reference(q, k, v, mask, scale=0.125)
    _assert_close(attention_from_lut(q, k, v, lut, 0.125, config=config), ref, torch.float16)
    assert len(made) == 2  # K and V
    # Rows 100 bytes apart (50 fp16 channels, 40 used): TMA wants 16-byte aligned strides.
    k_odd = torch.zeros(1, 1, 300, 50, dtype=torch.float16)[..., :40]
    v_odd = torch.zeros(1, 1, 300, 50, dtype=torch.float16)[..., :40]
    k_odd.copy_(k[..., :40])
    v_odd.copy_(v[..., :40])
    out = attention_from_lut(q[..., :40].contiguous(), k_odd, v_odd, lut, 0.125, config=config)
    assert len(made) == 2
    _assert_close(out, _reference(q[..., :40], k[..., :40], v[..., :40], mask, scale=0.125), torch.float16)


def test_declared_tile_reads_through_tma_on_long_calls_only(monkeypatch, descriptors_made):
    import sparsediff.kernels.block_sparse_attn as bsa

    made = descriptors_made
    monkeypatch.setattr(bsa, "gpu_arch", lambda device: "sm90")  # the Hopper tiles, D=128 with TMA
    q, k, v = _qkv(1, 2, 256, 256, 128, torch.float16)
    mask = torch.ones(_mask_shape(1, 2, 256, 256), dtype=torch.bool)
    lut = build_block_lut(mask, 256)
    ref = _reference(q, k, v, mask, scale=0.125)
    pairs = 2 * 256 * 256
    for min_pairs, descriptors in ((pairs + 1, 0), (pairs, 2)):
        monkeypatch.setattr(bsa, "TMA_MIN_PAIRS", min_pairs)
        made.clear()
        _assert_close(attention_from_lut(q, k, v, lut, 0.125), ref, torch.float16)
        assert len(made) == descriptors


@pytest.mark.parametrize("step_blocks", [1, 2])
def test_heavy_rows_first_changes_only_the_order_of_the_programs(step_blocks):
    # Rows of very different work, as a text segment kept densely makes them: every output row and
    # every row's P·V skip count must come out the same in either program order.
    q, k, v = _qkv(2, 2, 640, 640, 64, torch.float16)
    mask = torch.rand(_mask_shape(2, 2, 640, 640)) < 0.2
    mask[:, :, -1] = True  # the last query block of every (b, h) keeps every key block
    mask[1, 0, 1] = True
    lut = build_block_lut(mask, 640)
    assert lut.order[:5].tolist() == [4, 9, 11, 14, 19]  # the full rows lead
    configs = [TileConfig(step_blocks, 4, 2, heavy_rows_first=first) for first in (False, True)]
    runs = [attention_from_lut(q, k, v, lut, 0.125, pv_threshold=1e-2, return_pv_skips=True, config=c)
            for c in configs]
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert torch.equal(runs[0][1], runs[1][1])
    exact = attention_from_lut(q, k, v, lut, 0.125, config=configs[1])
    _assert_close(exact, _reference(q, k, v, mask, scale=0.125), torch.float16)


@pytest.mark.parametrize("step_blocks", [1, 2])
def test_fixed_max_equals_running_max(step_blocks):
    # Keys growing along the sequence: every row's later steps score above its first step's maxima.
    q, k, v = _qkv(2, 2, 300, 700, 64, torch.bfloat16)
    k = (k.float() * torch.linspace(0.5, 4.0, 700)[:, None]).to(torch.bfloat16)
    mask = torch.rand(_mask_shape(2, 2, 300, 700)) < 0.6
    kv_lens = torch.tensor([700, 555], dtype=torch.int32)
    lut = build_block_lut(mask, 700, kv_lens)
    fixed, running = (attention_from_lut(q, k, v, lut, 0.125, kv_lens=kv_lens,
                                         config=TileConfig(step_blocks, 4, 2, fixed_max=f)) for f in (True, False))
    ref = _reference(q, k, v, mask, scale=0.125, kv_lens=kv_lens)
    _assert_close(fixed, ref, torch.bfloat16)
    _assert_close(running, ref, torch.bfloat16)


# The first pass overflows on purpose: the interpreter's numpy warns of the infinities it multiplies.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("nats", [300.0, 15.0])
def test_fixed_max_overflow_falls_back_to_running_max(nats):
    # Key block 2 scores `nats` above key block 0, the rows' first step. 300: against block 0's
    # maxima l_i overflows fp32. 15: P overflows fp16 (65504 = e^11.1) while l_i stays far below
    # 2**64, and the non-finite accumulator says so. Either way the rows are computed again.
    n, D = 256, 64
    q = torch.randn(1, 1, n, D).abs()
    k = torch.randn(1, 1, n, D) * 0.05
    k[:, :, 2 * BLOCK_N:3 * BLOCK_N] = nats / (0.125 * q.sum(-1).mean())
    v = torch.randn(1, 1, n, D)
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    mask = torch.ones(_mask_shape(1, 1, n, n), dtype=torch.bool)
    out = attention_from_lut(q, k, v, build_block_lut(mask, n), 0.125, config=TileConfig(1, 4, 2, fixed_max=True))
    assert torch.isfinite(out).all()
    _assert_close(out, _reference(q, k, v, mask, scale=0.125), torch.float16)


def test_kv_lens():
    B, H, N, D = 4, 2, 200, 64
    q, k, v = _qkv(B, H, N, N, D, torch.float16)
    mask = torch.rand(_mask_shape(B, H, N, N)) < 0.7
    kv_lens = torch.tensor([0, 70, 128, 500], dtype=torch.int64)  # none, partial block, exact, past N
    out = block_sparse_attention(q, k, v, mask, kv_lens=kv_lens)
    _assert_close(out, _reference(q, k, v, mask, kv_lens=kv_lens), torch.float16)
    assert torch.count_nonzero(out[0]) == 0


def test_non_contiguous_inputs_keep_layout():
    B, N, H, D = 1, 200, 3, 64
    # diffusers hands (B, N, H, D); we take (B, H, N, D) views without copies.
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    mask = (torch.rand(B, 1, 2, 4) < 0.6).expand(B, H, 2, 4)  # stride-0 head dim
    out = block_sparse_attention(q, k, v, mask)
    assert out.stride() == q.stride()
    _assert_close(out, _reference(q, k, v, mask), torch.bfloat16)


def _dominant_first_block(n=256, D=64, dtype=torch.float16):
    """Every query attends almost only to key block 0: later blocks' maxima are ~e^-20 below."""
    q = torch.randn(1, 1, n, D).abs().to(dtype)
    k = torch.randn(1, 1, n, D) * 0.05
    k[:, :, :BLOCK_N] = q.float().mean(dim=2, keepdim=True) * 2.0
    v = torch.randn(1, 1, n, D, dtype=dtype)
    return q, k.to(dtype), v


def test_pv_threshold_tiny_equals_exact():
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    mask = torch.rand(_mask_shape(1, 2, 256, 256)) < 0.8
    # P·V skipping runs with the running maximum: compare with that kernel without skips.
    exact = attention_from_lut(q, k, v, build_block_lut(mask, 256), 0.125, config=TileConfig(1, 4, 2, fixed_max=False))
    out, skips = block_sparse_attention(q, k, v, mask, pv_threshold=1e-30, return_pv_skips=True)
    assert skips.shape == (1, 2, 2) and skips.dtype == torch.int32
    assert int(skips.sum()) == 0
    torch.testing.assert_close(out, exact, rtol=0, atol=0)


@pytest.mark.parametrize("step_blocks", [1, 2])
def test_pv_threshold_large_skips(step_blocks):
    q, k, v = _dominant_first_block()
    n_blocks = 256 // BLOCK_N
    mask = torch.ones(_mask_shape(1, 1, 256, 256), dtype=torch.bool)
    out, skips = attention_from_lut(
        q, k, v, build_block_lut(mask, 256), 1 / 8, pv_threshold=1e-3, return_pv_skips=True,
        config=TileConfig(step_blocks, 4, 2),
    )
    # The first step computes; every later one is negligible and skipped.
    assert skips.tolist() == [[[n_blocks - step_blocks] * 2]]
    _assert_close(out, _reference(q, k, v, mask), torch.float16)


@pytest.mark.parametrize("step_blocks", [1, 2])
def test_pv_skip_needs_every_row_of_the_query_block_negligible(step_blocks):
    # Rows 0-63 attend almost only to key block 0, rows 64-127 almost only to key block 2: block 2 is
    # negligible for the first half of the query block and dominant for the second, so it must not be
    # skipped (a skip when any row, not every row, is negligible gave an error of 0.41).
    n, D = 256, 64
    q = torch.randn(1, 1, n, D).abs() * 0.05
    k = torch.randn(1, 1, n, D) * 0.05
    q[:, :, :64, :32] = 1.0
    q[:, :, 64:128, 32:] = 1.0
    q[:, :, 128:] = 1.0
    k[:, :, :BLOCK_N, :32] = 2.0
    k[:, :, 2 * BLOCK_N:3 * BLOCK_N, 32:] = 2.0
    v = torch.randn(1, 1, n, D)
    q, k, v = (t.to(torch.float16) for t in (q, k, v))
    mask = torch.ones(_mask_shape(1, 1, n, n), dtype=torch.bool)
    out, skips = attention_from_lut(q, k, v, build_block_lut(mask, n), 1 / 8, pv_threshold=1e-3,
                                    return_pv_skips=True, config=TileConfig(step_blocks, 4, 2))
    _assert_close(out, _reference(q, k, v, mask, scale=1 / 8), torch.float16)
    if step_blocks == 1:
        assert int(skips.sum()) > 0  # key blocks 1 and 3 are negligible for every row: the filter is on


@pytest.mark.parametrize("value", ["0", "false", "off"])  # Triton reads all three as off
def test_cpu_fallback_without_interpreter(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    q, k, v = _qkv(1, 2, 200, 200, 32, torch.float32)
    mask = torch.rand(_mask_shape(1, 2, 200, 200)) < 0.5
    out, skips = block_sparse_attention(q, k, v, mask, return_pv_skips=True)
    torch.testing.assert_close(out, _reference(q, k, v, mask))
    assert int(skips.sum()) == 0


@pytest.mark.parametrize("KB,n_keys", [(5, 300), (72, 4608), (300, 19150)])
def test_lut_builder_matches_reference(KB, n_keys):
    B, H, QB = 2, 3, 4
    mask = torch.rand(B, H, QB, KB) < 0.3
    mask[0, 0, 0] = False
    mask[1, 2, 3] = True
    kv_lens = torch.tensor([n_keys - 70, n_keys // 2], dtype=torch.int32)
    for lens in (None, kv_lens):
        _assert_lut_is(build_block_lut(mask, n_keys, lens), mask, n_keys, lens)


def test_lut_builder_gpu_geometry(monkeypatch):
    # A GPU's LUT kernel takes one row a program with warps by row width; the interpreter's takes
    # many rows a program: the same table comes out.
    from sparsediff.kernels import block_sparse_attn

    monkeypatch.setattr(block_sparse_attn, "triton_interpreting", lambda: False)
    assert [block_sparse_attn._lut_geometry(kb) for kb in (16, 128, 512, 2048, 8192)] == [(1, 1), (1, 1), (1, 2), (1, 8), (1, 8)]
    mask = torch.rand(2, 3, 4, 72) < 0.3
    kv_lens = torch.tensor([4538, 2304], dtype=torch.int32)
    _assert_lut_is(build_block_lut(mask, 4608, kv_lens), mask, 4608, kv_lens)


def test_lut_builder_strided_mask():
    # stride-0 batch and head dims, stride-2 key-block dim
    mask = (torch.rand(1, 1, 3, 18) < 0.5).expand(2, 4, 3, 18)[..., ::2]
    _assert_lut_is(build_block_lut(mask, 9 * BLOCK_N), mask, 9 * BLOCK_N)


def _assert_lut_is(lut: BlockLut, keep: torch.Tensor, n_keys: int, kv_lens: torch.Tensor | None = None) -> None:
    """lut is what the attention kernel must read for the blocks `keep` (already with its dense
    blocks): counts, indices and the programs' row order as the references."""
    ref_counts, ref_indices = block_lut_reference(keep, n_keys, BLOCK_N, kv_lens)
    assert torch.equal(lut.counts, ref_counts)
    kept = ref_indices >= 0
    assert torch.equal(lut.indices.long()[kept], ref_indices[kept])
    assert torch.equal(lut.order, heavy_rows_first_reference(ref_counts, keep.shape[-1], WORK_LEVELS))


@pytest.mark.parametrize("interpret", ["1", "0"])  # the Triton kernel, then the torch fallback
def test_lut_builder_adds_dense_blocks(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    B, H, n_keys, tail = 2, 3, 1000, 150
    QB, KB = math.ceil(n_keys / BLOCK_M), math.ceil(n_keys / BLOCK_N)
    mask = torch.rand(B, H, QB, KB) < 0.2
    dense_rows = torch.rand(B, H, QB) < 0.2
    dense_cols = torch.rand(B, H, KB) < 0.1
    kv_lens = torch.tensor([n_keys, 700], dtype=torch.int32)
    expected = mask | dense_rows[..., None] | dense_cols[..., None, :]
    expected[:, :, (n_keys - tail) // BLOCK_M:] = True
    expected[:, :, :, (n_keys - tail) // BLOCK_N:] = True
    expected &= (torch.arange(KB) * BLOCK_N < kv_lens[:, None])[:, None, None, :]
    out_mask = mask.clone()
    lut = build_block_lut(out_mask, n_keys, kv_lens, dense_rows=dense_rows, dense_cols=dense_cols,
                          dense_tail_tokens=tail, out_mask=out_mask)  # in place
    assert torch.equal(out_mask, expected)
    _assert_lut_is(lut, expected, n_keys)


def test_lut_builder_bad_dense_blocks():
    mask = torch.zeros(1, 2, 3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="dense_rows"):
        build_block_lut(mask, 300, dense_rows=torch.zeros(1, 2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dense_cols"):
        build_block_lut(mask, 300, dense_cols=torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="out_mask"):
        build_block_lut(mask, 300, out_mask=torch.zeros(1, 2, 5, 3, dtype=torch.bool).transpose(2, 3))


def test_given_lut_is_used():
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    mask = torch.rand(_mask_shape(1, 2, 256, 256)) < 0.5
    other = ~mask
    other[..., 0] = True
    # The lookup table decides what is computed: that of another mask gives that mask's result.
    out = block_sparse_attention(q, k, v, mask, lut=build_block_lut(other, 256))
    _assert_close(out, _reference(q, k, v, other), torch.float16)


def _good():
    q, k, v = _qkv(1, 2, 200, 200, 64, torch.float16)
    mask = torch.ones(_mask_shape(1, 2, 200, 200), dtype=torch.bool)
    return dict(q=q, k=k, v=v, block_mask=mask)


def _all(fn):
    return lambda a: {n: fn(a[n]) for n in ("q", "k", "v")}


@pytest.mark.parametrize(
    "name,change",
    [
        ("q", lambda a: {"q": a["q"][0]}),
        ("q", lambda a: {"q": a["q"].numpy()}),
        ("q", _all(lambda t: t.to(torch.int32))),
        ("q", _all(lambda t: torch.zeros(1, 2, 200, 160, dtype=torch.float16))),
        ("q", _all(lambda t: t[:, :, :0])),
        ("k", lambda a: {"k": a["k"][:, :1]}),
        ("k", lambda a: {"k": a["k"][..., :32]}),
        ("k", lambda a: {"k": a["k"].float()}),
        ("v", lambda a: {"v": a["v"][:, :, :100]}),
        ("v", lambda a: {"v": a["v"].to(torch.bfloat16)}),
        ("block_mask", lambda a: {"block_mask": a["block_mask"].int()}),
        ("block_mask", lambda a: {"block_mask": a["block_mask"][:, :, :1]}),
        ("kv_lens", lambda a: {"kv_lens": torch.tensor([1.5])}),
        ("kv_lens", lambda a: {"kv_lens": torch.tensor([3, 4])}),
        ("scale", lambda a: {"scale": 0.0}),
        ("scale", lambda a: {"scale": float("nan")}),
        ("scale", lambda a: {"scale": True}),
        ("pv_threshold", lambda a: {"pv_threshold": 0.0}),
        ("pv_threshold", lambda a: {"pv_threshold": 2.0}),
    ],
)
def test_bad_arguments_raise(name, change):
    args = _good()
    args.update(change(args))
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        block_sparse_attention(**args)


def test_tune_candidates_are_distinct_tile_configs():
    # `bench kernel --tune` builds them only on a GPU: a misspelt field would surface there first.
    from sparsediff.bench.kernel import TUNE_CANDIDATES

    configs = [TileConfig(**candidate) for candidate in TUNE_CANDIDATES]
    assert len(set(configs)) == len(configs) == 20
    for head_dim in (64, 128):  # the search includes the declared bf16 tiles it is measured against
        assert replace(TILE_CONFIGS[("sm90", head_dim, torch.bfloat16)], hopper=False) in configs
