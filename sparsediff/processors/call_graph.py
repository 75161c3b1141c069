"""The sparse attention call as a CUDA graph, replayed at every call of the same signature.

Why: a sparse call launches about a dozen kernels from Python (mask prediction, lookup table, row
order, FP8 quantisation, attention). At FLUX's 4,608 tokens their GPU work takes about 0.3 ms and
launching them takes the host longer, so a compiled FLUX step left the H200 idle 43% (bf16) to 51%
(FP8) of its time (bench-results/h200-2026-12-02/profile-step-flux-compiled.log). A replay is one
launch.

How: one graph per signature (see `SparseCallGraph.signature`: shapes, dtype, memory layout, and
every value `run_sparse` turns into a launch argument). It reads static q, k, v, threshold and
kv_lens buffers. A call writes its tokens into the static q, k, v (the token reordering gathers
straight into them, so that costs nothing where tokens are reordered and one copy where they are
not; long calls whose forward already holds their tokens in the attention order take no graph,
see `ORDERED_GRAPH_MAX_TOKENS`) and its layer's thresholds and key lengths into theirs. The first
call of a signature runs eagerly on those buffers (it compiles and warms up the Triton kernels),
the second is captured, every later one replays. The outputs live in the graph's memory and the next replay rewrites
them: the caller copies them out (its inverse reordering) at once. A graph no call used during a
whole generation is freed when the next one starts (`AttentionController._next_graph_epoch`).

Memory, per signature: the static q, k, v, and the call's output and intermediates (FP8 operands,
block masses, mask, lookup table), about 4x the size of q in bf16, 5.5x with FP8.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from sparsediff._runtime import capture_cuda_graph, warn_once
from sparsediff.attention import HeadThresholds
from sparsediff.layout import empty_stored_like, stored_bnhd

if TYPE_CHECKING:
    from sparsediff.processors.controller import AttentionCall

# AttentionController.run_sparse: (call, q, k, v) -> (output, block mask).
RunSparse = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class SparseCallGraph:
    """`run_sparse` captured for one call signature; `inputs` are the static q, k, v to write first."""

    def __init__(self, call: AttentionCall, q: torch.Tensor) -> None:
        # Normal tensors even under torch.inference_mode: later calls outside it write into them.
        with torch.inference_mode(False):
            self.inputs = tuple(empty_stored_like(q, q.shape[2]) for _ in range(3))  # as the reordering gather stores
            thresholds = call.thresholds
            self._thresholds = HeadThresholds(tuple(torch.empty_like(c) for c in thresholds.cdf),
                                              torch.empty_like(thresholds.sim), thresholds.uses_sim)
            self._kv_lens = None if call.kv_lens is None else torch.empty_like(call.kv_lens)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._warm = False
        self.failed = False  # the capture failed: calls of this signature run without a graph
        self.epoch = 0  # the controller's generation count at the last call (AttentionController._call_graph)

    @staticmethod
    def signature(call: AttentionCall, q: torch.Tensor) -> tuple:
        """What a captured `run_sparse` holds fixed besides the buffers' contents. The layer, step,
        grid and token order are not in it: they act before (the reordering) or not at all."""
        t = call.thresholds
        return (q.device, tuple(q.shape), q.dtype, stored_bnhd(q), call.method, call.text_tokens, call.pv_threshold,
                call.fp8, call.kv_lens is None, len(t.cdf), t.uses_sim)

    def run(self, run_sparse: RunSparse, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor]:
        """`run_sparse(call, *self.inputs)` (the inputs written by the caller): eagerly the first time,
        then captured and replayed. The results are the graph's buffers once it exists: read them
        before the next call."""
        for static, value in zip(self._thresholds.cdf, call.thresholds.cdf):
            static.copy_(value)
        self._thresholds.sim.copy_(call.thresholds.sim)
        if self._kv_lens is not None:
            self._kv_lens.copy_(call.kv_lens)
        if self._graph is None:
            static_call = dataclasses.replace(call, thresholds=self._thresholds, kv_lens=self._kv_lens)
            compute = lambda: run_sparse(static_call, *self.inputs)  # noqa: E731
            if not self._warm:
                self._warm = True
                return compute()
            try:
                self._graph, self._outputs = capture_cuda_graph(compute)
            except RuntimeError as err:
                self.failed = True
                warn_once("cuda-graph", f"sparsediff: capturing a sparse attention call in a CUDA graph failed ({err}); "
                                        "those calls run without one")
                return compute()
        self._graph.replay()
        return self._outputs
