"""torch.compile of a transformer with sparse processors: no graph breaks, no recompiles from step to step
(dense warm-up step to sparse steps included), and the eager outputs.

The sparse calls run the real Triton kernels under the interpreter. "aot_eager" traces through
AOTAutograd (what Inductor sees) and runs the graph eagerly; "eager" only checks Dynamo's capture.
"""
import pytest
import torch
from torch._dynamo.utils import counters

from sparsediff.processors import SparseAttnProcessorBase, apply, remove
from sparsediff.processors.families import family_of
from tiny_models import TINY

TIMESTEPS = (900.0, 800.0, 700.0)  # step 0 dense (dense_steps=1), steps 1 and 2 sparse


def _denoise(model, step_inputs):
    with torch.no_grad():
        return [model(**inputs)[0] for inputs in step_inputs]


def _applied_and_eager(family):
    """A two-block tiny `family` model with sparsediff applied (one dense step, then sparse), its step
    inputs, the handle (reset, and Dynamo with it, for a compiled run), and the eager outputs and
    per-layer, per-step sparsity."""
    build, make_inputs = TINY[family]
    model = build(num_layers=2)
    step_inputs = [make_inputs(model, timestep=t) for t in TIMESTEPS]
    handle = apply(model, cdf_threshold=0.3, sim_threshold=0.0, dense_steps=1)
    eager = _denoise(model, step_inputs)
    eager_sparsity = handle.stats.per_layer_step()
    handle.reset()
    torch._dynamo.reset()
    return model, step_inputs, handle, eager, eager_sparsity


@pytest.mark.parametrize("family,how", [("wan", "whole"), ("wan", "repeated_blocks"), ("cogvideox", "whole")])
def test_compiled_has_no_graph_breaks_no_recompiles_and_eager_outputs(family, how):
    # Two blocks: `compile_repeated_blocks` must reuse one graph for both. CogVideoX (no repeated
    # blocks declared) joins its text and video in the order the step decides (`join_text`).
    model, step_inputs, handle, eager, eager_sparsity = _applied_and_eager(family)
    counters.clear()
    if how == "whole":
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    else:
        model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
        compiled = model
    with torch._dynamo.config.patch(error_on_recompile=True):
        outputs = _denoise(compiled, step_inputs)

    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    assert handle.stats.steps == [0, 1, 2]
    sparsity = handle.stats.per_layer_step()
    assert (sparsity[:, 0] == 0).all() and (sparsity[:, 1:] > 0).all()  # dense warm-up, then sparse
    torch.testing.assert_close(sparsity, eager_sparsity, rtol=0, atol=0)
    for out, ref in zip(outputs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    handle.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(TINY))
def test_apply_to_compiled_transformer_all_kept_equals_stock(family):
    build, make_inputs = TINY[family]
    model = build()
    # HunyuanVideo: two text lengths in one batch, so the padding mask runs sparse (kv_lens).
    inputs = make_inputs(model, batch=2 if family == "hunyuan_video" else 1)
    ref = _denoise(model, [inputs])[0]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    handle = apply(compiled, cdf_threshold=1.0, sim_threshold=0.0, dense_steps=0)
    torch.testing.assert_close(_denoise(compiled, [inputs])[0], ref, atol=2e-5, rtol=1e-4)
    assert dict(counters["graph_break"]) == {}
    assert handle.stats.steps == [0] and handle.stats.mean_sparsity() == 0.0
    remove(compiled)
    assert not any(isinstance(p, SparseAttnProcessorBase) for p in model.attn_processors.values())
    torch.testing.assert_close(_denoise(compiled, [inputs])[0], ref, atol=0, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_inductor_compiled_forward_equals_eager(family):
    # Inductor (C++ on the CPU) schedules the graph itself: the ops that order tokens and build the
    # joint rotary tables must still follow the step hook's decision (dense step, then sparse steps).
    model, step_inputs, handle, eager, _ = _applied_and_eager(family)
    outputs = _denoise(torch.compile(model, fullgraph=True), step_inputs)
    assert (handle.stats.per_layer_step()[:, 1:] > 0).all()
    for out, ref in zip(outputs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    handle.remove()
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(TINY))
def test_compiled_graph_runs_every_sparsediff_op_after_begin_forward(family):
    # A compiler may run a node as soon as its inputs exist: every op that reads the step hook's decision
    # (token order, joint rotary tables, attention, end of forward) must take an input derived from
    # begin_forward's outputs, Wan's rotary tables too (computed from the latents' shape alone).
    # HunyuanVideo and FLUX have no token-order sites: their attention calls and end of forward.
    model, step_inputs, handle, _, _ = _applied_and_eager(family)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    _denoise(torch.compile(model, backend=capture, fullgraph=True), step_inputs[:1])
    graph, = graphs
    ops = [n for n in graph.nodes if n.op == "call_function" and str(n.target).startswith("sparsediff.")]
    begin, = [n for n in ops if str(n.target).startswith("sparsediff.begin_forward")]
    expected = {"attend", "end_forward"} | ({"order_tokens"} if family_of(model).token_order_sites else set())
    assert {str(n.target).split(".")[1] for n in ops} >= expected
    downstream = {begin}  # graph.nodes is in topological order: one pass finds begin_forward's descendants
    for n in graph.nodes:
        if any(i in downstream for i in n.all_input_nodes):
            downstream.add(n)
    for node in ops:
        assert node in downstream, f"{node.target} ({node.name}) does not follow begin_forward"
    handle.remove()
    torch._dynamo.reset()
