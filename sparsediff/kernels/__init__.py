"""Triton kernels, each with a plain-torch reference beside it."""
import functools
import os

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


@triton.jit
def program_row(program, order_ptr, counts_ptr, QB, H, HEAVY_FIRST: tl.constexpr):
    """The `BlockLut` row a program takes (heavy rows first through order_ptr, else in row order), and
    that row's query block, (batch entry, head) slice, batch entry, head and kept-block count. Shared by
    the Triton attention kernel and the Gluon one (Gluon calls `triton.jit` functions too)."""
    row = program
    if HEAVY_FIRST:
        row = tl.load(order_ptr + program)
    bh = row // QB
    return row, row % QB, bh, bh // H, bh % H, tl.load(counts_ptr + row)


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether a TMA tensor descriptor can cover `t` as it is: a contiguous last dimension, and a
    16-byte aligned base and other strides."""
    align = 16 // t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st % align == 0 for st in t.stride()[:-1])


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index)[0] < 9:  # griddepcontrol is sm90 on
        return False
    try:  # Triton's launch option (3.4 on)
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def dependent_launch(device: torch.device) -> dict:
    """Launch options of our kernels on `device`: programmatic dependent launch (PDL) on Hopper and
    later, so that a kernel's launch and its programs' start overlap the end of the kernel before
    it (a prediction is three to four short kernels in a row, then attention), else none. SPARSEDIFF_PDL=0 turns it
    off. Each kernel takes them as its PDL constexpr and calls `wait_for_prior_kernel(PDL)` first."""
    on = (device.type == "cuda" and os.environ.get("SPARSEDIFF_PDL", "1") != "0"
          and _pdl_capable(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def wait_for_prior_kernel(PDL: tl.constexpr):
    """A PDL-launched kernel's first step: its programs may start while the kernel before it still
    runs, so they wait until it has finished and its writes are visible (before any load or store:
    the caching allocator may hand this kernel memory the one before still reads), then let the
    next kernel launch in turn; it starts once every program here has passed this point."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
