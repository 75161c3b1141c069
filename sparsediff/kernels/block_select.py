"""Triton kernels: block-mass estimate from per-row features, and top-CDF block selection.

The estimate is a softmax over every key feature row for each query feature row, summed per key
block. It runs in two launches so that the work spreads over the whole GPU (a short sequence has
few query rows, a long one many keys):

1. `_partial_mass_kernel`, one program per (query-row group, key-tile group, batch*head): for each
   of its key tiles (read by TMA, but for the anti-diagonal method's strided rows), the scores of
   its query rows, their maximum over the tile, and exp(score - tile maximum) summed per key block.
   No state crosses tiles, so one pass over the keys suffices and every tile is a separate unit of
   parallel work.
2. `_combine_select_kernel`, one program per SR query blocks of one (batch, head): rescales each
   row's tile sums to the row's global maximum, normalises them, averages a query block's rows
   (weighted by their valid query tokens), writes the block masses and, optionally, keeps the
   fewest blocks whose mass reaches the head's `cdf_threshold` (bisection on the float bit pattern
   of the cutoff: non-negative floats order like their int32 bits, so at most 32 halvings land
   exactly on the k-th largest mass; no sort).

`select_top_cdf` runs the selection alone on given masses (calibration scores several thresholds
against one estimate). The per-tile partial sums live in a scratch buffer bounded by
PARTIAL_ELEMENTS; longer problems are processed in chunks of query blocks.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from sparsediff._runtime import kernels_available, triton_interpreting
from sparsediff.kernels import dependent_launch, padded_head_dim, tma_compatible, valid_length, wait_for_prior_kernel
from sparsediff.kernels.block_select_reference import block_select_reference, top_cdf
from sparsediff.kernels.block_sparse_attn import LutTargets, complete_lut_rows, fill_block_lut, lut_launch_arguments

# Tile configs. Phase 1: key feature rows per tile; per features' element size, and for fewer or at
# least LONG_KEYS key feature rows, the query feature rows per program (>= 16 for tl.dot), warps,
# pipeline stages and key tiles per program. The key tiles arrive by TMA (a tensor descriptor),
# which leaves the warps' issue slots to the scores. GPU time of the CUDA-graphed sampled prediction
# with its lookup table, sim 0 (H200, 2026-12-03/04,
# bench-results/h200-2026-12-04/tune-partial-mass-*-session16.log), FLUX / CogVideoX / Wan /
# HunyuanVideo: 64 query rows, 4 warps, 3 stages, 8 tiles 43.1 / 212.4 / 187.0 / 4,635 us; 128 rows,
# 8 warps, 2 stages, 8 tiles 46.4 / 270.1 / 193.3 / 4,367 us; the previous kernel (128 rows, 4
# warps, 2 stages, pointer loads, a log per key column) 50.6 / 363.3 / 248.2 / 5,744 us. At the
# declared configs, with the per-column key weights applied in edge tiles only: 42.6 / 198.9 / 178.2
# / 4,153 us, against 42.4 / 212.4 / 188.7 / 4,366 us in the same run without that
# (tune-partial-mass-edge-session16.log). A program reads every key of its tiles once, so 128 rows a
# program read a long sequence's keys half as often: the two configs were within 0.4% of each other
# at 67,576 and 75,600 keys, 3% apart at 47,056 (64 rows ahead) and at 119,056 (128 rows ahead),
# where 16 tiles a program beat 8 by 1.2% (4,471 vs 4,525 us;
# tune-partial-mass-lengths-session16.log). fp32 features (pooled queries) keep 64 rows and 2
# stages: 128 fp32 rows held in registers would spill, and 3 stages of fp32 key tiles overflow
# shared memory.
# One pipeline stage for 16-bit features (2026-12-04, tune-partial-mass-stages-session18.log): the
# kernel waits on latency, not on a unit (Nsight Compute at HunyuanVideo's shape, 128 rows, 8 warps,
# 2 stages: tensor pipe 43.5%, issue slots 33%, no eligible warp in 66% of cycles, 2 programs an SM
# held by 93 registers and 99 KB of shared memory; ncu-hunyuan-predict-attention-session18.txt).
# With one stage a 64-row program takes 49 KB, so 4 share an SM and cover each other's TMA waits:
# the graphed prediction above, two timings each, sampled / sampled8: CogVideoX 187.9, 187.0 ->
# 185.4, 185.4 / 525.7, 531.1 -> 509.3, 509.5 us; Wan 174.3, 174.2 -> 167.7, 166.7 / 599.7, 604.4 ->
# 562.5, 567.2; HunyuanVideo (16 tiles; 128 rows and 2 stages before) 4,059, 4,105 -> 3,990, 4,041 /
# 15,065, 15,503 -> 14,555, 15,181; FLUX 36.0, 35.9 -> 36.3 (tune-partial-mass-registers-
# session18.log). Key tiles of 64 rows (less shared memory, more programs an SM) lost 6-30%, and a
# register cap of 80 does not compile (ptxas: too few registers for the MMA). The long sequences'
# config now differs from the short ones' in the key tiles a program walks only.
# A tile's key-block sums stay a reshape and sum: as a tensor-core product of p with a 0/1
# key-to-block matrix (16 columns) they made the kernel 1.9x slower at CogVideoX's shape (26.0 vs
# 13.9 ms over a compiled step's 42 calls), and the runs that predicted at D=128 with it stopped
# on an illegal memory access (H200, Triton 3.6, 2026-12-02).
# One launch for a short sequence's whole sampled prediction (these two kernels, q's self-similarity
# and the lookup table; each (row group, head)'s last program to finish, counted on an atomic,
# combining and selecting) lost at FLUX's shape (H200, 2026-12-03, GPU time of the CUDA-graphed
# prediction with its table and row order, sampled, sim 0 / 0.2): 53.6-65.3 / 76.2-86.5 us with 16-
# or 32-row groups, 75.9-128.6 / 98.7-147.1 us with 64- or 128-row groups, against these five
# launches' 51.8 / 70.0 us (tune-fused-predict-*-session12.log). The combination's registers
# (176-255 a thread by ptxas) became the whole kernel's, and a group's last program ran it after
# the group's scoring; 16-row groups each read all of a head's keys.


class PartialMassConfig(NamedTuple):
    query_rows: int
    num_warps: int
    num_stages: int
    max_tiles: int  # key tiles a program walks at most: fewer when that leaves the GPU underfilled


PARTIAL_CONFIGS: dict[tuple[int, bool], PartialMassConfig] = {  # (element size, at least LONG_KEYS keys)
    (2, False): PartialMassConfig(64, 4, 1, 8),
    (2, True): PartialMassConfig(64, 4, 1, 16),
    (4, False): PartialMassConfig(64, 4, 2, 8),
    (4, True): PartialMassConfig(64, 4, 2, 8),
}
LONG_KEYS = 65536
KEY_ROWS = 128
TARGET_PROGRAMS = 2048  # enough programs to fill 132 SMs many times over, tails included
# Phase 2: one row of masses a program on a GPU, held in registers; the widest key-block row the
# in-register bisection handles, and one warp per SELECT_ELEMENTS_PER_WARP masses of the padded row.
# One row and one warp a program took the combine-and-select kernel from 31.3 to 17.7 us at Wan's
# shape (512-wide rows), 57.6 to 33.1 at CogVideoX's (512) and 690 to 480 at HunyuanVideo's (2048),
# against 8 rows a program (4096 masses) with one warp per 512 masses; 2-16 rows a program with one
# warp, or one row with 2 or 4 warps, were slower (H200, 2026-12-03, bench-results/h200-2026-12-03/
# tune-select-geometry-session15.log; FLUX's 128-wide rows were timed at 2 rows a program, 6.7 us,
# and at one row only in a one-row rewrite of these kernels, 5.3 us: select-geometry-check-session15.log).
# Rows wider than 2048 (above about 131,000 tokens) were not measured. The interpreter runs programs
# one after another, each at a fixed cost: there a program takes INTERPRETED_SELECT_ELEMENTS masses.
MAX_KEY_BLOCKS = 8192
SELECT_ELEMENTS_PER_WARP = 2048
SELECT_NUM_WARPS = MAX_KEY_BLOCKS // SELECT_ELEMENTS_PER_WARP  # the widest row's
INTERPRETED_SELECT_ELEMENTS = 4096
PARTIAL_ELEMENTS = 2**27  # fp32 scratch of the per-tile sums: 512 MiB at most
LOG2E = math.log2(math.e)


@triton.jit
def _key_weights(b_idx, kv_len, trust_ptr, K_TOKENS: tl.constexpr, RK: tl.constexpr, HAS_TRUST: tl.constexpr):
    # (bias, weight) of each key feature row: bias 0, or -inf for a row of no valid key or of an
    # untrusted key block (kept out of the tile maximum), and weight the number of valid keys the row
    # covers. The weight multiplies the exponential instead of entering it as log(weight): a
    # per-column log (libdevice's logf, about ten instructions) in every tile cost more than the
    # tile's exponentials.
    cnt = tl.minimum(tl.maximum(kv_len - b_idx * K_TOKENS, 0), K_TOKENS)
    ok = cnt > 0
    if HAS_TRUST:
        ok = ok & (tl.load(trust_ptr + b_idx // RK) != 0)
    return tl.where(ok, 0.0, float("-inf")), cnt.to(tl.float32)


@triton.jit
def _dot_rows(qt, kt, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)))
    return tl.dot(qt.to(kt.dtype), tl.trans(kt))


@triton.jit
def _partial_mass_kernel(
    q_ptr, q_rows_ptr, k_src, lens_ptr, trust_ptr, part_ptr, tmax_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    H, N, row0, n_rows, nq_src, nk_src, nk, n_tiles, tiles_per_program, scale,
    D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr, RK: tl.constexpr, K_TOKENS: tl.constexpr,
    QT: tl.constexpr, KT: tl.constexpr, HAS_LENS: tl.constexpr, HAS_TRUST: tl.constexpr, DOT_FP32: tl.constexpr,
    HAS_Q_ROWS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    # Program ids: query-row group fastest, so programs running together share their key tiles in L2.
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    KB: tl.constexpr = KT // RK
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh  # int64: B*H*N*D may pass 2**31
    kv_len = valid_length(lens_ptr, b, N, HAS_LENS)
    local = tl.program_id(0) * QT + tl.arange(0, QT)  # rows of this chunk
    a_idx = row0 + local  # feature rows
    row_ok = local < n_rows
    cols = tl.arange(0, DP)
    # k_src: for S == 1 a tensor descriptor of kf, (1, 1, KT, DP) blocks; else a pointer to kf.
    if S == 1:  # plain dot products: the query rows stay in registers for every tile
        q_row = a_idx
        if HAS_Q_ROWS:  # feature rows picked out of q (sampled queries), read in place
            q_row = tl.load(q_rows_ptr + a_idx, mask=a_idx < nq_src, other=0)
        qt = tl.load(q_base + q_row[:, None] * sqn + cols[None, :] * sqd,
                     mask=(a_idx[:, None] < nq_src) & (cols[None, :] < D), other=0.0)
    part_base = part_ptr + (bh * n_rows + local)[:, None] * nk
    tmax_base = tmax_ptr + (bh * n_rows + local) * n_tiles
    for t in range(tiles_per_program):
        tile = tl.program_id(1) * tiles_per_program + t
        b_idx = tile * KT + tl.arange(0, KT)
        if S == 1:
            kt = k_src.load([b, h, tile * KT, 0]).reshape(KT, DP)  # rows past the end read as 0
            s = _dot_rows(qt, kt, DOT_FP32)
        else:
            # Anti-diagonal sums (XAttention): sum_s q[a*S + S-1-s] . k[b*S + s]. A loop, not
            # unrolled: unrolled, the S tile pairs' loads all stay in flight and overflow shared memory.
            # A ragged sub-block (past q's or k's end, or past the valid keys) is averaged over the
            # products it has (scale carries 1 / S), -inf where none, as `feature_scores`. A ragged
            # query sub-row (q's last, q_len < S tokens) takes the anti-diagonal of its q_len x q_len
            # corner, q[a*S + q_len-1-s] . k[b*S + s] for s < q_len: the full one's would pair its tokens
            # with keys S-q_len.. only, none of them in a last key sub-row of at most S - q_len keys
            # (n % S <= S/2), whose key block then got no mass at all from a last query block of them.
            s = tl.zeros((QT, KT), dtype=tl.float32)
            count = tl.zeros((QT, KT), dtype=tl.float32)
            k_base = k_src + b.to(tl.int64) * skb + h.to(tl.int64) * skh
            k_end = tl.minimum(nk_src, kv_len)
            q_len = tl.minimum(nq_src - a_idx * S, S)  # <= 0 past q's end
            for j in range(S):
                q_ok = j < q_len
                qr = a_idx * S + (q_len - 1 - j)
                kr = b_idx * S + j
                qj = tl.load(q_base + qr[:, None] * sqn + cols[None, :] * sqd,
                             mask=q_ok[:, None] & (cols[None, :] < D), other=0.0)
                kj = tl.load(k_base + kr[:, None] * skn + cols[None, :] * skd,
                             mask=(kr[:, None] < k_end) & (cols[None, :] < D), other=0.0)
                s += _dot_rows(qj, kj, DOT_FP32)
                count += (q_ok[:, None] & (kr[None, :] < k_end)).to(tl.float32)
            s = tl.where(count > 0, s * (S / tl.maximum(count, 1.0)), float("-inf"))
        # Per-column weights for pooled rows (their valid keys), untrusted key blocks and keys past
        # the valid length; a tile of one-key rows wholly within the valid keys skips them.
        if K_TOKENS > 1 or HAS_TRUST or (tile + 1) * KT > kv_len:
            bias, weight = _key_weights(b_idx, kv_len, trust_ptr + bh * nk, K_TOKENS, RK, HAS_TRUST)
            s = s + bias[None, :]
        m = tl.maximum(tl.max(s, axis=1), -1.0e30)  # finite: a tile of no valid key sums to 0
        # The maximum of the unscaled scores (scale > 0), and one FMA and one MUFU.EX2 (flush-to-
        # zero) an element: scale carries log2(e), where exp would add a multiply and denormal
        # handling to every element.
        m = m * scale
        p = tl.math.exp2(s * scale - m[:, None])
        if K_TOKENS > 1:
            p = p * weight[None, :]
        blk = tl.sum(tl.reshape(p, (QT, KB, RK)), axis=2)
        kblk = tile * KB + tl.arange(0, KB)
        # A tile past the last (the last program's spare iterations) has kblk >= nk: nothing stored.
        tl.store(part_base + kblk[None, :], blk, mask=row_ok[:, None] & (kblk[None, :] < nk))
        tl.store(tmax_base + tile, m, mask=row_ok & (tile + 0 * local < n_tiles))  # log2 units


@triton.jit
def _reaches(bits, m, cutoff, target):
    # Per row: whether the masses at or above `cutoff` (compared as int32 bit patterns) reach `target`.
    return tl.sum(tl.where(bits >= cutoff[:, None], m, 0.0), axis=1) >= target


@triton.jit
def _top_cdf_keep(m, thr, nk):
    # Keep, per row of the (R, NKP) masses `m` (>= 0; nk of them real, the rest 0), every block at
    # least as heavy as the largest cutoff c with sum(m >= c) >= thr * total; thr >= 1 keeps every
    # block. The bisection runs on the cutoff's bit pattern between a cutoff that reaches the target
    # and one above the largest mass, until they are adjacent. Any cutoff c <= (1 - thr) * total / nk
    # reaches it (the blocks below c hold less than nk * c); half of that bound, checked, starts the
    # bisection. With it and exp2 on the tile maxima the combine-and-select kernel went from 494 to
    # 402 us at HunyuanVideo's shape, 33.8 to 30.0 at CogVideoX's (H200, 2026-12-04,
    # bench-results/h200-2026-12-04/combine-select-session17.log).
    bits = m.to(tl.int32, bitcast=True)
    total = tl.sum(m, axis=1)
    target = total * thr
    lo = tl.maximum((0.5 * (1.0 - thr) * total / nk).to(tl.int32, bitcast=True), 0)
    lo = tl.where(_reaches(bits, m, lo, target), lo, 0)
    hi = tl.max(bits, axis=1) + 1
    while tl.max(hi - lo, axis=0) > 1:
        mid = lo + (hi - lo) // 2
        reach = _reaches(bits, m, mid, target)
        lo = tl.where(reach, mid, lo)
        hi = tl.where(reach, hi, mid)
    lo = tl.where(thr >= 1.0, 0, lo)  # masses are >= 0: cutoff 0 keeps every block
    return bits >= lo[:, None]


@triton.jit
def _combine_select_kernel(
    part_ptr, tmax_ptr, thr_ptr, mass_ptr, mask_ptr,
    kv_lens_ptr, dense_rows_ptr, dense_cols_ptr, counts_ptr, indices_ptr,
    H, qb0, n_qb, nq, nk, n_tiles, n_tokens, q_tokens, n_keys, tail_qb, tail_kb,
    RQ: tl.constexpr, KB: tl.constexpr, NKP: tl.constexpr, SR: tl.constexpr, SELECT: tl.constexpr,
    LUT: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV_LENS: tl.constexpr, HAS_DENSE_ROWS: tl.constexpr,
    HAS_DENSE_COLS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_prior_kernel(PDL)
    bh = tl.program_id(1)
    local_qb = tl.program_id(0) * SR + tl.arange(0, SR)  # query blocks of this chunk
    kcols = tl.arange(0, NKP)
    ok = (local_qb[:, None] < n_qb) & (kcols[None, :] < nk)
    acc = tl.zeros((SR, NKP), dtype=tl.float32)
    wsum = tl.zeros((SR,), dtype=tl.float32)
    for r in range(RQ):
        local_row = local_qb * RQ + r
        part = tl.load(part_ptr + (bh * n_qb * RQ + local_row)[:, None] * nk + kcols[None, :], mask=ok, other=0.0)
        tmax = tl.load(tmax_ptr + (bh * n_qb * RQ + local_row)[:, None] * n_tiles + kcols[None, :] // KB,
                       mask=ok, other=-1.0e30)
        scaled = part * tl.math.exp2(tmax - tl.max(tmax, axis=1)[:, None])
        total = tl.sum(scaled, axis=1)
        wq = tl.minimum(tl.maximum(n_tokens - ((qb0 + local_qb) * RQ + r) * q_tokens, 0), q_tokens).to(tl.float32)
        acc += scaled * (wq / tl.where(total > 0, total, 1.0))[:, None]  # rows with no valid key add 0
        wsum += wq
    mass = acc / tl.where(wsum > 0, wsum, 1.0)[:, None]
    offs = (bh * nq + qb0 + local_qb)[:, None] * nk + kcols[None, :]
    tl.store(mass_ptr + offs, mass, mask=ok)
    if SELECT:
        keep = _top_cdf_keep(mass, tl.load(thr_ptr + bh % H), nk)
        if LUT:  # the mask completed and its lookup table written here: no LUT launch of its own
            qb = qb0 + local_qb
            bh_rows = bh + 0 * local_qb
            complete_lut_rows(
                keep, bh_rows * nq + qb, local_qb < n_qb, qb, bh_rows, bh_rows // H, kcols, nk, n_keys, tail_qb,
                tail_kb, kv_lens_ptr, dense_rows_ptr, dense_cols_ptr, mask_ptr, counts_ptr, indices_ptr,
                BLOCK_N, HAS_KV_LENS, HAS_DENSE_ROWS, HAS_DENSE_COLS, True,
            )
        else:
            tl.store(mask_ptr + offs, keep.to(tl.int8), mask=ok)


@triton.jit
def _select_kernel(mass_ptr, thr_ptr, mask_ptr, H, nq, nk, NKP: tl.constexpr, SR: tl.constexpr, PDL: tl.constexpr):
    wait_for_prior_kernel(PDL)
    bh = tl.program_id(1)
    rows = tl.program_id(0) * SR + tl.arange(0, SR)
    kcols = tl.arange(0, NKP)
    ok = (rows[:, None] < nq) & (kcols[None, :] < nk)
    offs = (bh * nq + rows)[:, None] * nk + kcols[None, :]
    keep = _top_cdf_keep(tl.load(mass_ptr + offs, mask=ok, other=0.0), tl.load(thr_ptr + bh % H), nk)
    tl.store(mask_ptr + offs, keep.to(tl.int8), mask=ok)


def _select_geometry(nk: int) -> tuple[int, int, int]:
    """(padded row width, rows per program, warps) of the in-register selection of rows of `nk`
    masses. The bisection is a chain of 32 row reductions, whose latency sets the kernel's time on a
    GPU: one row a program and one warp per SELECT_ELEMENTS_PER_WARP masses keep each reduction
    within few warps (one warp: shuffles, no shared memory), and the many rows fill the GPU."""
    nkp = max(16, triton.next_power_of_2(nk))
    rows = max(1, INTERPRETED_SELECT_ELEMENTS // nkp) if triton_interpreting() else 1
    return nkp, rows, max(1, min(SELECT_NUM_WARPS, nkp // SELECT_ELEMENTS_PER_WARP))


def _key_tiles(kf: torch.Tensor, dp: int) -> TensorDescriptor:
    """A tensor descriptor of kf's (1, 1, KEY_ROWS, dp) tiles. TMA wants a 16-byte aligned base and
    strides and a contiguous last dimension: kf in another layout is copied once, its head dim
    zero-padded to a multiple of 16 bytes."""
    if not tma_compatible(kf):
        padded = kf.new_zeros(*kf.shape[:-1], kf.shape[-1] + (-kf.shape[-1] % (16 // kf.element_size())))
        padded[..., :kf.shape[-1]] = kf
        kf = padded
    return TensorDescriptor(kf, list(kf.shape), list(kf.stride()), [1, 1, KEY_ROWS, dp])


def select_top_cdf(mass: torch.Tensor, cdf_threshold: torch.Tensor) -> torch.Tensor:
    """`top_cdf` of contiguous fp32 (B, H, nq, nk) masses for an fp32 (H,) threshold: bool mask.

    The Triton kernel where kernels are available and rows fit its registers, else `top_cdf`."""
    b, h, nq, nk = mass.shape
    thr = cdf_threshold.to(device=mass.device, dtype=torch.float32).contiguous()
    if not kernels_available(mass.device) or nk > MAX_KEY_BLOCKS:
        return top_cdf(mass, thr)
    mass = mass.contiguous()
    mask = torch.empty(b, h, nq, nk, device=mass.device, dtype=torch.int8)
    nkp, sr, warps = _select_geometry(nk)
    _select_kernel[(triton.cdiv(nq, sr), b * h)](mass, thr, mask, h, nq, nk, NKP=nkp, SR=sr, num_warps=warps,
                                                  **dependent_launch(mass.device))
    return mask.view(torch.bool)


def block_select(
    qf: torch.Tensor,
    kf: torch.Tensor,
    cdf_threshold: torch.Tensor,
    *,
    stride: int,
    q_tokens: int,
    k_tokens: int,
    n_tokens: int,
    block_m: int,
    block_n: int,
    scale: float,
    kv_lens: torch.Tensor | None = None,
    k_trusted: torch.Tensor | None = None,
    q_rows: torch.Tensor | None = None,
    lut: LutTargets | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated block masses and their top-CDF selection: returns (mask bool (B, H, nq, nk),
    mass fp32 (B, H, nq, nk)). Arguments and semantics as `block_mass_reference` and `top_cdf`
    (cdf_threshold: fp32 (H,)); q_rows: int64 (M,) indices of qf's rows that are the query
    feature rows (stride 1 only), read in place instead of gathered first. lut: `lut_targets` of the
    mask, filled from the selection; the returned mask is then the completed one (`build_block_lut`'s
    out_mask), and the selection kernel does both in its own launch. Runs the Triton kernels where
    kernels are available."""
    if not scale > 0:  # the kernel takes each tile's maximum before scaling
        raise ValueError(f"scale must be positive, got {scale}")
    if q_rows is not None and (stride != 1 or q_rows.dim() != 1 or q_rows.dtype != torch.int64):
        raise ValueError(f"q_rows must be int64 (M,) and stride 1, got {q_rows.dtype} "
                         f"{tuple(q_rows.shape)}, stride {stride}")
    b, h = qf.shape[:2]
    nq, nk = -(-n_tokens // block_m), -(-n_tokens // block_n)
    rq, rk = block_m // q_tokens, block_n // k_tokens
    if qf.dim() != 4 or kf.dim() != 4 or kf.shape[:2] != (b, h) or qf.shape[-1] != kf.shape[-1]:
        raise ValueError(f"qf and kf must be (B, H, M, D) alike, got {tuple(qf.shape)}, {tuple(kf.shape)}")
    config = PARTIAL_CONFIGS[qf.element_size(), kf.shape[-2] >= LONG_KEYS]
    if rq * q_tokens != block_m or rk * k_tokens != block_n or rk > KEY_ROWS or rq > config.query_rows:
        raise ValueError(f"q_tokens={q_tokens}, k_tokens={k_tokens} must divide the blocks {block_m}x{block_n}")
    kw = dict(stride=stride, q_tokens=q_tokens, k_tokens=k_tokens, n_tokens=n_tokens, block_m=block_m,
              block_n=block_n, scale=scale, kv_lens=kv_lens, k_trusted=k_trusted)
    if not kernels_available(qf.device):
        mask, mass = block_select_reference(qf if q_rows is None else qf[:, :, q_rows], kf, cdf_threshold, **kw)
        if lut is not None:
            mask = mask.contiguous()
            fill_block_lut(mask, lut, out_mask=mask)
        return mask, mass
    device = qf.device
    thr = cdf_threshold.to(device=device, dtype=torch.float32).contiguous()
    lens = kv_lens.to(device=device, dtype=torch.int32).contiguous() if kv_lens is not None else thr
    trust = k_trusted.to(torch.int8).contiguous() if k_trusted is not None else thr
    mass = torch.empty(b, h, nq, nk, device=device, dtype=torch.float32)
    mask = torch.empty(b, h, nq, nk, device=device, dtype=torch.int8)
    select = nk <= MAX_KEY_BLOCKS  # wider rows: torch's sort-based selection below
    fused = select and lut is not None
    if fused:  # the selection kernel completes its rows into the lookup table
        lut_tensors, lut_sizes, lut_flags = lut_launch_arguments(lut, thr)
    else:
        lut_tensors, lut_sizes = (thr,) * 5, (0,) * 3
        lut_flags = dict(HAS_KV_LENS=False, HAS_DENSE_ROWS=False, HAS_DENSE_COLS=False)
    nkp, sr, select_warps = _select_geometry(nk)
    n_tiles = triton.cdiv(nk * rk, KEY_ROWS)
    chunk_qb = max(1, min(nq, PARTIAL_ELEMENTS // (b * h * rq * max(nk, n_tiles))))
    part = torch.empty(b * h * chunk_qb * rq * nk, device=device, dtype=torch.float32)
    tmax = torch.empty(b * h * chunk_qb * rq * n_tiles, device=device, dtype=torch.float32)
    interp = triton_interpreting()
    launch = dependent_launch(device)
    dp = padded_head_dim(qf.shape[-1])
    keys = _key_tiles(kf, dp) if stride == 1 else kf
    n_feature_rows = q_rows.numel() if q_rows is not None else qf.shape[-2]
    for qb0 in range(0, nq, chunk_qb):
        n_qb = min(chunk_qb, nq - qb0)
        row_groups = triton.cdiv(n_qb * rq, config.query_rows)
        per_program = max(1, min(config.max_tiles, n_tiles * row_groups * b * h // TARGET_PROGRAMS))
        _partial_mass_kernel[(row_groups, triton.cdiv(n_tiles, per_program), b * h)](
            qf, q_rows.contiguous() if q_rows is not None else thr, keys, lens, trust, part, tmax, *qf.stride(), *kf.stride(),
            h, n_tokens, qb0 * rq, n_qb * rq, n_feature_rows, kf.shape[-2], nk, n_tiles, per_program,
            scale / stride * LOG2E,
            D=qf.shape[-1], DP=dp, S=stride, RK=rk, K_TOKENS=k_tokens, QT=config.query_rows,
            KT=KEY_ROWS, HAS_LENS=kv_lens is not None, HAS_TRUST=k_trusted is not None,
            # fp32 dots for fp32 features, and under the interpreter (its bf16 dot is wrong).
            DOT_FP32=interp or (qf.dtype == torch.float32 and kf.dtype == torch.float32),
            HAS_Q_ROWS=q_rows is not None, num_warps=config.num_warps, num_stages=config.num_stages,
            **launch,
        )
        _combine_select_kernel[(triton.cdiv(n_qb, sr), b * h)](
            part, tmax, thr, mass, mask, *lut_tensors, h, qb0, n_qb, nq, nk, n_tiles, n_tokens, q_tokens, *lut_sizes,
            RQ=rq, KB=KEY_ROWS // rk, NKP=nkp, SR=sr, SELECT=select, LUT=fused, BLOCK_N=block_n,
            num_warps=select_warps, **lut_flags, **launch,
        )
    mask = mask.view(torch.bool) if select else top_cdf(mass, thr).contiguous()
    if lut is not None and not fused:
        fill_block_lut(mask, lut, out_mask=mask)
    return mask, mass
