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

A persistent grid (`block_sparse_attention_hopper(..., programs=N)`; built and checked on the CPU, not
yet run on a GPU, 2026-12-08): N programs, one an SM, each taking rows of the work order in turn, from
an atomic counter as its producer frees up (`dynamic`) or every N-th. It is meant for FLUX at keep 0.25
/ 0.1 (0.80 / 0.50 of cuDNN above), whose rows keep nine or four 128-key tiles: with one program a row,
each program loads its Q and first K / V tiles before its tensor cores start and stores its output after
they stop. Here two Q buffers let the next row's Q load while the consumers finish a row; each row's
work position reaches the consumers in shared memory, published by the barrier of that row's Q load (an
end mark, n_rows, stops them); the K / V ring's position runs on across rows. The last program to finish
zeroes the counters for the next launch. Its sm90 build (Triton 3.8 and 3.6): 197,040 B of shared memory
(164,160 one program a row), 168 registers, no spills. `scripts/hopper_protocol_check.py`
replays the barrier protocol of both grids under random interleavings. A static persistent grid of the
Triton kernel lost by up to 1.24x at FLUX keep 0.1 (the fifty-first session): a fixed share of rows a
program, whatever they cost.

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
def _load_row_tiles(k_desc, v_desc, lut_ptr, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_row, count,
                    n_tiles, kv_row, kv_col, first, STAGES: gl.constexpr):
    """Stream a row's kept K and V blocks into the ring, two a tile; its first tile goes to ring position
    `first` (a persistent program's ring runs on across its rows)."""
    KEY_BLOCK: gl.constexpr = k_desc.block_type.shape[0]
    for t in range(n_tiles):
        stage = (first + t) % STAGES
        phase = ((first + t) // STAGES) & 1
        hi, lo = _tile_entries(count, t)
        row_hi = kv_row + _kept_block(lut_ptr, lut_row, hi) * KEY_BLOCK
        row_lo = kv_row + _kept_block(lut_ptr, lut_row, lo) * KEY_BLOCK
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        _load_pair(k_desc, row_hi, row_lo, kv_col, k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        _load_pair(v_desc, row_hi, row_lo, kv_col, v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _producer(q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              lut_row, count, n_tiles, q_row, q_col, kv_row, kv_col, STAGES: gl.constexpr):
    _load_pair(q_desc, q_row, q_row + q_desc.block_type.shape[0], q_col, q_bar, q_smem)
    _load_row_tiles(k_desc, v_desc, lut_ptr, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_row, count,
                    n_tiles, kv_row, kv_col, 0, STAGES)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """Tile scores s -> (P, the rescale of what came before, the new row maxima and sums), base 2."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _attend_row(q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count, n_tiles,
                n_valid, first, qk_scale, STAGES: gl.constexpr):
    """One warpgroup's 64 query rows (`q_tile`, loaded) against a row's kept blocks, its first tile at
    ring position `first`: the output, normalised, in the accumulator's layout."""
    HALF: gl.constexpr = q_tile.type.shape[0]
    D: gl.constexpr = q_tile.type.shape[1]
    TILE: gl.constexpr = k_smem.type.shape[1]
    KEY_BLOCK: gl.constexpr = TILE // 2
    dtype: gl.constexpr = q_tile.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, TILE, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    s_zero = gl.zeros([HALF, TILE], gl.float32, s_layout)
    acc = gl.zeros([HALF, D], gl.float32, o_layout)

    # The first tile, outside the loop and masked: its key columns past the valid keys, and its repeated
    # half (odd counts) or both halves (a row that keeps nothing).
    stage = first % STAGES
    mbarrier.wait(k_ready.index(stage), (first // STAGES) & 1)
    s = warpgroup_mma(q_tile, k_smem.index(stage).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(stage), count=1)
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

    for t in range(first, first + n_tiles - 1):
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

    last = first + n_tiles - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last % STAGES), count=1)

    l_o = gl.convert_layout(l_i, o_rows)
    return (acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]).to(dtype)


@gluon.jit
def _store_output(o, q_tile, o_desc, o_ptr, o_row, o_col, o_row_len, rows_left):
    """Write a warpgroup's 64 output rows, of which `rows_left` lie in the slice."""
    HALF: gl.constexpr = q_tile.type.shape[0]
    D: gl.constexpr = q_tile.type.shape[1]
    if rows_left >= HALF:
        q_tile.store(o)  # Q is no longer read: its buffer stages the output for one TMA store
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [o_row, o_col], q_tile)
        tma.store_wait(pendings=0)
    else:  # the slice's last, partial query block: a TMA store would write into the next slice's rows
        rows = gl.arange(0, HALF, layout=gl.SliceLayout(1, o.type.layout))
        dims = gl.arange(0, D, layout=gl.SliceLayout(0, o.type.layout))
        offsets = (o_row + rows).to(gl.int64)[:, None] * o_row_len + (o_col + dims)[None, :]
        gl.store(o_ptr + offsets, o, mask=(rows < rows_left)[:, None])


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count, n_tiles,
              n_valid, o_desc, o_ptr, o_row, o_col, o_row_len, rows_left, qk_scale,
              STAGES: gl.constexpr, ORDER: gl.constexpr):
    # ORDER: which half of the query block (64 rows) this warpgroup owns.
    HALF: gl.constexpr = q_smem.type.shape[0] // 2
    q_tile = q_smem.slice(ORDER * HALF, HALF)
    mbarrier.wait(q_bar, 0)
    o = _attend_row(q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count, n_tiles,
                    n_valid, 0, qk_scale, STAGES)
    _store_output(o, q_tile, o_desc, o_ptr, o_row, o_col, o_row_len, rows_left)


@gluon.jit
def _row_task(work, lut_meta, geometry, BLOCK_M: gl.constexpr, HAS_KV_LENS: gl.constexpr,
              HEAVY_FIRST: gl.constexpr):
    """What a program needs of the row at position `work` of the work order: its LUT offset, kept-block
    count and tiles, valid keys, and where its Q, K / V and output slices start in their row views
    (rows_left: the slice's query rows from this block on)."""
    counts_ptr, order_ptr, kv_lens_ptr, H, n_q, n_k, QB, KB = lut_meta
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len = geometry
    row, qb, _, b, h, count = program_row(work, order_ptr, counts_ptr, QB, H, HEAVY_FIRST)
    n_tiles = gl.maximum((count + 1) // 2, 1)
    lut_row = row.to(gl.int64) * KB
    n_valid = valid_length(kv_lens_ptr, b, n_k, HAS_KV_LENS)
    q_row, q_col = _slice_origin(b, h, stride_qb, stride_qh, q_row_len)
    kv_row, kv_col = _slice_origin(b, h, stride_kb, stride_kh, kv_row_len)
    o_row, o_col = _slice_origin(b, h, stride_ob, stride_oh, o_row_len)
    return (lut_row, count, n_tiles, n_valid, q_row + qb * BLOCK_M, q_col, kv_row, kv_col, o_row + qb * BLOCK_M,
            o_col, n_q - qb * BLOCK_M)


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The K / V ring's barriers, a ready and an empty one for each buffer of K and of V."""
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a buffer
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    return k_ready, k_empty, v_ready, v_empty


@gluon.jit
def _block_sparse_attn_hopper_kernel(
    q_desc, k_desc, v_desc, o_desc, o_ptr, counts_ptr, lut_ptr, order_ptr, kv_lens_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len,
    H, n_q, n_k, QB, KB, qk_scale,
    HAS_KV_LENS: gl.constexpr, HEAVY_FIRST: gl.constexpr, STAGES: gl.constexpr,
):
    # One program a row. The descriptors' tiles: half a query block (HALF rows), one key block; K and V
    # share one row geometry (the launcher's condition).
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    TILE: gl.constexpr = 2 * k_desc.block_type.shape[0]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * HALF, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, TILE, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, TILE, D], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES)

    lut_row, count, n_tiles, n_valid, q_row, q_col, kv_row, kv_col, o_row, o_col, rows_left = _row_task(
        gl.program_id(0), (counts_ptr, order_ptr, kv_lens_ptr, H, n_q, n_k, QB, KB),
        (stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len),
        2 * HALF, HAS_KV_LENS, HEAVY_FIRST)
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


@gluon.jit
def _publish_work(slot, work):
    """Write a row's work-order position into `slot` (one int32 of shared memory) for the consumers; the
    barrier the producer arrives on next (the row's Q, or the end mark) publishes it."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    slot.store(gl.full([1], work, gl.int32, layout))


@gluon.jit
def _published_work(slot):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
    return gl.max(slot.load(layout), axis=0)


@gluon.jit
def _persistent_producer(q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty,
                         v_ready, v_empty, work_smem, work_ptr, n_rows, lut_meta, geometry,
                         HEAVY_FIRST: gl.constexpr, DYNAMIC: gl.constexpr, STAGES: gl.constexpr):
    """Load each row this program takes: its work position into `work_smem` and its Q into one of two
    buffers (the next row's Q loads while the consumers finish this one), its K / V blocks into the ring,
    whose position runs on across rows. Then an end mark, n_rows, in the next Q buffer's slot."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    programs = gl.num_programs(0)
    work = gl.program_id(0)
    first = 0  # ring position of the row's first tile
    taken = 0  # rows this program has taken
    while work < n_rows:
        buf = taken % 2
        mbarrier.wait(q_empty.index(buf), ((taken // 2) & 1) ^ 1)
        _publish_work(work_smem.index(buf), work)
        # HAS_KV_LENS off: only the consumers use the valid length (to mask keys); no kv_lens load here.
        lut_row, count, n_tiles, _, q_row, q_col, kv_row, kv_col, _, _, _ = _row_task(
            work, lut_meta, geometry, 2 * HALF, False, HEAVY_FIRST)
        _load_pair(q_desc, q_row, q_row + HALF, q_col, q_ready.index(buf), q_smem.index(buf))
        _load_row_tiles(k_desc, v_desc, lut_ptr, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_row, count,
                        n_tiles, kv_row, kv_col, first, STAGES)
        first += n_tiles
        taken += 1
        if DYNAMIC:  # the work order's next untaken row (the first `programs` went one to each program)
            work = programs + gl.atomic_add(work_ptr, 1, sem="relaxed")
        else:
            work += programs
    buf = taken % 2
    mbarrier.wait(q_empty.index(buf), ((taken // 2) & 1) ^ 1)
    _publish_work(work_smem.index(buf), n_rows)
    mbarrier.arrive(q_ready.index(buf), count=1)
    if DYNAMIC:  # the last program to finish sets the counters back to zero for the next launch
        if gl.atomic_add(work_ptr + 1, 1, sem="acq_rel") == programs - 1:
            gl.atomic_xchg(work_ptr, 0, sem="relaxed")
            gl.atomic_xchg(work_ptr + 1, 0, sem="relaxed")


@gluon.jit
def _persistent_consumer(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem,
                         lut_ptr, n_rows, lut_meta, geometry, o_desc, o_ptr, qk_scale, HAS_KV_LENS: gl.constexpr,
                         HEAVY_FIRST: gl.constexpr, STAGES: gl.constexpr, ORDER: gl.constexpr):
    # ORDER: which half of each query block (64 rows) this warpgroup owns.
    HALF: gl.constexpr = q_smem.type.shape[1] // 2
    o_row_len = geometry[8]
    first = 0
    taken = 0
    mbarrier.wait(q_ready.index(0), 0)
    work = _published_work(work_smem.index(0))
    while work < n_rows:
        buf = taken % 2
        lut_row, count, n_tiles, n_valid, _, _, _, _, o_row, o_col, rows_left = _row_task(
            work, lut_meta, geometry, 2 * HALF, HAS_KV_LENS, HEAVY_FIRST)
        q_tile = q_smem.index(buf).slice(ORDER * HALF, HALF)
        o = _attend_row(q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, lut_ptr, lut_row, count, n_tiles,
                        n_valid, first, qk_scale, STAGES)
        _store_output(o, q_tile, o_desc, o_ptr, o_row + ORDER * HALF, o_col, o_row_len, rows_left - ORDER * HALF)
        mbarrier.arrive(q_empty.index(buf), count=1)  # its output is stored: the buffer may take a later Q
        first += n_tiles
        taken += 1
        mbarrier.wait(q_ready.index(taken % 2), (taken // 2) & 1)
        work = _published_work(work_smem.index(taken % 2))


@gluon.jit
def _block_sparse_attn_hopper_persistent_kernel(
    q_desc, k_desc, v_desc, o_desc, o_ptr, counts_ptr, lut_ptr, order_ptr, kv_lens_ptr, work_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len,
    H, n_q, n_k, QB, KB, n_rows, qk_scale,
    HAS_KV_LENS: gl.constexpr, HEAVY_FIRST: gl.constexpr, DYNAMIC: gl.constexpr, STAGES: gl.constexpr,
):
    # Fewer programs than rows, each taking rows in turn (`block_sparse_attention_hopper`'s `programs`).
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    TILE: gl.constexpr = 2 * k_desc.block_type.shape[0]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, 2 * HALF, D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, TILE, D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES, TILE, D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=2)  # both consumer warpgroups store their output from it
    k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES)
    work_smem = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

    lut_meta = (counts_ptr, order_ptr, kv_lens_ptr, H, n_q, n_k, QB, KB)
    geometry = (stride_qb, stride_qh, stride_kb, stride_kh, stride_ob, stride_oh, q_row_len, kv_row_len, o_row_len)
    gl.warp_specialize([
        (_persistent_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem,
                                lut_ptr, n_rows, lut_meta, geometry, o_desc, o_ptr, qk_scale, HAS_KV_LENS, HEAVY_FIRST,
                                STAGES, 0)),
        (_persistent_consumer, (q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, work_smem,
                                lut_ptr, n_rows, lut_meta, geometry, o_desc, o_ptr, qk_scale, HAS_KV_LENS, HEAVY_FIRST,
                                STAGES, 1)),
        (_persistent_producer, (q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                                k_empty, v_ready, v_empty, work_smem, work_ptr, n_rows, lut_meta, geometry, HEAVY_FIRST,
                                DYNAMIC, STAGES)),
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


# The dynamic grid's counters, one pair per (device index, stream): launches on one stream run in turn.
_WORK_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}


def _work_counter(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (rows handed out, programs finished) for a dynamic persistent launch on the
    current stream. Every launch leaves them at zero: its last program resets them. While a CUDA graph
    is captured, a fresh pair, zeroed by a node of the graph, so that its replays share nothing with
    launches on other streams."""
    if torch.cuda.is_current_stream_capturing():
        return torch.zeros(2, dtype=torch.int32, device=device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).stream_id)
    if key not in _WORK_COUNTERS:
        _WORK_COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return _WORK_COUNTERS[key]


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
    programs: int | None = None,
    dynamic: bool = True,
) -> None:
    """Write into `out` the attention of q (B, H, Nq, 128), k, v (B, H, Nk, 128) over a `BlockLut`'s
    counts and indices (blocks of 128 queries x 64 keys), its rows in `order` (None: row order);
    kv_lens: int32 (B,) or None. `hopper_unsupported(q, k, v, out)` must be None.

    programs: None launches one program a row (what `attention_from_lut` runs, and what is measured);
    a number launches that many persistent programs (at most one a row), each taking rows of the work
    order in turn: with `dynamic`, the next untaken row from a counter whenever its producer finishes
    loading a row, else every programs-th row. Not yet measured on a GPU (module notes)."""
    if programs is not None and programs < 1:
        raise ValueError(f"programs must be None or at least 1, got {programs}")
    B, H, n_q, _ = q.shape
    n_k = k.shape[2]
    QB, KB = counts.shape[2], indices.shape[3]
    n_rows = B * H * QB
    descriptors = (_descriptor(q, HALF), _descriptor(k, KEY_BLOCK), _descriptor(v, KEY_BLOCK), _descriptor(out, HALF))
    pointers = (out, counts, indices, order if order is not None else counts,
                kv_lens if kv_lens is not None else counts)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
               q.stride(2), k.stride(2), out.stride(2))
    options = dict(HAS_KV_LENS=kv_lens is not None, HEAVY_FIRST=order is not None, STAGES=STAGES,
                   num_warps=4, maxnreg=LAUNCH_REGISTERS)
    if programs is None:
        _block_sparse_attn_hopper_kernel[(n_rows,)](
            *descriptors, *pointers, *strides, H, n_q, n_k, QB, KB, scale * LOG2E, **options)
        return
    if n_rows == 0:
        return
    work = _work_counter(q.device) if dynamic else counts
    _block_sparse_attn_hopper_persistent_kernel[(min(programs, n_rows),)](
        *descriptors, *pointers, work, *strides, H, n_q, n_k, QB, KB, n_rows, scale * LOG2E, DYNAMIC=dynamic,
        **options)
