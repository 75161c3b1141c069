"""The FP8 (e4m3) path: quantiser kernel vs its torch reference, the attention kernel's FP8 variant
vs the reference's FP8 arithmetic (tight) and vs exact attention (loose), and fp8= through the API
and the processors. Kernels run under the Triton interpreter."""
import math

import pytest
import torch
import triton
import triton.language as tl

from sparsediff.attention import BLOCK_M, BLOCK_N, block_sparse_attention, sparse_attention
from sparsediff.kernels import channel_stats as channel_stats_kernel
from sparsediff.kernels.block_sparse_attn import TileConfig, attention_from_lut, build_block_lut
from sparsediff.kernels.channel_stats import channel_stats_fp8
from sparsediff.kernels.quantize_fp8 import quantize_fp8, to_e4m3
from sparsediff.kernels.quantize_fp8_reference import E4M3_MAX, channel_stats, e4m3_scales, quantize_fp8_reference
from sparsediff.kernels.quantize_fp8_reference import to_e4m3 as to_e4m3_reference
from sparsediff.metrics import relative_l1
from sparsediff.processors import apply
from test_block_sparse_attn import _dominant_first_block, _reference
from tiny_models import build_wan, wan_inputs

# (B, H, Nq, Nk, D, dtype, kv_lens): D 64 / 128 / padded 80 and 48, ragged and cross lengths.
CASES = [
    (1, 2, 256, 256, 64, torch.bfloat16, None),
    (2, 1, 200, 200, 128, torch.float16, (150, 64)),
    (1, 2, 130, 300, 80, torch.bfloat16, None),
    (2, 2, 129, 129, 48, torch.float32, (1, 129)),
]
CASE_IDS = [f"D{c[4]}-{c[2]}x{c[3]}-{str(c[5])[6:]}{'-kvlens' if c[6] else ''}" for c in CASES]
# The FP8 arithmetic's own error on Gaussian q, k, v is ~5% relative L1 (each of the Q·K, P and V
# quantisations adds 2.5-4%); the kernel must match the reference's FP8 arithmetic far closer.
EXACT_REL_L1 = 0.075
FP8_REF_REL_L1 = 0.01
# Kernel vs the reference's FP8 arithmetic: the output dtype's rounding (fp32: summation order).
FP8_REF_TOL = {torch.bfloat16: dict(atol=1e-2, rtol=1e-2), torch.float16: dict(atol=1e-3, rtol=2e-3),
               torch.float32: dict(atol=1e-4, rtol=1e-4)}


def _qkv(B, H, n_q, n_k, D, dtype, layout="BHND"):
    shapes = [(B, H, n_q, D), (B, H, n_k, D), (B, H, n_k, D)]
    if layout == "BNHD":  # as diffusers hands them: (B, N, H, D) viewed as (B, H, N, D)
        return [torch.randn(b, n, h, d).to(dtype).transpose(1, 2) for b, h, n, d in shapes]
    q, k, v = (torch.randn(s).to(dtype) for s in shapes)
    return q * 2, k + 1.5, v  # a key offset: smoothing has something to remove


def _lens(kv_lens):
    return None if kv_lens is None else torch.tensor(kv_lens, dtype=torch.int32)


def _rel_l1(out, ref):
    return float(relative_l1(out, ref))


def _bits(t):
    return t.view(torch.uint8)


# ------------------------------------------------------------------------------------ e4m3 rounding


@triton.jit
def _to_e4m3_kernel(x_ptr, y_ptr, N: tl.constexpr, ROUND_E4M3: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, to_e4m3(tl.load(x_ptr + offs), ROUND_E4M3))


def test_to_e4m3_rounds_as_torch_on_the_interpreter():
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    midpoints = (grid.sort().values[1:] + grid.sort().values[:-1]) / 2  # ties: to even
    hard = torch.tensor([1.9375, 1.96875, 1.9856, -1.9856, 1.0625, 447.9, 448.0, 464.0, 500.0, -1e4,
                         0.0013, 2.0**-10, 3 * 2.0**-11, 1e-5, 1e-40, 0.0, -0.0])
    x = torch.cat([grid, midpoints, hard, torch.randn(1024) * 50, torch.rand(1024) * 0.01])
    x = torch.nn.functional.pad(x, (0, triton.next_power_of_2(x.numel()) - x.numel()))
    y = torch.empty(x.numel(), dtype=torch.float8_e4m3fn)
    _to_e4m3_kernel[(1,)](x, y, N=x.numel(), ROUND_E4M3=True)
    assert torch.equal(_bits(y), _bits(to_e4m3_reference(x)))


# ------------------------------------------------------------------------------ channel statistics


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,kv_lens", CASES + [(1, 1, 1, 1, 64, torch.bfloat16, None)],
                         ids=CASE_IDS + ["one-key"])
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
@pytest.mark.parametrize("target_programs", [1024, 1], ids=["one-tile-chunks", "many-tile-chunks"])
def test_channel_stats_kernel_matches_reference(B, H, n_q, n_k, D, dtype, kv_lens, layout, target_programs,
                                                monkeypatch):
    monkeypatch.setattr(channel_stats_kernel, "TARGET_PROGRAMS", target_programs)
    _, k, v = _qkv(B, H, n_q, n_k, D, dtype, layout)
    lens = _lens(kv_lens)
    k_mean, v_scale, v_inverse = channel_stats_fp8(k, v, lens)
    ref_mean, ref_amax = channel_stats(k, v, lens)
    ref_scale, ref_inverse = e4m3_scales(ref_amax)
    torch.testing.assert_close(k_mean, ref_mean, rtol=1e-5, atol=1e-6)  # summation order differs
    # The maxima are exact, and so are the IEEE-rounded scale divisions.
    torch.testing.assert_close(v_scale, ref_scale, rtol=0, atol=0)
    torch.testing.assert_close(v_inverse, ref_inverse, rtol=0, atol=0)


def test_channel_stats_kernel_is_deterministic():
    _, k, v = _qkv(1, 2, 300, 3000, 64, torch.float32)
    first = channel_stats_fp8(k, v, None)
    assert all(torch.equal(a, b) for a, b in zip(first, channel_stats_fp8(k, v, None)))


# ---------------------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,kv_lens", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
def test_quantizer_matches_reference_bitwise(B, H, n_q, n_k, D, dtype, kv_lens, layout):
    q, k, v = _qkv(B, H, n_q, n_k, D, dtype, layout)
    lens = _lens(kv_lens)
    out = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens)
    # Given the kernel's channel means (torch sums in another order), every bit matches.
    ref = quantize_fp8_reference(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens, k_mean=out.k_mean)
    for name in ("q", "k", "v_t"):
        assert getattr(out, name).shape == getattr(ref, name).shape, name
        assert torch.equal(_bits(getattr(out, name)), _bits(getattr(ref, name))), name
    for name in ("q_scale", "k_scale", "v_scale", "k_mean"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0, msg=name)


def test_quantizer_smooths_k_over_valid_keys_and_scales_to_the_e4m3_range():
    B, H, n, D = 2, 2, 300, 64
    q, k, v = _qkv(B, H, n, n, D, torch.float32)
    k = k + torch.linspace(-20, 20, D)  # per-channel offsets far above the spread
    lens = torch.tensor([300, 100], dtype=torch.int32)
    ops = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens)
    expected_mean = torch.stack([k[0].mean(dim=1), k[1, :, :100].mean(dim=1)])
    torch.testing.assert_close(ops.k_mean, expected_mean, rtol=1e-5, atol=1e-5)
    # Dequantised, within half an e4m3 ulp of the inputs: 2^-4 relative, or half the subnormal
    # spacing 2^-9 (in scale units) near zero. Padding keys are zeros.
    k_scale = ops.k_scale.repeat_interleave(BLOCK_N, dim=2)[:, :, :n, None]
    smoothed = k[0] - expected_mean[0, :, None]
    k_back = ops.k.float() * k_scale + ops.k_mean[:, :, None]
    assert ((k_back[0] - k[0]).abs() <= smoothed.abs() / 16 + k_scale[0] * 2**-10 + 1e-5).all()
    assert (_bits(ops.k[1, :, 100:]) == 0).all() and (_bits(ops.v_t[1, :, :, 100:]) == 0).all()
    q_scale = ops.q_scale.repeat_interleave(BLOCK_M, dim=2)[:, :, :n, None]
    assert ((ops.q.float() * q_scale - q).abs() <= q.abs() / 16 + q_scale * 2**-10 + 1e-6).all()
    # Each block's largest magnitude lands on 448.
    assert ops.q.float().abs().amax() == E4M3_MAX and ops.v_t.float().abs().amax(dim=(0, 1, 3)).eq(E4M3_MAX).all()


def test_quantizer_reads_a_strided_kv_lens_as_its_values():
    q, k, v = _qkv(2, 1, 200, 200, 32, torch.float32)
    lens = torch.tensor([[200, 1], [70, 1]], dtype=torch.int32)[:, 0]  # stride 2
    out, ref = (quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=kv_lens)
                for kv_lens in (lens, lens.contiguous()))
    for name in ("k", "v_t", "k_scale", "v_scale", "k_mean"):
        assert torch.equal(getattr(out, name).float(), getattr(ref, name).float()), name


def test_quantizer_zero_input_gets_unit_scales():
    z = torch.zeros(1, 1, 200, 64)
    ops = quantize_fp8(z, z, z, block_m=BLOCK_M, block_n=BLOCK_N)
    assert (ops.q_scale == 1).all() and (ops.k_scale == 1).all() and (ops.v_scale == 1).all()
    assert (_bits(ops.q) == 0).all()


# ------------------------------------------------------------------------------------ FP8 attention


@pytest.mark.parametrize("B,H,n_q,n_k,D,dtype,kv_lens", CASES, ids=CASE_IDS)
def test_fp8_kernel_matches_fp8_reference_and_is_close_to_exact(B, H, n_q, n_k, D, dtype, kv_lens):
    q, k, v = _qkv(B, H, n_q, n_k, D, dtype)
    lens = _lens(kv_lens)
    mask = torch.rand(B, H, math.ceil(n_q / BLOCK_M), math.ceil(n_k / BLOCK_N)) < 0.7  # per-head masks
    mask[..., 0] = True
    mask[0, 0, 0] = False  # an empty query block
    out = block_sparse_attention(q, k, v, mask, kv_lens=lens, fp8=True)
    fp8_ref = _reference(q, k, v, mask, kv_lens=lens, fp8=True)
    exact = _reference(q, k, v, mask, kv_lens=lens)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.count_nonzero(out[0, 0, :BLOCK_M]) == 0
    assert _rel_l1(out, fp8_ref) < 0.1 * _rel_l1(fp8_ref, exact)  # far closer than the quantisation error
    torch.testing.assert_close(out.float(), fp8_ref.float(), **FP8_REF_TOL[dtype])
    assert _rel_l1(out, exact) < EXACT_REL_L1


def test_fp8_kernel_keeps_the_layout_of_diffusers_tensors():
    q, k, v = _qkv(1, 3, 200, 200, 64, torch.bfloat16, "BNHD")
    mask = torch.ones(1, 3, 2, 4, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, fp8=True)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out.float(), _reference(q, k, v, mask, fp8=True).float(), **FP8_REF_TOL[torch.bfloat16])


def test_fp8_steps_of_two_key_blocks():
    q, k, v = _qkv(1, 2, 256, 600, 64, torch.float16)
    mask = torch.rand(1, 2, 2, 10) < 0.6
    mask[..., 0] = True
    lens = torch.tensor([550], dtype=torch.int32)
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens)
    out = attention_from_lut(q, k, v, build_block_lut(mask, 600, lens), 0.125, kv_lens=lens, config=TileConfig(2, 4, 2),
                             quantized=quantized)
    # Two blocks per step quantise P against other running maxima than the reference's one block.
    assert _rel_l1(out, _reference(q, k, v, mask, scale=0.125, kv_lens=lens, fp8=True)) < 0.03
    assert _rel_l1(out, _reference(q, k, v, mask, scale=0.125, kv_lens=lens)) < EXACT_REL_L1


def test_fp8_pv_threshold():
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    mask = torch.rand(1, 2, 2, 4) < 0.8
    mask[..., 0] = True
    plain = block_sparse_attention(q, k, v, mask, fp8=True)
    out, skips = block_sparse_attention(q, k, v, mask, pv_threshold=1e-30, return_pv_skips=True, fp8=True)
    assert int(skips.sum()) == 0
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    q, k, v = _dominant_first_block()  # later key blocks are negligible: skipped
    full = torch.ones(1, 1, 2, 4, dtype=torch.bool)
    out, skips = block_sparse_attention(q, k, v, full, scale=1 / 8, pv_threshold=1e-3, return_pv_skips=True, fp8=True)
    assert skips.tolist() == [[[3, 3]]]
    assert _rel_l1(out, _reference(q, k, v, full, scale=1 / 8)) < EXACT_REL_L1


def test_fp8_cpu_fallback_without_interpreter_is_quantised(monkeypatch):
    q, k, v = _qkv(1, 2, 200, 200, 64, torch.float32)
    mask = torch.rand(1, 2, 2, 4) < 0.6
    mask[..., 0] = True
    kernel = block_sparse_attention(q, k, v, mask, fp8=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = block_sparse_attention(q, k, v, mask, fp8=True)
    torch.testing.assert_close(out, _reference(q, k, v, mask, fp8=True), rtol=0, atol=0)
    assert _rel_l1(out, _reference(q, k, v, mask)) > 0.01  # quantised, not exact
    assert _rel_l1(kernel, out) < FP8_REF_REL_L1


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_fp8_must_be_a_bool(value):
    q, k, v = _qkv(1, 2, 200, 200, 64, torch.float16)
    mask = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^fp8\b"):
        block_sparse_attention(q, k, v, mask, fp8=value)
    with pytest.raises(ValueError, match=r"^fp8\b"):
        sparse_attention(q, k, v, fp8=value)


def test_sparse_attention_passes_fp8_to_the_kernel():
    q, k, v = _qkv(1, 2, 256, 256, 64, torch.float16)
    full = torch.ones(1, 2, 2, 4, dtype=torch.bool)
    torch.testing.assert_close(sparse_attention(q, k, v, 1.0, fp8=True), block_sparse_attention(q, k, v, full, fp8=True),
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------- processors


def test_processors_run_fp8_finite_and_close_to_dense():
    model = build_wan()
    inputs = wan_inputs(model)
    with torch.no_grad():
        dense = model(**inputs)[0]
        handle = apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0, fp8=True)
        out = model(**inputs)[0]
        handle.remove()
        apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0)
        exact = model(**inputs)[0]
    assert torch.isfinite(out).all()
    assert handle.stats.mean_sparsity() == 0.0  # it ran sparse, every block kept
    assert 0 < _rel_l1(out, dense) < 0.02  # quantised attention, then the rest of the block
    torch.testing.assert_close(exact, dense, atol=2e-5, rtol=1e-4)


def test_apply_refuses_a_non_bool_fp8():
    with pytest.raises(ValueError, match=r"^fp8\b"):
        apply(build_wan(), fp8="on")


def test_compiled_transformer_carries_fp8_through_the_custom_op():
    from torch._dynamo.utils import counters

    model = build_wan()
    inputs = wan_inputs(model)
    handle = apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0, fp8=True)
    with torch.no_grad():
        eager = model(**inputs)[0]
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)[0]
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    handle.remove()
    with torch.no_grad():
        assert _rel_l1(model(**inputs)[0], eager) > 1e-4  # the FP8 path did run in both
    torch._dynamo.reset()


@pytest.fixture
def old_gpu(monkeypatch):
    """torch.cuda answering as an A100 (compute capability 8.0, no e4m3 tensor cores)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")


def test_fp8_refused_on_gpus_without_e4m3_tensor_cores(old_gpu, render_plan, monkeypatch):
    from sparsediff.apps.demo import THRESHOLDS, DemoSession, InputError, Request
    from sparsediff.kernels.block_sparse_attn import fp8_unsupported
    from sparsediff.pipelines import render
    from sparsediff.pipelines.recipes import get_recipe

    cuda = torch.device("cuda", 0)
    assert "8.9 or newer" in fp8_unsupported(cuda) and "A100-SXM4-80GB has 8.0" in fp8_unsupported(cuda)
    assert fp8_unsupported(torch.device("cpu")) is None
    # The command line and the demo refuse before loading a model (apply() would run those calls dense).
    plan = render_plan("--model", "tiny-wan", "--fp8")
    monkeypatch.setattr(type(plan.recipe), "load", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(render.RenderError, match="--fp8: the FP8 path needs"):
        render.Renderer(plan, cuda)
    session = DemoSession(get_recipe("tiny-wan"), pipe=None, device=cuda)
    request = Request(prompt="a red ball", negative_prompt=None, seed=0, steps=2, height=256, width=256, frames=5,
                      source=THRESHOLDS, fp8=True)
    with pytest.raises(InputError, match="FP8: the FP8 path needs"):
        session._check(request)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unsupported(cuda) is None and session._check(request).fp8
