"""GPU timing helpers shared by the benchmarks and the tuning scripts."""
from __future__ import annotations

from collections.abc import Callable

import torch

from sparsediff._runtime import capture_cuda_graph


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns its replay. Times of
    the replay are the GPU's alone: no Python or launch cost, as in a CUDA-graphed pipeline."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph, _ = capture_cuda_graph(fn)
    return graph.replay


def cudnn_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense SDPA through cuDNN, the yardstick every speed ratio is taken against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)
