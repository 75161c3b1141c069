"""Triton kernels, each with a plain-torch reference beside it."""
import triton


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to the power of two (>= 16: tl.dot's minimum) that the kernels' tiles use."""
    return max(16, triton.next_power_of_2(head_dim))
