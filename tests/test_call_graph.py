"""The sparse call's CUDA graph (processors/call_graph.py) on the CPU: what one graph serves, that a
call computed from the graph's static buffers equals the call on its own tensors, and that a failed
capture falls back with a warning. Capture and replay need a GPU: scripts/gpu_smoke.py compares
replayed calls with launched ones on the four families' tiny transformers, bf16 and FP8."""
import dataclasses
import logging

import pytest
import torch
from tiny_models import TINY

from sparsediff import _runtime, apply
from sparsediff.attention import head_thresholds
from sparsediff.processors.call_graph import SparseCallGraph
from sparsediff.processors.controller import AttentionCall, AttentionController
from sparsediff.profile import SparsityProfile

HEADS, TOKENS, HEAD_DIM = 2, 768, 32


def _controller(**kwargs) -> AttentionController:
    build, _ = TINY["wan"]
    return AttentionController(SparsityProfile.uniform(build()), **kwargs)


def _call(cdf: float, **changes) -> AttentionCall:
    call = AttentionCall(layer_name="blocks.0", layer_index=0, step=1, heads=HEADS, text_tokens=0, kv_lens=None,
                         grid=(2, 16, 24), token_order="tiles", tile=(1, 8, 16),
                         thresholds=head_thresholds([cdf], 0.0, HEADS, torch.device("cpu")), pv_threshold=None,
                         method=None)
    return dataclasses.replace(call, **changes)


def _qkv(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, TOKENS, HEADS, HEAD_DIM, generator=g).transpose(1, 2) for _ in range(3))


def test_one_graph_serves_calls_that_differ_in_thresholds_layer_and_step_only():
    q = _qkv()[0]
    base = SparseCallGraph.signature(_call(0.5), q)
    assert SparseCallGraph.signature(_call(0.9, layer_name="blocks.7", layer_index=7, step=3), q) == base
    thresholds = head_thresholds([0.5], torch.tensor([0.0, 0.3]), HEADS, torch.device("cpu"))  # runs the sim pass
    different = [
        _call(0.5, fp8=True), _call(0.5, pv_threshold=0.01), _call(0.5, text_tokens=12), _call(0.5, method="qpool"),
        _call(0.5, kv_lens=torch.tensor([700], dtype=torch.int32)), _call(0.5, thresholds=thresholds),
    ]
    for call in different:
        assert SparseCallGraph.signature(call, q) != base, call
    assert SparseCallGraph.signature(_call(0.5), q.contiguous()) != base  # stored (B, H, N, D)
    assert SparseCallGraph.signature(_call(0.5), q[:, :, :640]) != base


def test_calls_on_the_static_buffers_equal_the_calls_and_a_failed_capture_falls_back(caplog, monkeypatch):
    monkeypatch.setattr(_runtime, "_said", set())  # warn_once warns once a process
    controller = _controller()
    q, k, v = _qkv()
    first, second = _call(0.5), _call(0.9, layer_name="blocks.1", layer_index=1)
    graph = SparseCallGraph(first, q)
    assert all(s.shape == q.shape and s.stride() == q.stride() for s in graph.inputs)  # q's layout
    for x, static in zip((q, k, v), graph.inputs):
        static.copy_(x)
    out, mask = graph.run(controller.run_sparse, first)  # the first call of a signature runs eagerly
    ref_out, ref_mask = controller.run_sparse(first, q, k, v)
    assert torch.equal(mask, ref_mask) and torch.equal(out, ref_out)
    assert not graph.failed
    with caplog.at_level(logging.WARNING, logger="sparsediff"):  # the second is captured: no CUDA here
        out, mask = graph.run(controller.run_sparse, second)
    assert graph.failed and "CUDA graph failed" in caplog.text
    ref_out, ref_mask = controller.run_sparse(second, q, k, v)  # the second call's own thresholds
    assert torch.equal(mask, ref_mask) and torch.equal(out, ref_out)
    assert not torch.equal(ref_mask, controller.run_sparse(first, q, k, v)[1])


def test_graphs_stay_off_the_cpu_and_bad_values_are_refused():
    controller = _controller()
    assert controller.cuda_graphs and controller._call_graph(_call(0.5), _qkv()[0]) is None
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        _controller(cuda_graphs="yes")
    build, _ = TINY["wan"]
    with pytest.raises(ValueError, match="cuda_graphs must be a bool"):
        apply(build(), cuda_graphs=1)


def test_static_buffers_made_under_inference_mode_take_writes_outside_it():
    controller = _controller()
    q, k, v = _qkv()
    with torch.inference_mode():
        graph = SparseCallGraph(_call(0.5), q)
    for x, static in zip((q, k, v), graph.inputs):  # a later generation run under no_grad only
        static.copy_(x)
    out, mask = graph.run(controller.run_sparse, _call(0.5))
    assert torch.equal(out, controller.run_sparse(_call(0.5), q, k, v)[0])


def test_graphs_unused_for_a_whole_generation_are_freed():
    from sparsediff.processors.base import ForwardInfo

    controller = _controller()
    q = _qkv()[0]
    old, kept = SparseCallGraph(_call(0.5), q), SparseCallGraph(_call(0.5, fp8=True), q)
    controller._graphs = {"old size": old, "size in use": kept}

    def forward(timestep: float, *, uses: SparseCallGraph | None = None) -> None:
        controller.begin_forward(ForwardInfo(timestep, None, None))
        if uses is not None:  # what _call_graph records for a CUDA call of that signature
            uses.epoch = controller._graph_epoch
        controller.end_forward()

    forward(900.0, uses=old)  # generation 0 uses both sizes
    forward(900.0, uses=kept)
    forward(500.0, uses=kept)
    forward(900.0, uses=kept)  # generation 1: one size only; nothing freed yet
    assert set(controller._graphs) == {"old size", "size in use"}
    forward(900.0)  # the same step (a second CFG call): no new generation
    forward(900.0 + 1, uses=kept)  # generation 2: "old size" went unused through generation 1
    assert controller._graphs == {"size in use": kept}
    controller.reset()  # a reset starts a generation too
    controller.reset()
    assert controller._graphs == {}
