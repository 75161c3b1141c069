"""Triton kernels, each with a plain-torch reference beside it."""
import torch
import triton
import triton.language as tl


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to the power of two (>= 16: tl.dot's minimum) that the kernels' tiles use."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def valid_length(lens_ptr, b, n, HAS_LENS: tl.constexpr):
    """Tokens of batch entry b that count: min(lens[b], n) with per-batch lengths, else n."""
    if HAS_LENS:
        return tl.minimum(tl.load(lens_ptr + b), n)
    return n


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a TMA tensor descriptor can cover `t` as it is: a contiguous last dimension, and a
    16-byte aligned base and other strides."""
    align = 16 // t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st % align == 0 for st in t.stride()[:-1])
