"""Block-sparse flash-attention forward for Hopper (sm90), in Gluon: FlashAttention-3's warp-specialised
schedule (arXiv 2407.08608), which Triton's compiler does not produce from `block_sparse_attn`'s kernel.
`attention_from_lut` runs it where the tile config asks for it (`TileConfig.hopper`: D=128, bf16 and
fp16 on sm90) and `hopper_unsupported` finds nothing against the call; it reads the same lookup table
(`BlockLut`) and computes the same attention, so its plain reference is the Triton kernel's
(`block_sparse_attention_reference`).

Measured (H100 80GB HBM3, Triton 3.6, 2026-12-07, `sparsediff bench kernel`, the kernel alone with its
LUT built, CUDA-graphed, of cuDNN's graphed dense call, random masks at keep 1 / 0.25 / 0.1; the Triton
kernel in the same run after the arrow): FLUX 0.99 / 0.80 / 0.50 <- 0.80 / 0.70 / 0.49, Wan 1.07 / 1.05
/ 0.96 <- 0.98 / 0.99 / 0.92, HunyuanVideo 1.09 / 1.13 / 1.00 <- 0.98 / 0.95 / 0.89; relative L1 against
dense the same as the Triton kernel's (bench-results/h100-2026-12-07-session53/).

- One program per LUT row (b, h, 128-row query block), heavy rows first as the Triton kernel takes
  them; one CTA an SM (its shared memory).
- A one-warp producer loads Q, then streams the row's kept K and V blocks by TMA into a ring of STAGES
  buffers (ready / empty mbarriers). A buffer holds a 128-key tile: two kept 64-key blocks of the LUT,
  adjacent or not (attention does not depend on the order of the keys).
- Two consumer warpgroups of 64 query rows, each its own partition (they meet only at the buffers),
  run FlashAttention-3's loop: issue the next tile's Q·K and this tile's P·V, wait for Q·K, softmax in
  base 2, wait for P·V, rescale. Registers move from the producer (24) to the consumers (240).
- A row's kept blocks are taken from the LUT's end. The first tile holds the last kept block, the only
  one that may be partial (ragged Nk, kv_lens: the LUT lists the blocks in ascending order and drops
  those past the valid keys), and the block before it if the count is even, else the last one again.
  That tile masks its key columns past the valid keys and its repeated half; every later tile holds
  two whole blocks and runs unmasked. A row that keeps no block returns zeros.
- The tensors are read through 2-D TMA descriptors of rows of `stride(2)` elements: (B, H, N, D)
  contiguous, or (B, N, H, D) viewed as (B, H, N, D) (heads side by side in a row), or strides like
  them (`_row_geometry`). Rows past a slice's N are the next slice's: read, masked, never written.

What the SASS shows (ptxas 12.8, the fifty-second session): ptxas moves a tile's exponentials below
the wait for P·V, so within a warpgroup only the row maxima overlap P·V; the two warpgroups' partitions
overlap each other's. Taking turns at the tensor cores (FlashAttention-3's ping-pong) measured no better
than this free-running pair, nor did a third buffer (the fifty-second session's probe, git d0804d9; H100,
2026-12-07, bench-results/h100-2026-12-07-session53/gluon-probe.json).
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparsediff.kernels import program_row, tma_compatible, valid_length

HEAD_DIM = 128  # the one head dim it takes: at D=64 it was slower than the Triton kernel (module notes)
KEY_BLOCK = 64  # keys of a LUT block (BLOCK_N); a tile is two
HALF = 64  # query rows a consumer warpgroup: a program takes 128 (the LUT's BLOCK_M)
# Buffers of the K / V ring: 2 measured within 1% of 3 or up to 4% faster (164 against 230 KB of shared memory).
STAGES = 2
PRODUCER_REGISTERS = gl.constexpr(24)
CONSUMER_REGISTERS = gl.constexpr(240)
# Registers a thread at launch: (8 consumer + 4 producer-group warps) x 32 x 168 <= 65,536, so that the
# consumers can raise theirs to CONSUMER_REGISTERS when the producer drops to PRODUCER_REGISTERS.
LAUNCH_REGISTERS = 168
LOG2E = 1.4426950408889634
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@gluon.jit
def _tile_entries(count, tile):
    """LUT entries (hi, lo) of a row's tile: the first tile takes the last entry and, for an even
    count, the one before it (an odd count repeats the last); later tiles take pairs downwards."""
    odd = count % 2
    later = gl.minimum(tile, 1)  # 0 for the first tile, 1 after
    hi = count - 1 - 2 * tile + odd * later
    lo = hi - 1 + odd * (1 - later)
    return hi, lo


@gluon.jit
def _kept_block(lut_ptr, lut_row, entry):
    # A row that keeps nothing (count 0) asks for entry -1: block 0, whose keys its mask drops.
    return gl.load(lut_ptr + lut_row + gl.maximum(entry, 0)).to(gl.int32)


@gluon.jit
def _slice_origin(b, h, stride_b, stride_h, row_len):
    """(row, column) of the (b, h) slice's first element in a tensor's 2-D row view."""
    offset = b.to(gl.int64) * stride_b + h.to(gl.int64) * stride_h
    return (offset // row_len).to(gl.int32), (offset % row_len).to(gl.int32)


@gluon.jit
def _load_pair(desc, row_a, row_b, col, ready, buffer):
    """Two descriptor tiles (rows row_a and row_b on) into the two halves of `buffer`, both counted
    by the one barrier `ready`."""
    ROWS: gl.constexpr = desc.block_type.shape[0]
    mbarrier.expect(ready, 2 * desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [row_a, col], ready, buffer.slice(0, ROWS))
    tma.async_copy_global_to_shared(desc, [row_b, col], ready, buffer.slice(ROWS, ROWS))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              lut_row, count, n_tiles, q_row, q_col, kv_row, kv_col, STAGES: gl.constexpr):
    KEY_BLOCK: gl.constexpr = k_desc.block_type.shape[0]
    _load_pair(q_desc, q_row, q_row + q_desc.block_type.shape[0], q_col, q_bar, q_smem)
    for t in range(n_tiles):
        stage = t % STAGES
        phase = (t // STAGES) & 1
        hi, lo = _tile_entries(count, t)
        row_hi = kv_row + _kept_block(lut_ptr, lut_row, hi) * KEY_BLOCK
        row_lo = kv_row + _kept_block(lut_ptr, lut_row, lo) * KEY_BLOCK
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        _load_pair(k_desc, row_hi, row_lo, kv_col, k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        _load_pair(v_desc, row_hi, row_lo, kv_col, v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """Tile scores s -> (P, the rescale of what came before, the new row maxima and sums), base 2."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count, n_tiles,
              n_valid, o_desc, o_ptr, o_row, o_col, o_row_len, rows_left, qk_scale,
              STAGES: gl.constexpr, ORDER: gl.constexpr):
    # ORDER: which half of the query block (64 rows) this warpgroup owns.
    HALF: gl.constexpr = q_smem.type.shape[0] // 2
    D: gl.constexpr = q_smem.type.shape[1]
    TILE: gl.constexpr = k_smem.type.shape[1]
    KEY_BLOCK: gl.constexpr = TILE // 2
    q_tile = q_smem.slice(ORDER * HALF, HALF)
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TILE, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    s_zero = gl.zeros([HALF, TILE], gl.float32, s_layout)
    acc = gl.zeros([HALF, D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)

    # The first tile, outside the loop and masked: its key columns past the valid keys, and its repeated
    # half (odd counts) or both halves (a row that keeps nothing).
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    hi, lo = _tile_entries(count, 0)
    cols = gl.arange(0, TILE, layout=gl.SliceLayout(0, s_layout))
    in_hi = cols < KEY_BLOCK
    keys = gl.where(in_hi, _kept_block(lut_ptr, lut_row, hi) * KEY_BLOCK + cols,
                    _kept_block(lut_ptr, lut_row, lo) * KEY_BLOCK + cols - KEY_BLOCK)
    key_ok = (keys < n_valid) & (count > 0) & (in_hi | (lo < hi))
    s = gl.where(key_ok[None, :], s, float("-inf"))
    m_i = gl.max(s, axis=1) * qk_scale
    m_i = gl.where(m_i > float("-inf"), m_i, 0.0)  # rows without a key: exp2(-inf) = 0, not NaN
    p = gl.exp2(s * qk_scale - m_i[:, None])
    l_i = gl.sum(p, axis=1)

    for t in range(n_tiles - 1):
        stage = t % STAGES
        nxt = (t + 1) % STAGES
        # The next tile's Q·K, then this tile's P·V; the softmax runs while P·V is in flight (only its
        # row maxima do: the module notes).
        mbarrier.wait(k_ready.index(nxt), ((t + 1) // STAGES) & 1)
        mbarrier.wait(v_ready.index(stage), (t // STAGES) & 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        s = warpgroup_mma(q_tile, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        mbarrier.arrive(k_empty.index(nxt), count=1)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(stage), count=1)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]

    last = (n_tiles - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    l_o = gl.convert_layout(l_i, o_rows)
    o = (acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]).to(dtype)
    if rows_left >= HALF:
        q_tile.store(o)  # Q is no longer read: its buffer stages the output for one TMA store
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [o_row, o_col], q_tile)
        tma.store_wait(pendings=0)
    else:  # the slice's last, partial query block: a TMA store would write into the next slice's rows
        rows = gl.arange(0, HALF, layout=o_rows)
        dims = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        offsets = (o_row + rows).to(gl.int64)[:, None] * o_row_len + (o_col + dims)[None, :]
        gl.store(o_ptr + offsets, o, mask=(rows < rows_left)[:, None])


@gluon.jit
def _block_sparse_attn_hopper_kernel(
    q_desc, k_desc, v_desc, o_desc, o_ptr, counts_ptr, lut_ptr, order_ptr, kv_lens_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len,
    H, n_q, n_k, QB, KB, qk_scale,
    HAS_KV_LENS: gl.constexpr, HEAVY_FIRST: gl.constexpr, STAGES: gl.constexpr,
):
    # The descriptors' tiles: half a query block (HALF rows), one key block; K and V share one row
    # geometry (the launcher's condition).
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    TILE: gl.constexpr = 2 * k_desc.block_type.shape[0]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * HALF, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, TILE, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, TILE, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a buffer
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)

    row, qb, _, b, h, count = program_row(gl.program_id(0), order_ptr, counts_ptr, QB, H, HEAVY_FIRST)
    n_tiles = gl.maximum((count + 1) // 2, 1)
    lut_row = row.to(gl.int64) * KB
    n_valid = valid_length(kv_lens_ptr, b, n_k, HAS_KV_LENS)
    q_row, q_col = _slice_origin(b, h, stride_qb, stride_qh, q_row_len)
    kv_row, kv_col = _slice_origin(b, h, stride_kb, stride_kh, kv_row_len)
    o_row, o_col = _slice_origin(b, h, stride_ob, stride_oh, o_row_len)
    q_row += qb * 2 * HALF
    o_row += qb * 2 * HALF
    rows_left = n_q - qb * 2 * HALF  # of the slice, from this block on
    # Each consumer entry is spelt out: a (function, arguments) pair cannot be built outside this call.
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count,
                     n_tiles, n_valid, o_desc, o_ptr, o_row, o_col, o_row_len, rows_left, qk_scale, STAGES, 0)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count,
                     n_tiles, n_valid, o_desc, o_ptr, o_row + HALF, o_col, o_row_len, rows_left - HALF, qk_scale,
                     STAGES, 1)),
        (_producer, (q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                     v_empty, lut_row, count, n_tiles, q_row, q_col, kv_row, kv_col, STAGES)),
    ], [4, 1], [CONSUMER_REGISTERS, PRODUCER_REGISTERS])


def _row_geometry(t: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row length) of the 2-D view in which every (b, h) slice of a (B, H, N, D) tensor is N
    rows of stride(2) elements starting at one column, or None where no such view exists: the slices'
    starts must be whole rows (strides of b and h multiples of stride(2)), or the heads side by side
    within a row (stride of b a multiple of stride(2), the H heads within one)."""
    B, H, N, D = t.shape
    sb, sh, sn, sd = t.stride()
    if sd != 1 or sn < D:
        return None
    if sb % sn == 0 and sh % sn == 0:
        return ((B - 1) * sb + (H - 1) * sh) // sn + N, D
    if sb % sn == 0 and (H - 1) * sh + D <= sn and sh >= D:
        return (B - 1) * sb // sn + N, (H - 1) * sh + D
    return None


def hopper_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why the Hopper kernel cannot take this call (the Triton kernel then runs it), else None; the
    caller has ruled out the FP8 path and pv_threshold, which it does not implement."""
    if q.shape[-1] != HEAD_DIM:
        return f"head dim {q.shape[-1]} (it takes {HEAD_DIM})"
    if q.dtype not in _GL_DTYPES:
        return f"dtype {q.dtype}"
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        if not tma_compatible(t):
            return f"{name}: base or strides not 16-byte aligned (TMA)"
        if _row_geometry(t) is None:
            return f"{name}: strides {tuple(t.stride())} have no row view (`_row_geometry`)"
    if k.stride() != v.stride():
        return "k and v strides differ"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "not a Hopper (sm90) GPU"
    return None


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor of `t`'s row view (`_row_geometry`), tiles of `rows` rows."""
    n_rows, width = _row_geometry(t)
    layout = gl.NVMMASharedLayout.get_default_for([rows, HEAD_DIM], _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, [n_rows, width], [t.stride(2), 1], [rows, HEAD_DIM], layout)


def block_sparse_attention_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    counts: torch.Tensor,
    indices: torch.Tensor,
    order: torch.Tensor | None,
    scale: float,
    kv_lens: torch.Tensor | None = None,
) -> None:
    """Write into `out` the attention of q (B, H, Nq, 128), k, v (B, H, Nk, 128) over a `BlockLut`'s
    counts and indices (blocks of 128 queries x 64 keys), its rows in `order` (None: row order);
    kv_lens: int32 (B,) or None. `hopper_unsupported(q, k, v, out)` must be None."""
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    QB, KB = counts.shape[2], indices.shape[3]
    _block_sparse_attn_hopper_kernel[(B * H * QB,)](
        _descriptor(q, HALF), _descriptor(k, KEY_BLOCK), _descriptor(v, KEY_BLOCK), _descriptor(out, HALF), out,
        counts, indices, order if order is not None else counts, kv_lens if kv_lens is not None else counts,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        q.stride(2), k.stride(2), out.stride(2),
        H, n_q, n_k, QB, KB, scale * LOG2E,
        HAS_KV_LENS=kv_lens is not None, HEAVY_FIRST=order is not None, STAGES=STAGES,
        num_warps=4, maxnreg=LAUNCH_REGISTERS,
    )
