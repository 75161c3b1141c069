"""Block-sparse flash-attention forward in Triton, with its on-device mask-to-LUT builder.

A bool block mask (B, H, ceil(Nq/BLOCK_M), ceil(Nk/BLOCK_N)) is turned by one Triton kernel into a
lookup table: per (b, h, query block) the number of kept key blocks and their indices in ascending
order. The attention kernel runs one program per (b, h, query block) row and walks only the kept key
blocks of its row: online softmax in fp32 with exp2 (log2(e)*scale folded into one FMA on the
scores), Q held in registers, `STEP_BLOCKS` kept key blocks gathered into one key tile per step.

Heavy rows first (`TileConfig.heavy_rows_first`): rows keep different numbers of key blocks (a
text segment's rows keep all of them), and the GPU starts programs in grid order, so a heavy row
left to the end of the grid runs on while the other SMs idle. The programs therefore take the rows
in decreasing work band (WORK_LEVELS equal bands of the kept fraction; `kernels/row_order.py`, a
counting sort with one program per head, launched with the LUT): the long rows start first and the
short ones fill in behind them. Within a band the rows stay in (b, h, query block) order, so that
programs running together read the same head's keys and share them in L2; a sort by exact count
would mix the heads, and so did an order appended with atomics by the LUT kernel (tried: at Wan's
and CogVideoX's shapes it lost 5% against row order where the exact order gained 1-3%).

Fixed reference maximum (`TileConfig.fixed_max`, on in bf16 without `pv_threshold`): a row's
first step sets each query row's reference maximum, and the later steps keep it: they neither
reduce their scores' maxima nor rescale l_i and the accumulator, which FlashAttention's online
softmax does at every step. A later score above the reference only makes its exponential exceed 1;
acc / l_i is the same quotient whatever factor both carry, and P in bf16 keeps its relative
precision at any magnitude (same error against fp32 attention: 0.0023 relative L1 either way on
random inputs, CPU emulation). Should a later step's scores lie so far above the reference that l_i
reaches 2**64 (overflow risk), the program computes its row again with the running maximum; so
does an fp16 row whose P overflowed fp16's 65504 (its accumulator is then not finite). That happens
on most rows of video-like inputs, so the declared fp16 tiles keep the running maximum. The
saved reductions and multiplies made the kernel 8% faster at Wan's shape and 18% at CogVideoX's in
the tuning run (H200, 2026-12-03, each with its best tile config; TILE_CONFIGS), and 2-6% at Wan's and
HunyuanVideo's shapes, 15-17% at CogVideoX's against the tenth session's table in a later run. The
FP8 path keeps the running maximum: its P must stay within e4m3's range.

`pv_threshold` (SpargeAttn's second stage): a step whose score row maxima are all negligible
against the running row maxima, i.e. exp(m_step[r] - m_running[r]) < pv_threshold for every query
row r of the block (scores already scaled), is dropped from the softmax: its exponentials, its V
loads and its P·V product are skipped. Each dropped block holds at most BLOCK_N * pv_threshold of
the row's softmax mass relative to the running maximum's term, so the relative error stays below
(number of dropped blocks) * BLOCK_N * pv_threshold. The first step of a row is never dropped.

FP8 (`fp8=True`, the FP8 constexpr): q, k, v are first quantised to e4m3 (`quantize_fp8`: per
query-block / key-block / V-channel scales, K smoothed, V transposed). Q·K runs in e4m3 with fp32
accumulation and is dequantised by the program's q scale (folded into qk_scale) times each key
block's scale; P, at most 1 after the max subtraction, is quantised with the static scale 448 (as
SageAttention2), folded into the exponent so that it reaches the row sum too and cancels in
acc / l; P·V runs in e4m3 and the per-channel V scales are applied once, at the end.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsediff._runtime import kernels_available, on_tensor_device, triton_interpreting
from sparsediff.kernels import (
    dependent_launch,
    padded_head_dim,
    program_row,
    tma_compatible,
    valid_length,
    wait_for_prior_kernel,
)
from sparsediff.kernels.block_sparse_attn_reference import (
    block_lut_reference,
    block_sparse_attention_reference,
    valid_key_blocks,
)
from sparsediff.kernels.quantize_fp8 import quantize_fp8, to_e4m3
from sparsediff.kernels.quantize_fp8_reference import E4M3_MAX, Fp8Operands
from sparsediff.kernels.row_order import heavy_rows_first

try:  # Gluon's Hopper language (Triton 3.5 on); without it every call runs the Triton kernel
    from sparsediff.kernels import block_sparse_attn_hopper
except ImportError:
    block_sparse_attn_hopper = None

BLOCK_M = 128  # query rows per mask block (and per program)
BLOCK_N = 64  # key rows per mask block

MAX_HEAD_DIM = 128
WORK_LEVELS = 8  # bands of a row's kept fraction that order the programs (heavy_rows_first)
_INT32_MAX = 2**31 - 1
_LOG2_E4M3_MAX = tl.constexpr(math.log2(E4M3_MAX))
_FIXED_MAX_LIMIT = tl.constexpr(2.0**64)  # l_i at or above it: the row is computed with the running maximum
FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor-core MMA: Ada and Hopper on


@dataclass(frozen=True)
class TileConfig:
    """Launch choices of the attention kernel.

    step_blocks: kept key blocks (BLOCK_N keys each, not necessarily adjacent) gathered into one
    key tile per inner-loop step, so the tensor cores see BLOCK_N * step_blocks keys at a time.
    heavy_rows_first: programs take the rows in decreasing work band (module docstring), not in
    row order. On by default: on predicted masks at 80% sparsity it made `sparse_attention` 1.27x
    faster at FLUX's shape and 1.08x at CogVideoX's, and left Wan's within 1% (0.99x); on masks
    with equal rows it cost 0-2% (H200, 2026-12-02, scripts/tune_row_order.py,
    bench-results/h200-2026-12-02/row-order-per-head.log). The order is built with the LUT either
    way (`build_block_lut`), 4-66 us at the model shapes.
    fixed_max: after a row's first step, keep that step's row maxima as the softmax's reference
    (module docstring); bf16/fp16 without pv_threshold only (the FP8 path's P needs the true maximum),
    and declared for bf16 (fp16 rows whose P overflows are computed twice: TILE_CONFIGS' notes).
    max_registers: registers a thread at most (ptxas' maxnreg), None for the compiler's choice. 128
    with 8 warps lets two programs share an SM's 64K registers, so that one program's softmax runs
    while the other's products keep the tensor cores busy (the kernel's steps are otherwise serial:
    product, exponentials, product).
    tma: the unmasked steps load their key and value tiles through TMA tensor descriptors (one
    instruction a tile, no per-thread addresses) instead of per-thread pointers; one block a step,
    bf16/fp16 only, and only where the layouts suit TMA (16-byte aligned base and strides).
    hopper: run the Gluon kernel (`block_sparse_attn_hopper`: FlashAttention-3's warp-specialised
    schedule) where it takes the call (`hopper_unsupported`; never with FP8 or pv_threshold); the
    other fields then apply to the calls it does not take.
    """

    step_blocks: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False
    heavy_rows_first: bool = True
    fixed_max: bool = True
    max_registers: int | None = None
    tma: bool = False
    hopper: bool = False


# Keyed by (GPU architecture, padded head dim, dtype); measured with `sparsediff bench kernel --tune`.
# With the running maximum (H100 80GB HBM3, torch 2.11, Triton 3.6, 2026-11-23,
# bench-results/kernel-cuda-bf16-h100-run1.*) one 64-key block per step with 8 warps led at D=128
# (511 vs 450 TFLOP/s for two blocks, Wan shape, all kept) and two blocks with 4 warps at D=64. With
# the fixed reference maximum (H200, 2026-12-03, bench-results/h200-2026-12-03/kernel-tune-fixed-max-
# session13.log; TFLOP/s at keep 1 / 0.25, same run): Wan (D=128) two blocks per step, 8 warps, 3
# stages 524 / 500, against 481 / 465 for the running maximum's best (one block, 8 warps) and 442 /
# 436 for that config with the fixed maximum; CogVideoX (D=64) one block, 8 warps, 3 stages 499 /
# 473, against 421 / 403 for the running maximum's best (two blocks, 4 warps). cuDNN dense: 563 and
# 415. fp16 uses the same tiles and MMA rate as bf16 on Hopper; its entries repeat the bf16 tiles, with the
# running maximum (below).
# Two programs an SM at D=128 (H200, 2026-12-04, bench-results/h200-2026-12-04/attention-two-programs-
# an-sm-session18.log, kernel alone on random masks, keep 1 / 0.2, of cuDNN dense): two key blocks a
# step with 3 stages, one program an SM (246 / 224 registers, 224 KiB of shared memory), Wan 0.909 /
# 0.848, HunyuanVideo 0.897 / 0.855; one block a step with 2 stages (96 KiB) and 128 registers (8
# spilled), two programs an SM, 0.968 / 0.950 and 0.941 / 0.933. Uncapped, that tile takes 159
# registers and one SM each: 0.569 / 0.690 and 0.594 / 0.734; one stage with 128 registers 0.78 / 0.76.
# `bench kernel`, four shapes (kernel-bf16-four-shapes-session18.*), kernel time at keep 1 / 0.25 /
# 0.1: Wan 11.86 / 2.98 / 1.25 ms, HunyuanVideo 327.1 / 80.0 / 33.5, FLUX 0.549 / 0.154 / 0.083; the
# two-block tile at FLUX in the next call 0.587 / 0.184 / 0.112 (kernel-bf16-flux-two-blocks-session18.*).
# At D=64 the declared tile already runs two programs an SM uncapped (125-127 registers); capping two
# blocks a step at 128 registers (3 stages) gave 1.202 / 1.131 of cuDNN at keep 1 / 0.25 on
# CogVideoX's shape against 1.187 / 1.128, within the runs' noise, so it stays (tune-capped-d64-fp8-session19.log).
# TMA key and value tiles (H200, 2026-12-04, bench-results/h200-2026-12-04/tma-tiles-session20-run{1,2}.json,
# kernel alone CUDA-graphed on random masks, of cuDNN's graphed call, pointer -> TMA, two runs): Wan keep
# 1 / 0.25 / 0.1 0.964 -> 0.964, 0.980 -> 1.012, 0.937 -> 0.953 and 0.981 -> 0.980, 0.982 -> 1.003,
# 0.932 -> 0.949; HunyuanVideo keep 0.25 / 0.1 0.956 -> 0.974, 0.899 -> 0.915 and 0.954 -> 0.993, 0.906
# -> 0.922; FLUX 0.781 -> 0.757, 0.700 -> 0.707, 0.514 -> 0.522 and 0.795 -> 0.776, 0.712 -> 0.718, 0.525
# -> 0.532 (keep 1 loses 2-3% there). Spilled registers 8 -> 6 (Wan's build). At D=64 TMA lost 1-2%
# (CogVideoX 1.218 / 1.151 / 1.044 -> 1.194 / 1.132 / 1.035), so that tile keeps pointer loads.
# fp16 keeps the running maximum: its P overflows at 65504, e^11 above the fixed reference, and such a
# row is computed twice (the kernel's overflow check). On video-like inputs (`video_workload`, Wan's
# grid, fp16, H200, 2026-12-04, bench-results/h200-2026-12-04/fp16-fixed-max-session20.json) nearly
# every row overflowed: the fixed maximum took 24.3 ms against the running maximum's 13.0 at keep 1,
# 1.99 against 1.11 ms at a predicted keep of 0.076. On random inputs (no overflow) the fixed maximum
# is faster: 0.979 / 1.005 / 0.950 of cuDNN at keep 1 / 0.25 / 0.1 against 0.904 / 0.843 / 0.849.
# The Gluon kernel (`hopper`) at D=128 (H100, 2026-12-07, bench-results/h100-2026-12-07-session53/,
# kernel alone CUDA-graphed on random masks with its LUT built, of cuDNN's graphed call, keep 1 / 0.25 /
# 0.1, Triton kernel -> Gluon): in `bench kernel` (kernel-bf16-four-shapes-gluon.json) FLUX 0.803 ->
# 0.994, 0.699 -> 0.802, 0.488 -> 0.496; Wan 0.975 -> 1.067, 0.990 -> 1.047, 0.917 -> 0.958; HunyuanVideo
# 0.976 -> 1.086, 0.948 -> 1.127, 0.892 -> 0.999. Its probe (gluon-probe.json; N rounded up to 128) at D=64
# lost, CogVideoX 1.077 -> 0.978 at keep 1, so that tile stays Triton's.
TILE_CONFIGS: dict[tuple[str, int, torch.dtype], TileConfig] = {
    ("sm90", 128, torch.bfloat16): TileConfig(step_blocks=1, num_warps=8, num_stages=2, max_registers=128, tma=True,
                                              hopper=True),
    ("sm90", 128, torch.float16): TileConfig(step_blocks=1, num_warps=8, num_stages=2, max_registers=128, tma=True,
                                             fixed_max=False, hopper=True),
    ("sm90", 64, torch.bfloat16): TileConfig(step_blocks=1, num_warps=8, num_stages=3),
    ("sm90", 64, torch.float16): TileConfig(step_blocks=1, num_warps=8, num_stages=3, fixed_max=False),
}
# The FP8 path (operands in e4m3), measured with `bench kernel --fp8 --tune` (H200, torch 2.11,
# Triton 3.6, 2026-12-01; bench-results/h200-2026-12-01/kernel-fp8.log): at D=128 one block per step
# with 8 warps (584 TFLOP/s at keep 1 on the Wan shape; 4 stages 588, within noise); at D=64 two
# blocks per step with 4 warps (506 vs 469 for one block, CogVideoX shape). Capping the FP8 tiles'
# registers at 128 (two programs an SM; 224 uncapped at D=128) spills and loses: Wan 0.63-0.80 of
# cuDNN at keep 1 against 1.05, FLUX 0.49-0.50 against 0.87, CogVideoX 1.02-1.11 against 1.18 (H200,
# 2026-12-04, bench-results/h200-2026-12-04/tune-capped-d64-fp8-session19.log).
TILE_CONFIGS.update({
    ("sm90", 128, torch.float8_e4m3fn): TileConfig(step_blocks=1, num_warps=8, num_stages=3, fixed_max=False),
    ("sm90", 64, torch.float8_e4m3fn): TileConfig(step_blocks=2, num_warps=4, num_stages=3, fixed_max=False),
})
# Calls of fewer query-key pairs (B * H * Nq * Nk) take the declared tile without TMA: Triton encodes
# the descriptors on the host at every launch that a CUDA graph does not replay. At FLUX's shape (5.1e8
# pairs, predicted keep 0.086; H200, 2026-12-04, bench-results/h200-2026-12-04/host-overhead-session21-
# run{1,2}.json) a launch loop took 107.5 against 91.0 us a launch with and without TMA on one lease's
# host, 75.9 against 48.5 on another's, for a kernel of 77.9 against 79.1 us graphed; graphed on random
# masks TMA lost 2-3% there at keep 1 and gained 0.5-1.3% at 0.25 and 0.1 (above). At Wan's shape
# (1.3e10 pairs, kernel >= 1.2 ms) TMA gains 1.5-3%. Nothing was measured between the two; the cut lies
# between them.
TMA_MIN_PAIRS = 4 * 10**9
# Unmeasured GPUs, other head dims, and the CPU interpreter: small enough for any GPU's shared memory.
DEFAULT_TILE_CONFIG = TileConfig(step_blocks=1, num_warps=4, num_stages=2)

_FLOAT_DTYPES_CUDA = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES_CPU = (torch.float16, torch.bfloat16, torch.float32)


def fp8_unsupported(device: torch.device) -> str | None:
    """Why the FP8 path cannot run on `device` (a GPU below FP8_MIN_CAPABILITY), else None."""
    if device.type != "cuda":
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability >= FP8_MIN_CAPABILITY:
        return None
    need = ".".join(map(str, FP8_MIN_CAPABILITY))
    return (f"the FP8 path needs a GPU of compute capability {need} or newer (e4m3 tensor cores); "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")


def gpu_arch(device: torch.device) -> str:
    """'sm90'-style tag of a CUDA device, 'cpu' otherwise."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def uses_fixed_max(config: TileConfig, fp8: bool, pv_threshold: float | None) -> bool:
    """Whether the kernel keeps a fixed reference maximum: the config asks for it, and neither the
    FP8 path (its P must stay within e4m3's range) nor pv_threshold (its skip test compares with the
    running maximum) is on."""
    return config.fixed_max and not fp8 and pv_threshold is None


def uses_tma(config: TileConfig, fp8: bool) -> bool:
    """Whether the kernel's unmasked steps may read their tiles through TMA: the config asks for it,
    one key block a step (a descriptor tile is contiguous keys), and not the FP8 path (its V is read
    transposed). The launcher also needs layouts that suit TMA (`tma_compatible`)."""
    return config.tma and not fp8 and config.step_blocks == 1


def uses_hopper_kernel(config: TileConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       fp8: bool, pv_threshold: float | None) -> bool:
    """Whether the Gluon kernel runs this call: the config asks for it, Gluon is there, the call is
    neither FP8 nor skips P·V (it implements neither), and its GPU, head dim, dtype and layouts suit it."""
    return (config.hopper and block_sparse_attn_hopper is not None and not fp8 and pv_threshold is None
            and block_sparse_attn_hopper.hopper_unsupported(q, k, v, out) is None)


def tile_config(head_dim: int, dtype: torch.dtype, device: torch.device, pairs: int) -> TileConfig:
    """The declared tile configuration for this head dim, dtype and device, for a call of `pairs`
    query-key pairs (B * H * Nq * Nk): below TMA_MIN_PAIRS without TMA."""
    config = TILE_CONFIGS.get((gpu_arch(device), padded_head_dim(head_dim), dtype), DEFAULT_TILE_CONFIG)
    return replace(config, tma=False) if config.tma and pairs < TMA_MIN_PAIRS else config


# ----------------------------------------------------------------------------------------------
# Mask -> LUT
# ----------------------------------------------------------------------------------------------


class BlockLut(NamedTuple):
    """What the attention kernel reads of a block mask (`build_block_lut`).

    counts: int32 (B, H, QB), kept key blocks per row (b, h, query block).
    indices: int16 or int32 (B, H, QB, KB), a row's kept key-block indices, ascending, in its first
    counts entries (the entries after them are unspecified).
    order: int32 (B*H*QB,), the flat rows heavy first (`heavy_rows_first`, WORK_LEVELS bands).
    """

    counts: torch.Tensor
    indices: torch.Tensor
    order: torch.Tensor


class LutTargets(NamedTuple):
    """A lookup table to be filled from a block mask (`lut_targets`): its tables, and the blocks that
    every mask keeps or drops whatever its selection (`build_block_lut`'s arguments)."""

    counts: torch.Tensor  # int32 (B, H, QB)
    indices: torch.Tensor  # (B, H, QB, KB), `_lut_index_dtype`
    kv_lens: torch.Tensor | None
    dense_rows: torch.Tensor | None
    dense_cols: torch.Tensor | None
    n_keys: int
    tail_qb: int  # query blocks from tail_qb on keep every key block (the dense tail)
    tail_kb: int  # key blocks from tail_kb on are kept by every query block


def lut_targets(
    shape: tuple[int, int, int, int],
    n_keys: int,
    device: torch.device,
    kv_lens: torch.Tensor | None = None,
    *,
    dense_rows: torch.Tensor | None = None,
    dense_cols: torch.Tensor | None = None,
    dense_tail_tokens: int = 0,
) -> LutTargets:
    """Checked arguments and empty tables of the lookup table of a (B, H, QB, KB) block mask on
    `device` (arguments as `build_block_lut`)."""
    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    B, H, QB, KB = shape
    for name, t, want in (("dense_rows", dense_rows, (B, H, QB)), ("dense_cols", dense_cols, (B, H, KB))):
        if t is not None and (t.dtype != torch.bool or tuple(t.shape) != want or t.device != device):
            raise ValueError(f"{name} must be a bool tensor of shape {want} on {device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    tail_qb = QB if dense_tail_tokens == 0 else (n_keys - dense_tail_tokens) // BLOCK_M
    tail_kb = KB if dense_tail_tokens == 0 else (n_keys - dense_tail_tokens) // BLOCK_N
    counts = torch.empty((B, H, QB), dtype=torch.int32, device=device)
    indices = torch.empty((B, H, QB, KB), dtype=_lut_index_dtype(KB), device=device)
    return LutTargets(counts, indices, kv_lens, dense_rows, dense_cols, n_keys, tail_qb, tail_kb)


@triton.jit
def complete_lut_rows(
    keep, rows, row_ok, qb, bh, b, cols, KB, n_keys, tail_qb, tail_kb,
    kv_lens_ptr, dense_rows_ptr, dense_cols_ptr, out_mask_ptr, counts_ptr, indices_ptr,
    BLOCK_N: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_DENSE_ROWS: tl.constexpr,
    HAS_DENSE_COLS: tl.constexpr, WRITE_MASK: tl.constexpr,
):
    """Rows of a selection (keep: bool (R, C), cols: arange(C), C >= KB; rows: their flat (b, h, query
    block) indices) completed with the blocks every mask keeps or drops, then stored: the kept mask
    (WRITE_MASK) and the rows' lookup-table entries. The LUT kernel and the selection kernel
    (`block_select`'s, which builds its table in its own launch) both end with it."""
    col_ok = row_ok[:, None] & (cols[None, :] < KB)
    # Blocks every mask keeps whatever its selection: whole rows, whole columns, the dense tail.
    keep = keep | (qb >= tail_qb)[:, None] | (cols >= tail_kb)[None, :]
    if HAS_DENSE_ROWS:
        keep = keep | (tl.load(dense_rows_ptr + rows, mask=row_ok, other=0) != 0)[:, None]
    if HAS_DENSE_COLS:
        keep = keep | (tl.load(dense_cols_ptr + bh.to(tl.int64)[:, None] * KB + cols[None, :], mask=col_ok, other=0) != 0)
    if HAS_KV_LENS:
        n_valid = tl.minimum(tl.load(kv_lens_ptr + b, mask=row_ok, other=0), n_keys)
        keep = keep & (cols[None, :] * BLOCK_N < n_valid[:, None])
    else:
        keep = keep & (cols[None, :] * BLOCK_N < n_keys)
    keep = keep & col_ok
    if WRITE_MASK:
        tl.store(out_mask_ptr + rows.to(tl.int64)[:, None] * KB + cols[None, :], keep.to(tl.int8), mask=col_ok)
    keep_i = keep.to(tl.int32)
    # Position of each kept block among the kept blocks of its row: an inclusive prefix sum.
    slot = tl.cumsum(keep_i, axis=1) - 1
    out_ptrs = indices_ptr + rows.to(tl.int64)[:, None] * KB + slot
    tl.store(out_ptrs, cols[None, :].to(indices_ptr.dtype.element_ty), mask=keep)
    tl.store(counts_ptr + rows, tl.sum(keep_i, axis=1), mask=row_ok)


@triton.jit
def _build_lut_kernel(
    mask_ptr, stride_mb, stride_mh, stride_mq, stride_mk, out_mask_ptr,
    kv_lens_ptr, dense_rows_ptr, dense_cols_ptr, counts_ptr, indices_ptr,
    n_rows, H, QB, KB, n_keys, tail_qb, tail_kb,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, KB_P2: tl.constexpr, HAS_KV_LENS: tl.constexpr,
    HAS_DENSE_ROWS: tl.constexpr, HAS_DENSE_COLS: tl.constexpr, WRITE_MASK: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    qb = rows % QB
    bh = rows // QB
    h = bh % H
    b = bh // H
    cols = tl.arange(0, KB_P2)
    row_off = b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh + qb.to(tl.int64) * stride_mq
    ptrs = mask_ptr + row_off[:, None] + cols[None, :].to(tl.int64) * stride_mk
    keep = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < KB), other=0) != 0
    complete_lut_rows(
        keep, rows, row_ok, qb, bh, b, cols, KB, n_keys, tail_qb, tail_kb,
        kv_lens_ptr, dense_rows_ptr, dense_cols_ptr, out_mask_ptr, counts_ptr, indices_ptr,
        BLOCK_N, HAS_KV_LENS, HAS_DENSE_ROWS, HAS_DENSE_COLS, WRITE_MASK,
    )


# The LUT kernel's geometry: one row (b, h, query block) a program and one warp per
# LUT_ELEMENTS_PER_WARP key blocks of the padded row (1 to 8 warps). The GPU time of the kernel
# alone, CUDA-graphed, on predicted masks (H200, 2026-12-04, bench-results/h200-2026-12-04/
# tune-lut-session17.log): FLUX 5.8 us (128-wide rows), CogVideoX 14.6 (512), Wan 9.6 (512),
# HunyuanVideo 156 (2048), against 12.2 / 24.5 / 12.3 / 187 us for the earlier 4,096 mask entries
# and 4 warps a program; more rows a program were no faster (best at Wan: 2 rows, 2 warps, 9.5 us).
# The interpreter runs programs one after another at a fixed cost each: there a program keeps 4,096
# entries.
LUT_ELEMENTS_PER_WARP = 256
LUT_MAX_WARPS = 8
INTERPRETED_LUT_ELEMENTS = 4096


def _lut_geometry(kb_p2: int) -> tuple[int, int]:
    """(rows a program, warps) of the LUT kernel for rows of kb_p2 (a power of 2) key blocks."""
    if triton_interpreting():
        return max(1, min(64, INTERPRETED_LUT_ELEMENTS // kb_p2)), 4
    return 1, max(1, min(LUT_MAX_WARPS, kb_p2 // LUT_ELEMENTS_PER_WARP))


def _lut_index_dtype(n_key_blocks: int) -> torch.dtype:
    # int16 halves the LUT's footprint (hunyuan-720p: 83 MB instead of 166 MB at keep 1).
    return torch.int16 if n_key_blocks <= torch.iinfo(torch.int16).max else torch.int32


def lut_launch_arguments(targets: LutTargets, placeholder: torch.Tensor) -> tuple[tuple, tuple, dict]:
    """What a kernel ending in `complete_lut_rows` takes of `targets`: its tensors (kv_lens, dense
    rows, dense columns, counts, indices; an absent one as `placeholder`, never read), its sizes
    (n_keys, tail_qb, tail_kb) and the constexpr flags of the tensors given."""
    given = (targets.kv_lens, targets.dense_rows, targets.dense_cols)
    tensors = (*(t.contiguous() if t is not None else placeholder for t in given), targets.counts, targets.indices)
    flags = dict(HAS_KV_LENS=targets.kv_lens is not None, HAS_DENSE_ROWS=targets.dense_rows is not None,
                 HAS_DENSE_COLS=targets.dense_cols is not None)
    return tensors, (targets.n_keys, targets.tail_qb, targets.tail_kb), flags


def fill_block_lut(block_mask: torch.Tensor, targets: LutTargets, out_mask: torch.Tensor | None = None) -> None:
    """`targets`' tables filled from a bool (B, H, QB, KB) mask of any strides (arguments checked by
    `build_block_lut`): Triton's kernel where kernels are available, else the torch reference."""
    B, H, QB, KB = block_mask.shape
    device = block_mask.device
    if not kernels_available(device):
        keep = block_mask.clone()
        keep[:, :, targets.tail_qb:] = True
        keep[:, :, :, targets.tail_kb:] = True
        if targets.dense_rows is not None:
            keep |= targets.dense_rows[..., None]
        if targets.dense_cols is not None:
            keep |= targets.dense_cols[..., None, :]
        keep &= valid_key_blocks(B, KB, BLOCK_N, targets.n_keys, targets.kv_lens, device)[:, None, None, :]
        if out_mask is not None:
            out_mask.copy_(keep)
        counts, indices = block_lut_reference(keep, targets.n_keys, BLOCK_N, targets.kv_lens)
        targets.counts.copy_(counts)
        targets.indices.copy_(indices)
        return
    kb_p2 = triton.next_power_of_2(KB)
    rows, warps = _lut_geometry(kb_p2)
    mask_bytes = block_mask.view(torch.uint8)  # same strides; Triton loads int1 pointers poorly
    placeholder = targets.counts  # the kernel reads entry b of kv_lens at offset b
    lut_tensors, lut_sizes, lut_flags = lut_launch_arguments(targets, placeholder)
    _build_lut_kernel[(triton.cdiv(B * H * QB, rows),)](
        mask_bytes, *mask_bytes.stride(), out_mask if out_mask is not None else placeholder, *lut_tensors,
        B * H * QB, H, QB, KB, *lut_sizes,
        BLOCK_N=BLOCK_N, ROWS=rows, KB_P2=kb_p2, WRITE_MASK=out_mask is not None, num_warps=warps,
        **lut_flags, **dependent_launch(device),
    )


def ordered_lut(targets: LutTargets) -> BlockLut:
    """The filled tables of `targets` with the order in which the attention kernel's programs take
    their rows (a second launch, one program per head)."""
    return BlockLut(targets.counts, targets.indices, heavy_rows_first(targets.counts, targets.indices.shape[-1],
                                                                      WORK_LEVELS))


def build_block_lut(
    block_mask: torch.Tensor,
    n_keys: int,
    kv_lens: torch.Tensor | None = None,
    *,
    dense_rows: torch.Tensor | None = None,
    dense_cols: torch.Tensor | None = None,
    dense_tail_tokens: int = 0,
    out_mask: torch.Tensor | None = None,
) -> BlockLut:
    """Compact per-row list of kept key blocks, built on the mask's device by Triton kernels (the
    torch reference where kernels are unavailable).

    block_mask: bool (B, H, QB, KB), any strides. Besides its True blocks, every block of a
    `dense_rows` query block (bool (B, H, QB)), of a `dense_cols` key block (bool (B, H, KB)) and
    of the last `dense_tail_tokens` queries or keys (a text segment at the end) is kept. Key blocks
    starting at or past `n_keys` (or kv_lens[b]) are dropped. out_mask: a contiguous bool
    (B, H, QB, KB) tensor (block_mask itself may be given) that receives the blocks kept.

    Returns a `BlockLut`: the kept blocks of each row, and the rows' order for the attention
    kernel's programs (a second launch, one program per head).
    """
    if block_mask.ndim != 4 or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a 4-D bool tensor, got {block_mask.dtype} {tuple(block_mask.shape)}")
    if out_mask is not None and (out_mask.dtype != torch.bool or out_mask.shape != block_mask.shape
                                 or out_mask.device != block_mask.device):
        raise ValueError(f"out_mask must be a bool tensor of shape {tuple(block_mask.shape)} on {block_mask.device}, "
                         f"got {out_mask.dtype} {tuple(out_mask.shape)} on {out_mask.device}")
    if out_mask is not None and not out_mask.is_contiguous():
        raise ValueError("out_mask must be contiguous")
    targets = lut_targets(tuple(block_mask.shape), n_keys, block_mask.device, kv_lens, dense_rows=dense_rows,
                          dense_cols=dense_cols, dense_tail_tokens=dense_tail_tokens)
    fill_block_lut(block_mask, targets, out_mask)
    return ordered_lut(targets)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------


@triton.jit
def _softmax_pv(
    acc, l_i, m_i, s, m_step, V_bh, V_desc, b, h, key0, keys, key_ok, offs_d, d_ok, stride_vn, stride_vd, qk_scale,
    MASK_KEYS: tl.constexpr, PAD_D: tl.constexpr, DOT_FP32: tl.constexpr, FP8: tl.constexpr,
    ROUND_E4M3: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr,
):
    if FIXED_MAX:  # the reference maximum stays: no rescaling of l_i and acc
        m_new = m_i
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        m_new = tl.maximum(m_i, m_step)
        if FP8:  # P scaled by 448 through its exponent: it fills e4m3's range; l_i carries the 448 too
            p = tl.math.exp2(s * qk_scale - (m_new - _LOG2_E4M3_MAX)[:, None])
        else:
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = V_bh + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if TMA and not MASK_KEYS:  # one block: its keys are contiguous; columns past D read as 0
        v = V_desc.load([b, h, key0, 0]).reshape(keys.shape[0], offs_d.shape[0])
    elif MASK_KEYS:
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif PAD_D:
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if not FIXED_MAX:
        acc = acc * alpha[:, None]
    if FP8:
        # Hopper's fp8 MMA accumulates with fewer bits than fp32: each step's P·V gets a fresh
        # accumulator (BLOCK_N * STEP_BLOCKS products) and is added to acc in fp32, as SageAttention2.
        acc = acc + tl.dot(to_e4m3(p, ROUND_E4M3), v)
    elif DOT_FP32:
        acc = tl.dot(p, v.to(tl.float32), acc)
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_step(
    acc, l_i, m_i, n_skipped, q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, step, n_valid,
    offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
    BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr, MASK_KEYS: tl.constexpr,
    PAD_D: tl.constexpr, PV_SKIP: tl.constexpr, DOT_FP32: tl.constexpr, FP8: tl.constexpr,
    ROUND_E4M3: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr,
):
    """One step over STEP_BLOCKS kept key blocks; MASK_KEYS where the step may hold masked keys."""
    offs_n = tl.arange(0, BLOCK_N * STEP_BLOCKS)
    if STEP_BLOCKS == 1:
        block = tl.load(lut_row + step).to(tl.int32)
        keys = block * BLOCK_N + offs_n
        key_ok = keys < n_valid
        step_blocks = 1
    else:
        entry = step * STEP_BLOCKS + offs_n // BLOCK_N
        if MASK_KEYS:
            entry_ok = entry < count
            block = tl.load(lut_row + entry, mask=entry_ok, other=0).to(tl.int32)
            key_ok = entry_ok & (block * BLOCK_N + offs_n % BLOCK_N < n_valid)
            step_blocks = tl.minimum(count - step * STEP_BLOCKS, STEP_BLOCKS)
        else:
            block = tl.load(lut_row + entry).to(tl.int32)
            key_ok = entry >= 0
            step_blocks = STEP_BLOCKS
        keys = block * BLOCK_N + offs_n % BLOCK_N
    k_ptrs = K_bh + keys[:, None] * stride_kn + offs_d[None, :] * stride_kd
    if TMA and not MASK_KEYS:  # STEP_BLOCKS == 1 (the launcher's condition)
        k = K_desc.load([b, h, block * BLOCK_N, 0]).reshape(BLOCK_N, offs_d.shape[0])
    elif MASK_KEYS:
        k = tl.load(k_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
    elif PAD_D:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
    if DOT_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k))
    step_scale = qk_scale
    if FP8:  # dequantise by the key blocks' scales: a scalar for one block, per key column otherwise
        if STEP_BLOCKS == 1:
            step_scale = qk_scale * tl.load(k_scale_bh + block)
        else:
            s = s * tl.load(k_scale_bh + block)[None, :]
    if MASK_KEYS:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if FIXED_MAX:
        m_step = m_i  # not needed: the reference maximum stays
    else:
        m_step = tl.max(s, 1) * step_scale
    if PV_SKIP:
        if tl.max(m_step - m_i, 0) < log2_pv_threshold:
            n_skipped += step_blocks
        else:
            acc, l_i, m_i = _softmax_pv(
                acc, l_i, m_i, s, m_step, V_bh, V_desc, b, h, block * BLOCK_N, keys, key_ok, offs_d, d_ok,
                stride_vn, stride_vd, step_scale, MASK_KEYS, PAD_D, DOT_FP32, FP8, ROUND_E4M3, False, TMA,
            )
    else:
        acc, l_i, m_i = _softmax_pv(
            acc, l_i, m_i, s, m_step, V_bh, V_desc, b, h, block * BLOCK_N, keys, key_ok, offs_d, d_ok,
            stride_vn, stride_vd, step_scale, MASK_KEYS, PAD_D, DOT_FP32, FP8, ROUND_E4M3, FIXED_MAX, TMA,
        )
    return acc, l_i, m_i, n_skipped


@triton.jit
def _attend_row(
    q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, n_steps, n_valid, offs_d, d_ok,
    stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, STEP_BLOCKS: tl.constexpr,
    PAD_D: tl.constexpr, PV_SKIP: tl.constexpr, DOT_FP32: tl.constexpr, FP8: tl.constexpr,
    ROUND_E4M3: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, FIXED_MAX: tl.constexpr, TMA: tl.constexpr,
):
    """A row's softmax over its kept key blocks: (acc, l_i, P·V skips). FIXED_MAX (bf16/fp16, no
    P·V skip): the first step's maxima stay the reference (module docstring); l_i >= 1 for every
    row that sees a key (its first step's maximum contributes exp2(0)), and the caller checks l_i
    for overflow. Otherwise the running maximum."""
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_skipped = 0
    first = 0
    if FIXED_MAX:  # the first step, with masks (it may be the row's only one), sets the reference
        first = 1
        if n_steps > 0:
            acc, l_i, m_i, n_skipped = _attn_step(
                acc, l_i, m_i, n_skipped, q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, 0, n_valid,
                offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
                BLOCK_N, STEP_BLOCKS, True, PAD_D, PV_SKIP, DOT_FP32, FP8, ROUND_E4M3, False, TMA,
            )
    # Only the row's last step can hold a partial key block (ragged Nk or kv_lens: the LUT drops
    # blocks past the valid keys and lists the rest in ascending order) or a partial step, so every
    # other step runs without masks.
    for step in tl.range(first, n_steps - 1, warp_specialize=WARP_SPECIALIZE):
        acc, l_i, m_i, n_skipped = _attn_step(
            acc, l_i, m_i, n_skipped, q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, step,
            n_valid, offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
            BLOCK_N, STEP_BLOCKS, False, PAD_D, PV_SKIP, DOT_FP32, FP8, ROUND_E4M3, FIXED_MAX, TMA,
        )
    if n_steps > first:
        acc, l_i, m_i, n_skipped = _attn_step(
            acc, l_i, m_i, n_skipped, q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, n_steps - 1,
            n_valid, offs_d, d_ok, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
            BLOCK_N, STEP_BLOCKS, True, PAD_D, PV_SKIP, DOT_FP32, FP8, ROUND_E4M3, FIXED_MAX, TMA,
        )
    return acc, l_i, n_skipped


@triton.jit
def _block_sparse_attn_kernel(
    Q, K, V, K_desc, V_desc, O, counts_ptr, lut_ptr, order_ptr, kv_lens_ptr, skips_ptr, q_scale_ptr, k_scale_ptr, v_scale_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, n_q, n_k, QB, KB, qk_scale, log2_pv_threshold,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STEP_BLOCKS: tl.constexpr, HAS_KV_LENS: tl.constexpr, PV_SKIP: tl.constexpr,
    COUNT_SKIPS: tl.constexpr, DOT_FP32: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    FP8: tl.constexpr, ROUND_E4M3: tl.constexpr, HEAVY_FIRST: tl.constexpr, FIXED_MAX: tl.constexpr,
    TMA: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # One program per LUT row (b, h, query block): heavy rows first (order_ptr), or in row order.
    row, qb, bh, b, h, count = program_row(tl.program_id(0), order_ptr, counts_ptr, QB, H, HEAVY_FIRST)
    lut_row = lut_ptr + row.to(tl.int64) * KB
    n_valid = valid_length(kv_lens_ptr, b, n_k, HAS_KV_LENS)
    PAD_D: tl.constexpr = BLOCK_D != HEAD_D

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    row_ok = offs_m < n_q
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh \
        + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    K_bh = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V_bh = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    k_scale_bh = k_scale_ptr + bh.to(tl.int64) * KB
    if FP8:
        qk_scale = qk_scale * tl.load(q_scale_ptr + row)

    n_steps = tl.cdiv(count, STEP_BLOCKS)
    acc, l_i, n_skipped = _attend_row(
        q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, n_steps, n_valid, offs_d, d_ok,
        stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
        BLOCK_M, BLOCK_D, BLOCK_N, STEP_BLOCKS, PAD_D, PV_SKIP, DOT_FP32, FP8, ROUND_E4M3, WARP_SPECIALIZE, FIXED_MAX,
        TMA,
    )
    if FIXED_MAX:
        # A later step whose scores lie far above the first step's maxima (2**64 times its term)
        # could overflow: the row is computed again with the running maximum. In fp16 P itself
        # overflows from 65504 (e^11 above the reference) and turns the accumulator non-finite.
        overflow = tl.max(l_i, 0) >= _FIXED_MAX_LIMIT
        if Q.dtype.element_ty == tl.float16:
            overflow = overflow | (tl.min((tl.abs(acc) < float("inf")).to(tl.int32)) == 0)
        if overflow:
            acc, l_i, n_skipped = _attend_row(
                q, K_bh, V_bh, K_desc, V_desc, b, h, k_scale_bh, lut_row, count, n_steps, n_valid, offs_d, d_ok,
                stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, log2_pv_threshold,
                BLOCK_M, BLOCK_D, BLOCK_N, STEP_BLOCKS, PAD_D, PV_SKIP, DOT_FP32, FP8, ROUND_E4M3, WARP_SPECIALIZE,
                False, TMA,
            )
    # Rows that saw no key keep l_i == 0 and acc == 0: they return zeros.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr + bh * HEAD_D + offs_d, mask=d_ok, other=0.0)[None, :]
    o_ptrs = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh \
        + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if COUNT_SKIPS:
        tl.store(skips_ptr + row, n_skipped)


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset within one (b, h) slice: the kernel does that arithmetic in int32."""
    return (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)


def attention_from_lut(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lut: BlockLut,
    scale: float,
    *,
    kv_lens: torch.Tensor | None = None,
    pv_threshold: float | None = None,
    return_pv_skips: bool = False,
    config: TileConfig | None = None,
    quantized: Fp8Operands | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Launch the attention kernel on a LUT from `build_block_lut` (arguments already validated).

    For callers that reuse one LUT, and for tuning (`config` overrides the declared tile config).
    With return_pv_skips, also returns int32 (B, H, QB): kept key blocks whose P·V was skipped.
    quantized: `quantize_fp8(q, k, v, ...)` of these q, k, v: runs the FP8 kernel on it (q still
    gives the output's dtype and layout).
    """
    B, H, n_q, head_dim = q.shape
    n_k = k.shape[2]
    counts, indices = lut.counts, lut.indices
    QB, KB = counts.shape[2], indices.shape[3]
    fp8 = quantized is not None
    q_in, k_in, v_in = (quantized.q, quantized.k, quantized.v_t.transpose(-1, -2)) if fp8 else (q, k, v)
    if max(_max_offset(t) for t in (q_in, k_in, v_in)) > _INT32_MAX:
        raise ValueError("q: a (b, h) slice spans more than 2**31 elements; not supported")
    if config is None:
        config = tile_config(head_dim, q_in.dtype, q.device, B * H * n_q * n_k)
    out = torch.empty_like(q)  # keeps q's memory layout, e.g. (B, N, H, D) viewed as (B, H, N, D)
    skips = torch.zeros((B, H, QB), dtype=torch.int32, device=q.device) if return_pv_skips else counts
    if uses_hopper_kernel(config, q, k, v, out, fp8, pv_threshold):
        block_sparse_attn_hopper.block_sparse_attention_hopper(
            q, k, v, out, counts, indices, lut.order if config.heavy_rows_first else None, scale, kv_lens)
        return (out, skips) if return_pv_skips else out
    interpreting = q.device.type == "cpu"
    tma = uses_tma(config, fp8) and tma_compatible(k) and tma_compatible(v)
    # The descriptors' tiles are one key block, the head dim padded: columns past D read as 0.
    k_desc, v_desc = ((TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, BLOCK_N, padded_head_dim(head_dim)])
                       for t in (k, v)) if tma else (k_in, v_in))
    scales = (quantized.q_scale, quantized.k_scale, quantized.v_scale) if fp8 else (counts,) * 3
    _block_sparse_attn_kernel[(B * H * QB,)](
        q_in, k_in, v_in, k_desc, v_desc, out, counts, indices, lut.order,
        kv_lens if kv_lens is not None else counts, skips, *scales,
        *q_in.stride(), *k_in.stride(), *v_in.stride(), *out.stride(),
        H, n_q, n_k, QB, KB, scale * math.log2(math.e),
        math.log2(pv_threshold) if pv_threshold is not None else 0.0,
        HEAD_D=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        STEP_BLOCKS=config.step_blocks, HAS_KV_LENS=kv_lens is not None,
        PV_SKIP=pv_threshold is not None, COUNT_SKIPS=return_pv_skips,
        # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact there (fp8 ones are right).
        DOT_FP32=interpreting and q.dtype != torch.float16 and not fp8,
        WARP_SPECIALIZE=config.warp_specialize, FP8=fp8, ROUND_E4M3=interpreting,
        HEAVY_FIRST=config.heavy_rows_first,
        FIXED_MAX=uses_fixed_max(config, fp8, pv_threshold), TMA=tma,
        num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=config.max_registers,
        **dependent_launch(q.device),
    )
    return (out, skips) if return_pv_skips else out


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError naming the first of q (B, H, Nq, D), k and v (B, H, Nk, D) the kernel cannot take."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(t, 'shape', type(t))}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
    B, H, n_q, head_dim = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, H or D")
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if min(B, H, n_q, k.shape[2]) < 1:
        raise ValueError(f"q and k must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q must be on a cuda or cpu device, got {q.device}")
    allowed = _FLOAT_DTYPES_CUDA if q.device.type == "cuda" else _FLOAT_DTYPES_CPU
    if q.dtype not in allowed:
        raise ValueError(f"q dtype {q.dtype} is not supported on {q.device.type}; use one of {allowed}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim {head_dim} is not supported (1..{MAX_HEAD_DIM})")
    # The output is written by Triton, outside autograd: a gradient would silently stop here.
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("q, k or v requires grad, but sparse attention has no backward (inference only): "
                         "run it under torch.no_grad() or torch.inference_mode(), or pass detached tensors")


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    scale: float | None,
    kv_lens: torch.Tensor | None,
    pv_threshold: float | None,
    fp8: bool = False,
) -> float:
    """Raise ValueError naming the first bad argument; return the softmax scale to use."""
    check_qkv(q, k, v)
    B, H, n_q, head_dim = q.shape
    expected = (B, H, triton.cdiv(n_q, BLOCK_M), triton.cdiv(k.shape[2], BLOCK_N))
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be a bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
    if tuple(block_mask.shape) != expected:
        raise ValueError(f"block_mask shape {tuple(block_mask.shape)} must be {expected} (B, H, ceil(Nq/{BLOCK_M}), ceil(Nk/{BLOCK_N}))")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype.is_floating_point or kv_lens.dtype.is_complex \
                or kv_lens.dtype == torch.bool:
            raise ValueError(f"kv_lens must be an integer tensor, got {getattr(kv_lens, 'dtype', type(kv_lens))}")
        if tuple(kv_lens.shape) != (B,):
            raise ValueError(f"kv_lens shape {tuple(kv_lens.shape)} must be ({B},)")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
    if pv_threshold is not None and not (isinstance(pv_threshold, (int, float)) and 0.0 < pv_threshold <= 1.0):
        raise ValueError(f"pv_threshold must be a float in (0, 1] or None, got {pv_threshold!r}")
    if not isinstance(fp8, bool):
        raise ValueError(f"fp8 must be a bool, got {fp8!r}")
    if fp8 and (reason := fp8_unsupported(q.device)):
        raise ValueError(f"fp8=True: {reason}")
    return checked_scale(scale, head_dim)


def checked_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale to use: `scale`, or 1/sqrt(head_dim) for None; ValueError unless a finite
    number > 0 (a bool is not one)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    # numbers.Real: a NumPy scalar (np.float32(0.125)) is a number, as the thresholds take it.
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    return float(scale)


@on_tensor_device
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    scale: float | None = None,
    *,
    kv_lens: torch.Tensor | None = None,
    pv_threshold: float | None = None,
    return_pv_skips: bool = False,
    fp8: bool = False,
    lut: BlockLut | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the kept (BLOCK_M x BLOCK_N) blocks of `block_mask` only.

    q (B, H, Nq, D), k and v (B, H, Nk, D), any strides, D <= 128; fp16/bf16 (fp32 on CPU).
    block_mask: bool (B, H, ceil(Nq/BLOCK_M), ceil(Nk/BLOCK_N)), True = compute. Query rows that
    keep no valid key return zeros. scale defaults to 1/sqrt(D). kv_lens: int (B,), keys at index
    >= kv_lens[b] are excluded. pv_threshold: see the module docstring; None computes exactly.
    return_pv_skips: also return int32 (B, H, ceil(Nq/BLOCK_M)) counts of kept key blocks whose
    P·V was skipped. fp8: quantise q, k, v to e4m3 and run Q·K and P·V in e4m3 (see the module
    docstring; CUDA needs compute capability 8.9+). lut: the `BlockLut` that
    `build_block_lut` made of this block_mask and kv_lens (mask prediction makes them with the
    mask): not built again. The result has q's memory layout and dtype.

    CUDA runs the compiled Triton kernels, CPU runs them under TRITON_INTERPRET=1 and otherwise
    the plain-torch reference (which never skips P·V: its skip counts are zero).
    """
    scale = _validate(q, k, v, block_mask, scale, kv_lens, pv_threshold, fp8)
    if kv_lens is not None:  # clamped first: int64 lengths past int32 would wrap
        kv_lens = kv_lens.long().clamp(0, k.shape[2]).to(torch.int32)
    if q.device.type == "cpu" and not triton_interpreting():
        out = block_sparse_attention_reference(
            q, k, v, block_mask, scale, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=kv_lens, fp8=fp8
        )
        if return_pv_skips:
            return out, torch.zeros(block_mask.shape[:3], dtype=torch.int32)
        return out
    lut = lut if lut is not None else build_block_lut(block_mask, k.shape[2], kv_lens)
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=kv_lens) if fp8 else None
    return attention_from_lut(
        q, k, v, lut, scale,
        kv_lens=kv_lens, pv_threshold=pv_threshold, return_pv_skips=return_pv_skips, quantized=quantized,
    )
