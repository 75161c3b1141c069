"""Experiment (fifty-second session): block-sparse flash attention written in Gluon for Hopper, the
FlashAttention-3 schedule that Triton's compiler does not produce from `block_sparse_attn`'s kernel.

- One program per 128-row query block, one CTA an SM: eight consumer warps (two warpgroups of 64
  rows; one partition, or one partition each, optionally taking turns: SCHEDULE) and one producer
  warp that streams the row's kept K and V tiles by TMA into a ring of STAGES buffers (mbarriers:
  ready / empty per buffer).
- In the consumers, the loop issues the Q·K product of the next kept block and the P·V product of
  the current one, then waits for Q·K, computes the softmax, and waits for P·V: FlashAttention-3's
  intra-warpgroup order (arXiv 2407.08608, algorithm 2), as in TLX's Hopper ping-pong tutorial.

What the SASS shows (compiled for sm_90a on the CPU by Triton 3.6's ptxas 12.8; `gluon_attention.py`
run as a script prints the resources and an outline of the SASS): ptxas moves the 64 exponentials
of each block's softmax below the wait for P·V, whatever the PTX order (also with the next P passed
through that wait as a dependency, or with a barrier arrive between them). Within one warpgroup only
the row maxima overlap P·V; the exponentials can overlap the other warpgroup's products (SCHEDULE 2
makes the two take turns). An order that keeps P·V in flight across the loop's back edge (block
i-1's P·V waited for after block i+1's Q·K is issued) makes ptxas serialise every wgmma (C7514:
non-wgmma instructions read an accumulator within the pipeline stage).

A probe, not a product kernel: no ragged lengths (N a multiple of 128), no kv_lens, no P·V skip,
contiguous (B, H, N, D) bf16 inputs, at least one kept block a row. `gluon_attention_probe.py`
checks it against the product kernel and times it against cuDNN and the product kernel.
"""
from __future__ import annotations

import torch
import triton
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

BLOCK = 128  # query rows and key rows of a tile
CONSUMER_WARPS = gl.constexpr(8)
PRODUCER_REGISTERS = gl.constexpr(24)
SPLIT_CONSUMER_REGISTERS = gl.constexpr(240)
MAX_REGISTERS = 168  # (8 consumer + 4 producer-group warps) x 32 x 168 <= 65,536: the consumers get 240
LOG2E = 1.4426950408889634


@gluon.jit
def _producer(q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
              lut_row, q_row, kv_base, count, max_kept, STAGES: gl.constexpr):
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in range(count):
        stage = i % STAGES
        phase = (i // STAGES) & 1
        kv_row = kv_base + gl.load(lut_ptr + lut_row * max_kept + i) * BLOCK_N
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row, 0], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row, 0], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _take_turn(turns, j, ORDER: gl.constexpr, PINGPONG: gl.constexpr):
    # Ping-pong (FlashAttention-3, section 3.1): the two warpgroups issue their products in turn, so that
    # one's softmax runs while the other's products hold the tensor cores. Warpgroup ORDER's j-th
    # turn waits for the other's j-th (ORDER 1) or (j-1)-th (ORDER 0; its first passes at once).
    if PINGPONG:
        mbarrier.wait(turns.index(ORDER), (j & 1) ^ (1 - ORDER))


@gluon.jit
def _pass_turn(turns, ORDER: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turns.index(1 - ORDER), count=1)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale):
    """Block scores s -> (P, the rescale of what came before, the new row maxima and sums), base 2."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=1)


@gluon.jit
def _consumer(o_desc, q_tile, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turns, q_row, count,
              qk_scale, STAGES: gl.constexpr, WARPS: gl.constexpr, ORDER: gl.constexpr, PINGPONG: gl.constexpr):
    # q_tile: the rows of the query block these WARPS warps own (all of it, or one warpgroup's half).
    BLOCK_M: gl.constexpr = q_tile.type.shape[0]
    D: gl.constexpr = q_tile.type.shape[1]
    BLOCK_N: gl.constexpr = k_smem.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(q_bar, 0)

    # The first kept block's scores and softmax, outside the loop.
    mbarrier.wait(k_ready.index(0), 0)
    _take_turn(turns, 0, ORDER, PINGPONG)
    s = warpgroup_mma(q_tile, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pass_turn(turns, ORDER, PINGPONG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    p, _, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)  # acc is still zero: nothing to rescale

    for i in range(count - 1):
        stage = i % STAGES
        nxt = (i + 1) % STAGES
        # Next block's Q·K, then this block's P·V; ptxas lets only the next row maxima run while P·V
        # is in flight (the module doc).
        mbarrier.wait(k_ready.index(nxt), ((i + 1) // STAGES) & 1)
        mbarrier.wait(v_ready.index(stage), (i // STAGES) & 1)
        p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        _take_turn(turns, i + 1, ORDER, PINGPONG)
        s = warpgroup_mma(q_tile, k_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        _pass_turn(turns, ORDER, PINGPONG)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))
        mbarrier.arrive(k_empty.index(nxt), count=1)
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(v_empty.index(stage), count=1)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]

    last = (count - 1) % STAGES
    mbarrier.wait(v_ready.index(last), ((count - 1) // STAGES) & 1)
    p_op = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    _take_turn(turns, count, ORDER, PINGPONG)
    acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    _pass_turn(turns, ORDER, PINGPONG)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(v_empty.index(last), count=1)

    o = acc / gl.convert_layout(l_i, o_rows)[:, None]
    q_tile.store(o.to(o_desc.dtype))  # Q is no longer read: its buffer stages the output
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_tile)
    tma.store_wait(pendings=0)


@gluon.jit
def _gluon_attention_kernel(q_desc, k_desc, v_desc, o_desc, lut_ptr, counts_ptr, N, max_kept, qk_scale,
                            STAGES: gl.constexpr, SCHEDULE: gl.constexpr):
    # SCHEDULE 0: one 8-warp consumer partition. 1: each warpgroup its own partition, owning half the
    # query rows, so that the two synchronise only through the K / V buffers (an 8-warp partition
    # syncs all 8 warps at every arrive). 2: as 1, the warpgroups taking turns (ping-pong).
    SPLIT: gl.constexpr = SCHEDULE > 0
    PINGPONG: gl.constexpr = SCHEDULE == 2
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HALF: gl.constexpr = BLOCK_M // 2
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(turns.index(0), count=1)
    mbarrier.init(turns.index(1), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2 if SPLIT else 1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2 if SPLIT else 1)

    qb = gl.program_id(0)
    bh = gl.program_id(1)
    lut_row = bh * gl.num_programs(0) + qb
    q_row = bh * N + qb * BLOCK_M
    count = gl.load(counts_ptr + lut_row)
    kv_base = bh * N
    # Each branch spells out the producer's entry: a (function, arguments) pair cannot be built
    # outside the warp_specialize call.
    if SPLIT:
        gl.warp_specialize([
            (_consumer, (o_desc, q_smem.slice(0, HALF), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         turns, q_row, count, qk_scale, STAGES, 4, 0, PINGPONG)),
            (_consumer, (o_desc, q_smem.slice(HALF, HALF), k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                         turns, q_row + HALF, count, qk_scale, STAGES, 4, 1, PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                         v_empty, lut_row, q_row, kv_base, count, max_kept, STAGES)),
        ], [4, 1], [SPLIT_CONSUMER_REGISTERS, PRODUCER_REGISTERS])
    else:
        gl.warp_specialize([
            (_consumer, (o_desc, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, turns, q_row,
                         count, qk_scale, STAGES, CONSUMER_WARPS, 0, False)),
            (_producer, (q_desc, k_desc, v_desc, lut_ptr, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                         v_empty, lut_row, q_row, kv_base, count, max_kept, STAGES)),
        ], [1], [PRODUCER_REGISTERS])


def kept_block_table(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, QB, KB) bool mask -> (int32 (B*H*QB, max kept) kept key blocks in order, int32 counts)."""
    flat = block_mask.reshape(-1, block_mask.shape[-1])
    counts = flat.sum(-1).to(torch.int32)
    if int(counts.min()) < 1:
        raise ValueError("every query-block row must keep at least one key block")
    order = torch.argsort((~flat).to(torch.int8), dim=-1, stable=True)[:, :int(counts.max())]
    return order.to(torch.int32).contiguous(), counts.contiguous()


def descriptors(q, k, v, o, split: bool) -> list[TensorDescriptor]:
    """TMA descriptors of the (B*H*N, D) views; the output's blocks are a partition's rows."""
    d = q.shape[-1]
    layout = gl.NVMMASharedLayout.get_default_for([BLOCK, d], gl.bfloat16)
    o_rows = BLOCK // 2 if split else BLOCK
    o_layout = gl.NVMMASharedLayout.get_default_for([o_rows, d], gl.bfloat16)
    return [TensorDescriptor.from_tensor(x.view(-1, d), [BLOCK, d], layout) for x in (q, k, v)] + [
        TensorDescriptor.from_tensor(o.view(-1, d), [o_rows, d], o_layout)]


def gluon_attention(q, k, v, table: tuple[torch.Tensor, torch.Tensor], scale: float | None = None,
                    stages: int = 2, schedule: int = 0) -> torch.Tensor:
    """Block-sparse attention of contiguous bf16 (B, H, N, D) q, k, v over `kept_block_table`'s table."""
    b, h, n, d = q.shape
    if n % BLOCK or q.dtype != torch.bfloat16 or not all(x.is_contiguous() for x in (q, k, v)):
        raise ValueError("the probe takes contiguous bf16 (B, H, N, D) with N a multiple of 128")
    lut, counts = table
    o = torch.empty_like(q)
    scale = d**-0.5 if scale is None else scale
    _gluon_attention_kernel[(n // BLOCK, b * h)](*descriptors(q, k, v, o, schedule > 0), lut, counts, n,
                                                  lut.shape[1], scale * LOG2E, STAGES=stages, SCHEDULE=schedule,
                                                  num_warps=4 if schedule else CONSUMER_WARPS.value,
                                                  maxnreg=MAX_REGISTERS)
    return o


def compile_for_sm90(d: int, stages: int, schedule: int):
    """Compile ahead of time for sm90 (no GPU needed): the resources, and a check that it builds."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    x = torch.zeros(2, 1, 2 * BLOCK, d, dtype=torch.bfloat16)
    descs = [mangle_type(desc) for desc in descriptors(x, x, x, x, schedule > 0)]
    signature = dict(zip(("q_desc", "k_desc", "v_desc", "o_desc"), descs))
    signature.update(lut_ptr="*i32", counts_ptr="*i32", N="i32", max_kept="i32", qk_scale="fp32", STAGES="constexpr",
                     SCHEDULE="constexpr")
    src = GluonASTSource(fn=_gluon_attention_kernel, signature=signature,
                         constexprs={"STAGES": stages, "SCHEDULE": schedule})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4 if schedule else CONSUMER_WARPS.value, "maxnreg": MAX_REGISTERS})


def _cuda_tool(tool: str, data: bytes, suffix: str, *args: str) -> str:
    """Output (stdout and stderr) of one of Triton's bundled CUDA tools (ptxas, nvdisasm) run on
    `data` written to a temporary file."""
    import os
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    path = os.path.join(os.path.dirname(get_ptxas(90).path), tool)
    with tempfile.NamedTemporaryFile("wb", suffix=suffix) as f:
        f.write(data)
        f.flush()
        done = subprocess.run([path, *args, f.name], capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def sass_outline(compiled) -> str:
    """The kernel's SASS reduced to the instructions that show the schedule (MMAs, their waits, the
    exponentials, barrier arrivals), runs of one kind counted: where the softmax sits against the waits."""
    import re

    sass = _cuda_tool("nvdisasm", compiled.asm["cubin"], ".cubin", "-c")
    runs: list[list] = []
    for op in re.findall(r"\b(HGMMA|WARPGROUP\.[\w.]+|MUFU\.EX2|SYNCS\.ARRIVE[\w.]*|EXIT)\b", sass):
        if runs and runs[-1][0] == op:
            runs[-1][1] += 1
        else:
            runs.append([op, 1])
    return " ".join(op if n == 1 else f"{op} x{n}" for op, n in runs)


if __name__ == "__main__":
    import re

    for d, stages, schedule in ((128, 2, 0), (128, 3, 0), (64, 2, 0), (128, 2, 1), (128, 3, 1), (64, 2, 1),
                                (128, 2, 2), (128, 3, 2), (64, 2, 2)):
        compiled = compile_for_sm90(d, stages, schedule)
        report = _cuda_tool("ptxas", compiled.asm["ptx"].encode(), ".ptx", "-arch=sm_90a", "-v", "-o", "/dev/null")
        print(f"D={d} stages={stages} schedule={schedule}: shared {compiled.metadata.shared} B;",
              "; ".join(re.findall(r"Used \d+ registers[^\n]*|\d+ bytes spill stores|.*Potential Performance.*",
                                   report)))
        if stages == 2 and d == 128:
            print("  SASS:", sass_outline(compiled))
