"""Processors, apply()/remove(), the controller's step schedule and fallbacks, on tiny random models.

Sparse calls run the real Triton kernels under the interpreter (a few seconds each): tests keep
to one forward per claim, with one attention layer per block type.
"""
import dataclasses
import json
import logging

import pytest
import torch
from diffusers.hooks import HookRegistry

from sparsediff import _runtime
from sparsediff.processors import (
    AttentionController,
    CogVideoXSparseAttnProcessor,
    FluxSparseAttnProcessor,
    HunyuanVideoSparseAttnProcessor,
    WanSparseAttnProcessor,
    apply,
    remove,
)
from sparsediff.processors import controller as controller_module
from sparsediff.processors import api, cogvideox, families, wan
from sparsediff.processors.controller import FALLBACK_CAUSES
from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
from sparsediff.processors.flux import image_grid_from_ids
from sparsediff.profile import SparsityProfile
from tiny_models import GRID, TEXT_TOKENS, TINY, build_cogvideox, build_wan, build_wan_pipeline, cogvideox_inputs, wan_inputs

PROCESSOR = {
    "wan": WanSparseAttnProcessor,
    "hunyuan_video": HunyuanVideoSparseAttnProcessor,
    "cogvideox": CogVideoXSparseAttnProcessor,
    "flux": FluxSparseAttnProcessor,
}
BATCH = {"hunyuan_video": 2}  # two different text lengths (kv_lens) in one batch


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("family", list(TINY))
def test_every_block_kept_equals_stock(family):
    build, make_inputs = TINY[family]
    model = build()
    inputs = make_inputs(model, batch=BATCH.get(family, 1))
    ref = _run(model, inputs)
    handle = apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0)
    out = _run(model, inputs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert handle.stats.mean_sparsity() == 0.0  # it did run sparse (stats are recorded) and kept all
    assert len(handle.stats.steps) == 1
    remove(model)


class _RecordingController(AttentionController):
    """Keeps every sparse call's inputs, output and mask."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def run_sparse(self, call, q, k, v):
        out, mask = super().run_sparse(call, q, k, v)
        self.calls.append((call, q, k, v, out, mask))
        return out, mask


@pytest.mark.parametrize("family", list(TINY))
def test_sparse_setting_is_the_kernel_on_its_mask_with_the_text_dense(family):
    build, make_inputs = TINY[family]
    model = build()
    inputs = make_inputs(model, batch=BATCH.get(family, 1))
    ref = _run(model, inputs)
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=0, controller_cls=_RecordingController)
    out = _run(model, inputs)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, ref, atol=1e-4)
    per_head = handle.stats.per_layer_head()
    assert per_head.shape == (len(handle.stats.layer_names), 2)
    assert (per_head > 0).all() and (per_head < 1).all()
    # Each sparse call is the kernel's attention on its own mask, and the text segment (moved last)
    # is attended densely both ways: its query blocks keep every valid key block, and every query
    # block keeps the key blocks that hold text.
    calls = handle.controller.calls
    assert calls and (family == "wan" or all(call.text_tokens > 0 for call, *_ in calls))
    for call, q, k, v, o, mask in calls:
        torch.testing.assert_close(o, block_sparse_attention_reference(
            q, k, v, mask, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=call.kv_lens).to(o.dtype), atol=2e-5, rtol=1e-4)
        n, text = q.shape[2], call.text_tokens
        kv_lens = call.kv_lens.tolist() if call.kv_lens is not None else [n] * q.shape[0]
        for b, kv_len in enumerate(kv_lens):
            valid_kb = -(-kv_len // BLOCK_N)
            if text:
                assert mask[b, :, (n - text) // BLOCK_M:, :valid_kb].all()
                assert mask[b, :, :, (n - text) // BLOCK_N:valid_kb].all()
            assert not mask[b, :, :, valid_kb:].any()
    remove(model)


@pytest.mark.parametrize("family", list(TINY))
def test_apply_sets_our_processors_only_where_sparse_and_remove_restores_stock(family):
    build, make_inputs = TINY[family]
    model = build()
    inputs = make_inputs(model)
    stock = dict(model.attn_processors)
    ref = _run(model, inputs)
    handle = apply(model, dense_steps=100)  # dense throughout: no kernel needed here
    swapped = model.attn_processors
    ours = {k for k, p in swapped.items() if isinstance(p, PROCESSOR[family])}
    assert ours == {n.removeprefix("transformer.") for n in handle.controller.layer_names}
    assert all(swapped[k] is stock[k] for k in stock if k not in ours)
    if family == "wan":
        assert ours == {"blocks.0.attn1.processor"}
    if family == "hunyuan_video":
        assert not any(k.startswith("context_embedder") for k in ours)
    assert torch.equal(_run(model, inputs), ref)  # dense steps run the stock computation
    remove(model)
    assert all(model.attn_processors[k] is stock[k] for k in stock)
    assert torch.equal(_run(model, inputs), ref)
    assert "sparsediff" not in model._diffusers_hook.hooks


def test_tile_and_raster_orders_both_exact():
    model = build_wan()
    inputs = wan_inputs(model)
    ref = _run(model, inputs)
    for order in ("tiles", "raster"):
        apply(model, cdf_threshold=1.0, dense_steps=0, token_order=order)
        torch.testing.assert_close(_run(model, inputs), ref, atol=2e-5, rtol=1e-4)
        remove(model)


def _steps(model, timesteps, make_inputs=wan_inputs):
    """One forward per timestep (a denoising step each); the outputs and the token gathers per step.
    A tensor timestep replaces the inputs' own (per-token timesteps)."""
    outputs, gathers = [], []
    for timestep in timesteps:
        before = controller_module.gather_tokens.calls
        outputs.append(_run(model, make_inputs(model, timestep=timestep) if not isinstance(timestep, torch.Tensor)
                            else {**make_inputs(model), "timestep": timestep}))
        gathers.append(controller_module.gather_tokens.calls - before)
    return outputs, gathers


@pytest.fixture
def counted_gathers(monkeypatch):
    gather = controller_module.gather_tokens

    def counting(*args, **kwargs):
        counting.calls += 1
        return gather(*args, **kwargs)

    counting.calls = 0
    monkeypatch.setattr(controller_module, "gather_tokens", counting)


def _without_token_order_sites(monkeypatch, family=wan.FAMILY):
    monkeypatch.setitem(families.FAMILY_SPECS, family.name, dataclasses.replace(family, token_order_sites=()))


# Per-token timesteps (Wan 2.2 TI2V): the first latent frame (a conditioning image) at 0.
_PER_TOKEN = torch.cat([torch.zeros(GRID[1] * GRID[2]), torch.full((GRID[1] * GRID[2],), 700.0)])[None]


@pytest.mark.parametrize("timesteps", [(900.0, 800.0), (900.0, _PER_TOKEN)], ids=["timestep", "per-token"])
def test_wan_forward_holds_tokens_in_attention_order(monkeypatch, counted_gathers, timesteps):
    # A sparse step's forward puts its tokens in tile order at the patch embedding and the rotary
    # tables and back at the output projection: its sparse calls gather nothing, and the outputs and
    # masks are those of per-call reordering. The dense warm-up step keeps raster order (the stock
    # output bit for bit: test_dense_steps_schedule_and_cfg_as_two_calls).
    model = build_wan(num_layers=2)
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    ordered, ordered_gathers = _steps(model, timesteps)
    ordered_sparsity = handle.stats.per_layer_step()
    remove(model)
    assert all(HookRegistry.check_if_exists_or_initialize(model.get_submodule(site.module)).hooks == {}
               for site in wan.FAMILY.token_order_sites)
    _without_token_order_sites(monkeypatch)
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    per_call, per_call_gathers = _steps(model, timesteps)
    assert ordered_gathers == [0, 0] and per_call_gathers == [0, 2 * 2]  # q, k, v in and the output back, 2 layers
    torch.testing.assert_close(handle.stats.per_layer_step(), ordered_sparsity, rtol=0, atol=0)
    assert (ordered_sparsity[:, 1] > 0).all()
    for out, ref in zip(ordered, per_call):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    remove(model)


@pytest.mark.parametrize("dense_layer", [False, True])
def test_cogvideox_forward_holds_video_in_attention_order_and_joins_text_last(monkeypatch, counted_gathers, dense_layer):
    # CogVideoX joins [text ; video] in every block. A sparse step's forward puts its video tokens in
    # tile order at the patch embedding (the text stays first there) and its rotary tables with them,
    # and the processors join [video ; text]: a sparse call moves nothing in and only its output back
    # text first, where per-call reordering gathers q, k, v and the output. Outputs and masks are the
    # same; so with a profile-dense layer, whose stock call runs on the joint sequence as it comes.
    model = build_cogvideox(num_layers=2)
    timesteps = (900.0, 800.0)

    def applied():
        handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
        if dense_layer:
            layer = handle.controller.layer_names[0]
            handle.controller.profile.layers[layer] = dataclasses.replace(handle.controller.profile.layers[layer], dense=True)
        return handle

    handle = applied()
    ordered, ordered_gathers = _steps(model, timesteps, cogvideox_inputs)
    ordered_sparsity = handle.stats.per_layer_step()
    remove(model)
    _without_token_order_sites(monkeypatch, cogvideox.FAMILY)
    handle = applied()
    per_call, per_call_gathers = _steps(model, timesteps, cogvideox_inputs)
    assert ordered_gathers == [0, 2] and per_call_gathers == [0, 2 if dense_layer else 4]  # outputs back / in and back
    torch.testing.assert_close(handle.stats.per_layer_step(), ordered_sparsity, rtol=0, atol=0)
    assert (ordered_sparsity[int(dense_layer):, 1] > 0).all()
    for out, ref in zip(ordered, per_call):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    remove(model)


@pytest.mark.parametrize("route", ["enable_cache", "apply_first_block_cache"])
def test_wan_with_a_diffusers_cache_reorders_per_call(counted_gathers, route):
    # A diffusers cache carries tensors from step to step: the forwards keep raster order throughout,
    # whether `enable_cache` or diffusers.hooks' public `apply_first_block_cache` put it there (the
    # latter leaves `is_cache_enabled` False). A cache that skips the blocks of the first sparse step
    # then adds the dense step's residual to tokens in the same order: all kept, the output is exact.
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import apply_first_block_cache

    def cached_model(threshold):
        model = build_wan(num_layers=2)
        if route == "enable_cache":
            model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        else:
            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        return model

    model = cached_model(0.0)  # never skips a block
    apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    with model.cache_context("cond"):
        _, gathers = _steps(model, (900.0, 800.0))
    assert gathers == [0, 2 * 2]
    remove(model)
    stock = cached_model(1e9)  # always skips the blocks after the first one once it has a residual
    with stock.cache_context("cond"):
        ref, _ = _steps(stock, (900.0, 800.0))
    model = cached_model(1e9)
    apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=1)
    with model.cache_context("cond"):
        out, _ = _steps(model, (900.0, 800.0))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    remove(model)


def test_a_cache_is_looked_for_once_a_generation(monkeypatch, counted_gathers):
    # The walk over the modules costs about a millisecond at Wan 1.3B: once a generation, not every forward.
    from diffusers import FirstBlockCacheConfig
    from diffusers.hooks import apply_first_block_cache

    walks = []
    has_cache_hooks = api._has_cache_hooks
    monkeypatch.setattr(api, "_has_cache_hooks", lambda transformer: walks.append(1) or has_cache_hooks(transformer))
    model = build_wan(num_layers=2)
    apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    _, gathers = _steps(model, (900.0, 800.0, 700.0))
    assert len(walks) == 1 and gathers == [0, 0, 0]  # no cache: the sparse steps hold tile order
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))  # between two generations
    with model.cache_context("cond"):
        _, gathers = _steps(model, (900.0, 800.0))
    assert len(walks) == 2 and gathers == [0, 2 * 2]  # the new generation finds it: per-call reordering
    remove(model)


def test_bf16_all_kept_matches_stock():
    model = build_wan().to(torch.bfloat16)
    inputs = wan_inputs(model)
    ref = _run(model, inputs)
    apply(model, cdf_threshold=1.0, dense_steps=0)
    out = _run(model, inputs)
    remove(model)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().mean() < 2e-3 * ref.float().abs().mean() + 1e-3


def test_dense_steps_schedule_and_cfg_as_two_calls():
    model = build_wan()
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    cond, uncond = wan_inputs(model, timestep=900, seed=1), wan_inputs(model, timestep=900, seed=5)
    ref = _run(model, cond)
    remove(model)
    stock_ref = _run(model, cond)
    assert torch.equal(ref, stock_ref)  # step 0 is dense: exactly the stock output
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1, pv_threshold=0.05)
    _run(model, cond)
    _run(model, uncond)  # same timestep: still step 0
    assert handle.step == 0
    sparse = _run(model, wan_inputs(model, timestep=800, seed=1))
    assert handle.step == 1
    table = handle.stats.per_layer_step()
    assert handle.stats.steps == [0, 1]
    assert table[0, 0] == 0.0 and table[0, 1] > 0.0
    assert handle.stats.mean_sparsity(after_dense_steps=True) == pytest.approx(table[0, 1].item())
    assert handle.stats.mean_sparsity(after_dense_steps=False) < table[0, 1]
    assert torch.isfinite(sparse).all()
    _run(model, wan_inputs(model, timestep=950))  # timestep went up: a new generation
    assert (handle.step, handle.controller.generation) == (0, 1)
    json.dumps(handle.stats.as_dict())
    handle.reset()
    assert handle.step == 0 and handle.stats.steps == []
    handle.remove()
    assert not any(isinstance(p, WanSparseAttnProcessor) for p in model.attn_processors.values())


def test_processors_set_by_hand_say_that_without_apply_the_step_stays_0(monkeypatch, caplog):
    # The README offers the processors for set_attn_processor; without apply()'s step hook every call
    # is step 0, dense under the default dense steps: the log says so instead of nothing.
    model = build_wan()
    inputs = wan_inputs(model)
    ref = _run(model, inputs)
    monkeypatch.setattr(_runtime, "_said", set())
    controller = AttentionController(SparsityProfile.uniform(model))
    model.set_attn_processor({name: WanSparseAttnProcessor(f"transformer.{name}", controller)
                              if name.endswith("attn1.processor") else processor
                              for name, processor in model.attn_processors.items()})
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        assert torch.equal(_run(model, inputs), ref)
    assert [r.getMessage() for r in caplog.records if "outside a transformer forward hooked" in r.getMessage()] == [
        "sparsediff: attention called outside a transformer forward hooked by sparsediff.apply(): the denoising "
        "step stays 0, so every call runs dense (the profile's dense_steps=2); install the processors with "
        "sparsediff.apply()"]
    caplog.clear()
    applied = build_wan()
    apply(applied, cdf_threshold=0.3)
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        _run(applied, inputs)
    assert not any("outside a transformer forward hooked" in r.getMessage() for r in caplog.records)


def test_reapply_restores_the_same_sparse_attention_after_remove():
    # render --compare-dense and the demo switch dense and sparse per render: reapply() keeps the
    # controller (and with it the CUDA graphs it captured) where a new apply() would start over.
    model = build_wan()
    inputs = wan_inputs(model)
    stock = _run(model, inputs)
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=0)
    sparse = _run(model, inputs)
    assert not torch.equal(sparse, stock)
    handle.remove()
    assert torch.equal(_run(model, inputs), stock)
    handle.reapply()
    processors = [p for p in model.attn_processors.values() if isinstance(p, WanSparseAttnProcessor)]
    assert processors and all(p.controller is handle.controller for p in processors)
    handle.reset()
    assert torch.equal(_run(model, inputs), sparse)
    assert handle.stats.steps == [0]
    with pytest.raises(ValueError, match="already applied"):
        handle.reapply()
    with pytest.raises(ValueError, match="already applied"):
        apply(model)
    handle.remove()
    assert torch.equal(_run(model, inputs), stock)


def test_explicit_thresholds_override_the_profile():
    model = build_wan()
    profile = SparsityProfile.uniform(model, cdf_threshold=0.5, sim_threshold=0.3, dense_steps=4)
    handle = apply(model, profile, cdf_threshold=0.8)
    layer = handle.profile.layers["transformer.blocks.0.attn1.processor"]
    assert layer.cdf_threshold == [0.8, 0.8] and layer.sim_threshold == [0.3, 0.3]
    assert handle.profile.dense_steps == 4
    remove(model)


def test_mismatched_profile_and_bad_arguments_are_refused():
    profile = SparsityProfile.uniform(build_wan(num_layers=2))
    model = build_wan(num_layers=1)
    with pytest.raises(ValueError, match="not in the model"):
        apply(model, profile)
    with pytest.raises(ValueError, match="pipe_or_transformer"):
        apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="token_order"):
        apply(model, token_order="zigzag")
    apply(model)
    with pytest.raises(ValueError, match="already applied"):
        apply(model)
    remove(model)
    remove(model)  # removing twice is a no-op


def test_a_removed_handle_leaves_a_later_apply_in_place():
    model = build_wan()
    first = apply(model)
    first.remove()
    second = apply(model)
    first.remove()
    processors = [p for p in model.attn_processors.values() if isinstance(p, WanSparseAttnProcessor)]
    assert processors and all(p.controller is second.controller for p in processors)
    second.remove()
    assert not any(isinstance(p, WanSparseAttnProcessor) for p in model.attn_processors.values())


def test_a_layer_with_another_processor_is_refused_and_left_as_it_is():
    # An IP-Adapter's processor adds image conditioning that a sparse processor would silently drop.
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class AdapterProcessor(WanAttnProcessor):
        pass

    model = build_wan()
    processors = dict(model.attn_processors)
    adapted = "blocks.0.attn1.processor"
    processors[adapted] = AdapterProcessor()
    model.set_attn_processor(processors)
    with pytest.raises(ValueError, match=r"stock WanAttnProcessor, .*transformer\.blocks\.0\.attn1\.processor "
                                         r"\(AdapterProcessor\)"):
        apply(model)
    assert type(model.attn_processors[adapted]) is AdapterProcessor
    assert HookRegistry.check_if_exists_or_initialize(model).get_hook("sparsediff") is None
    cogvideox_model = build_cogvideox()
    cogvideox_model.fuse_qkv_projections()  # diffusers' fused processor is a stock one
    apply(cogvideox_model).remove()


def test_stats_as_dict_is_json_when_every_recorded_step_is_dense():
    # Only dense warm-up steps recorded: no mean sparsity after them (None in the JSON, as the tables' NaN).
    model = build_wan()
    handle = apply(model, dense_steps=2)
    _run(model, wan_inputs(model))
    summary = json.loads(json.dumps(handle.stats.as_dict(), allow_nan=False))
    assert summary["mean_sparsity"] is None and summary["steps"] == [0]
    remove(model)


def test_profile_dense_layer_runs_stock():
    model = build_wan(num_layers=2)
    inputs = wan_inputs(model)
    ref = _run(model, inputs)
    profile = SparsityProfile.uniform(model, cdf_threshold=0.3, dense_steps=0)
    for layer in profile.layers.values():
        layer.dense = True
    handle = apply(model, profile)
    assert torch.equal(_run(model, inputs), ref)
    assert handle.stats.mean_sparsity() == 0.0
    remove(model)


def test_fallbacks_run_the_stock_computation_and_say_so_once(monkeypatch, caplog):
    model = build_wan()
    inputs = wan_inputs(model)
    ref = _run(model, inputs)
    monkeypatch.setattr(_runtime, "_said", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: no kernels
    handle = apply(model, cdf_threshold=0.3, dense_steps=0)
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        assert torch.equal(_run(model, inputs), ref)
        assert torch.equal(_run(model, inputs), ref)
    assert [r.getMessage() for r in caplog.records].count(
        "sparsediff: Triton kernels unavailable on this device (CPU needs TRITON_INTERPRET=1); "
        "attention runs dense (stock SDPA)") == 1
    # Every self-attention call of both forwards is counted with its cause, for the sidecars.
    assert handle.stats.as_dict()["dense_fallbacks"] == [
        {"cause": "device", "reason": FALLBACK_CAUSES["device"], "calls": 2 * len(handle.controller.layer_names)}]
    remove(model)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    handle = apply(model, cdf_threshold=0.3, dense_steps=0)
    handle.controller.min_query_blocks = 16  # 768 tokens = 6 query blocks: too short now
    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        assert torch.equal(_run(model, inputs), ref)
    assert any("only a few query blocks" in r.getMessage() for r in caplog.records)
    assert dict(handle.stats.fallbacks) == {"short": len(handle.controller.layer_names)}
    remove(model)
    model64 = build_wan().double()  # fp64: unsupported dtype
    ref64 = _run(model64, wan_inputs(model64))
    apply(model64, cdf_threshold=0.3, dense_steps=0)
    assert torch.equal(_run(model64, wan_inputs(model64)), ref64)
    remove(model64)


def test_hunyuan_mask_that_is_not_right_padding_runs_dense():
    build, _ = TINY["hunyuan_video"]
    model = build()
    attn = model.transformer_blocks[0].attn
    hidden = torch.randn(1, 768, 64)
    text = torch.randn(1, TEXT_TOKENS, 64)
    mask = torch.ones(1, 1, 1, 768 + TEXT_TOKENS, dtype=torch.bool)
    mask[..., 768:770] = False  # left-padded text
    with torch.no_grad():
        ref = attn(hidden, encoder_hidden_states=text, attention_mask=mask)
        apply(model, cdf_threshold=0.3, dense_steps=0)
        out = attn(hidden, encoder_hidden_states=text, attention_mask=mask)
    remove(model)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_flux_grid_is_learnt_from_img_ids():
    build, make_inputs = TINY["flux"]
    ids = make_inputs(build())["img_ids"]
    assert image_grid_from_ids(ids) == (1, 2 * GRID[1], GRID[2])
    assert image_grid_from_ids(ids.flip(0)) is None  # not raster: unknown
    assert image_grid_from_ids(torch.cat([ids, ids])) is None  # two images (Kontext): unknown


class _CountingController(AttentionController):
    """What calibration does: see every sparse call with q, k, v in the attention order."""

    calls: list

    def run_sparse(self, call, q, k, v):
        self.calls.append((call.layer_name, call.step, call.text_tokens, call.grid, call.token_order, q.shape))
        return super().run_sparse(call, q, k, v)


def test_controller_subclass_sees_calls_in_attention_order():
    build, make_inputs = TINY["cogvideox"]
    model = build()
    _CountingController.calls = []
    apply(model, cdf_threshold=1.0, dense_steps=0, controller_cls=_CountingController)
    _run(model, make_inputs(model))
    remove(model)
    assert _CountingController.calls == [
        ("transformer.transformer_blocks.0.attn1.processor", 0, TEXT_TOKENS, GRID, "tiles",
         torch.Size([1, 2, 768 + TEXT_TOKENS, 32]))]


def _embeds(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, TEXT_TOKENS, 32, generator=g)


def _render(pipe, output_type="latent"):
    """Two denoising steps with classifier-free guidance (two transformer calls per step)."""
    return pipe(prompt_embeds=_embeds(0), negative_prompt_embeds=_embeds(1), height=256, width=384, num_frames=5,
                num_inference_steps=2, guidance_scale=5.0, output_type=output_type,
                generator=torch.Generator().manual_seed(0)).frames


def test_wan_pipeline_end_to_end():
    pipe = build_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = _render(pipe)
    handle = apply(pipe, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    frames = _render(pipe, output_type="pt")
    assert frames.shape == (1, 5, 3, 256, 384) and torch.isfinite(frames).all()
    assert handle.stats.steps == [0, 1]
    table = handle.stats.per_layer_step()
    assert table[0, 0] == 0.0 and table[0, 1] > 0.0
    remove(pipe)
    assert torch.equal(_render(pipe), ref)


@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_coexists(offload_first):
    pipe = build_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    ref = _render(pipe)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    handle = apply(pipe, dense_steps=100)  # dense: this is about the hooks, not the kernels
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    for generation in range(2):  # offload re-installs its hooks after every call
        assert torch.equal(_render(pipe), ref)
        assert handle.controller.generation == generation and handle.stats.steps == [0, 1]
    remove(pipe)
    assert torch.equal(_render(pipe), ref)
    assert hasattr(pipe.transformer, "_hf_hook")  # accelerate's hook survived our removal
    handle = apply(pipe, dense_steps=100)
    _render(pipe)
    assert handle.stats.steps == [0, 1]
    remove(pipe)


def test_wan22_pipeline_both_transformers_share_one_controller():
    pipe = build_wan_pipeline()
    pipe.register_modules(transformer_2=build_wan(seed=3))
    handle = apply(pipe, dense_steps=100)
    assert handle.controller.layer_names == ["transformer.blocks.0.attn1.processor",
                                             "transformer_2.blocks.0.attn1.processor"]
    p1 = pipe.transformer.blocks[0].attn1.processor
    p2 = pipe.transformer_2.blocks[0].attn1.processor
    assert p1.controller is p2.controller is handle.controller
    remove(pipe)
    assert not isinstance(pipe.transformer_2.blocks[0].attn1.processor, WanSparseAttnProcessor)


def _lora(model, modules, rank=4, seed=5):
    """A LoRA state dict (diffusers/peft keys, nonzero B) adapting the Linear and Conv `modules` of `model`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        m = model.get_submodule(name)
        ones = [1] * (m.weight.ndim - 2)
        a = torch.randn(rank, *m.weight.shape[1:], generator=g) * 0.1
        state[f"transformer.{name}.lora_A.weight"] = a
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.weight.shape[0], rank, *ones, generator=g) * 0.1
    return state


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_lora_on_token_order_sites_loaded_after_apply_and_unloaded(family):
    """peft wraps the modules a LoRA adapts: loaded after apply(), the token-order hook of the output
    projection (and of Wan's patch embedding) sat inside the wrapper, whose LoRA term joined its output in
    the other token order; reapply() then ordered twice; unloading a LoRA loaded before apply() dropped the
    wrappers' hooks and left the forward half ordered."""
    pytest.importorskip("peft")
    build, make_inputs = TINY[family]
    sites = {"wan": ["proj_out", "patch_embedding"], "cogvideox": ["proj_out"]}[family]
    block = {"wan": "blocks.0.attn1", "cogvideox": "transformer_blocks.0.attn1"}[family]
    model = build()
    inputs = make_inputs(model)
    lora = _lora(model, [*sites, f"{block}.to_q", f"{block}.to_out.0"])
    stock = _run(model, inputs)
    reference = build()
    reference.load_lora_adapter(dict(lora), prefix="transformer")
    with_lora = _run(reference, inputs)
    assert not torch.allclose(with_lora, stock, atol=1e-3)

    handle = apply(model, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0)
    model.load_lora_adapter(dict(lora), prefix="transformer")
    torch.testing.assert_close(_run(model, inputs), with_lora, atol=2e-5, rtol=1e-4)
    remove(model)
    torch.testing.assert_close(_run(model, inputs), with_lora, atol=2e-5, rtol=1e-4)
    handle.reapply()  # hooks the wrappers now
    torch.testing.assert_close(_run(model, inputs), with_lora, atol=2e-5, rtol=1e-4)
    model.unload_lora()
    torch.testing.assert_close(_run(model, inputs), stock, atol=2e-5, rtol=1e-4)
    assert handle.stats.mean_sparsity() == 0.0 and not handle.stats.fallbacks  # the calls ran sparse
    remove(model)
    assert not any("sparsediff.token_order" in m._diffusers_hook.hooks for m in model.modules() if hasattr(m, "_diffusers_hook"))


class _Recorded(AttentionController):
    """A controller whose sparse calls keep every block (the mask the stats count) and are recorded."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def run_sparse(self, call, q, k, v):
        self.calls.append(call)
        mask = torch.ones(q.shape[0], q.shape[1], -(-q.shape[2] // BLOCK_M), -(-k.shape[2] // BLOCK_N), dtype=torch.bool)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), mask


def _one_layer_controller(**layer_fields):
    from sparsediff.profile import LayerProfile

    layer = LayerProfile(heads=2, cdf_threshold=[0.5, 0.5], sim_threshold=[0.0, 0.0], **layer_fields)
    return _Recorded(SparsityProfile(model_id="", family="wan", layers={"l": layer}, dense_steps=0))


def _attend(controller, n_q, n_k=None, batch=1, mask=None):
    q = torch.randn(batch, n_q, 2, 16)
    k = v = torch.randn(batch, n_q if n_k is None else n_k, 2, 16)

    def dense():
        return torch.full_like(q, 7.0)

    return controller.attend("l", q, k, v, dense=dense, text_tokens=0, attention_mask=mask)


def test_controller_decides_dense_or_sparse_per_call_and_counts_why():
    # Mutation round 2: these went unnoticed: a cross-attention call (keys of another length) sent to the
    # kernel, a call of exactly min_query_blocks query blocks refused as "short", a padding mask leaving a
    # batch element no key taken as kv_lens 0, a profile's per-head pv thresholds given to the kernel as their
    # largest (not the strictest, smallest) value, and padded calls counted over the padding's key blocks.
    controller = _one_layer_controller()
    assert torch.equal(_attend(controller, 512, n_k=77), torch.full((1, 512, 2, 16), 7.0))
    assert dict(controller.stats.fallbacks) == {"cross": 1} and controller.calls == []
    _attend(controller, 4 * BLOCK_M)  # exactly min_query_blocks=4 query blocks: sparse
    _attend(controller, 3 * BLOCK_M)
    assert len(controller.calls) == 1 and dict(controller.stats.fallbacks) == {"cross": 1, "short": 1}
    empty_row = torch.ones(2, 1, 1, 512, dtype=torch.bool)
    empty_row[1] = False
    _attend(controller, 512, batch=2, mask=empty_row)
    assert len(controller.calls) == 1 and controller.stats.fallbacks["mask"] == 1
    controller.stats.reset()
    padded = torch.ones(2, 1, 1, 512, dtype=torch.bool)
    padded[1, ..., 100:] = False
    _attend(controller, 512, batch=2, mask=padded)
    assert controller.calls[-1].kv_lens.tolist() == [512, 100]
    assert controller.stats.mean_sparsity() == 0.0  # every valid block kept; 2 + 8 key blocks of 16 are valid
    assert controller.stats._total[(0, 0)] == 4 * (8 + 2)

    strict = _one_layer_controller(pv_threshold=[0.05, 0.02])
    _attend(strict, 512)
    assert strict.calls[-1].pv_threshold == 0.02
    never = _one_layer_controller(pv_threshold=[0.0, 0.02])  # a head that never skips: no P·V skip for the call
    _attend(never, 512)
    assert never.calls[-1].pv_threshold is None
