"""Where kernels can run, on which GPU they launch, log-once messages for fallbacks, and CUDA
graph capture."""
from __future__ import annotations

import functools
import itertools
import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import triton

T = TypeVar("T")

logger = logging.getLogger("sparsediff")

_said: set[str] = set()


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET=1), read as Triton reads
    it: "true", "on" or "yes" turn it on too, and "false", "off" or "no" leave it off (the kernels
    would then be launched uninterpreted on CPU tensors)."""
    knobs = getattr(triton, "knobs", None)  # Triton 3.4 on; earlier ones interpret for "1" only
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_available(device: torch.device) -> bool:
    """Whether our Triton kernels can run on tensors living on `device`."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def on_tensor_device(fn: Callable[..., T]) -> Callable[..., T]:
    """fn run with the CUDA device of its first tensor argument made current. Triton launches its
    kernels (and torch captures graphs) on the current device, while a pipeline spread over several
    GPUs (diffusers' device_map) hands over tensors that may live on another one. Where that device
    is current already (always on one GPU, and in the nested calls) nothing is switched."""

    @functools.wraps(fn)
    def on_device(*args, **kwargs):
        tensor = next((a for a in itertools.chain(args, kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if tensor is None or tensor.device.type != "cuda" or tensor.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return fn(*args, **kwargs)

    return on_device


def warn_once(cause: str, message: str) -> None:
    """Log `message` the first time `cause` is seen in this process."""
    if cause not in _said:
        _said.add(cause)
        logger.warning(message)


def capture_cuda_graph(fn: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn's GPU work captured (not run) in a CUDA graph, and what fn returned: tensors in the
    graph's private memory, rewritten by every replay. fn must have run once before (Triton
    compiles and autotunes outside a capture) and must not sync with the device."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads' CUDA calls (a data loader, a UI) may go on during the capture.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result = fn()
    return graph, result
