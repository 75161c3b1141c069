"""Triton kernel: block-mass estimate from per-row features and top-CDF block selection.

One program takes QB query blocks of one (batch, head). Pass 1 runs an online softmax
normaliser over every key feature row; pass 2 recomputes the scores, turns them into
probabilities and sums them into per-(query block, key block) masses, written out; then, after a
barrier, each of its query blocks finds its top-CDF cutoff by bisection on the float bit
pattern of the cutoff mass (non-negative floats order like their int32 bits, so 32 halvings
land exactly on the k-th largest mass) — no sort.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsediff._runtime import kernels_available, triton_interpreting
from sparsediff.kernels.block_select_reference import block_select_reference, top_cdf

# Tile configs: key feature rows per tile, query feature rows per program (at least 16 for
# tl.dot), and the widest key-block row the in-register bisection handles.
KEY_ROWS = 64
QUERY_ROWS = 32
MAX_KEY_BLOCKS = 8192
SELECT_ELEMENTS = 8192  # masses held at once by the bisection: rows per step = this // row width
NUM_WARPS = 4


@triton.jit
def _scores(q_ptr, k_ptr, sqn, sqd, skn, skd, a_idx, b_idx, nq_src, nk_src, cols,
            D: tl.constexpr, S: tl.constexpr, DOT_FP32: tl.constexpr):
    # sum_s q[a*S + S-1-s] . k[b*S + s]: a plain dot for S == 1, anti-diagonal sums for S > 1.
    acc = tl.zeros((a_idx.shape[0], b_idx.shape[0]), dtype=tl.float32)
    # A loop, not unrolled: unrolled, the S tile pairs' loads are all kept in flight and
    # overflow shared memory at D=128, S=8 (393 KB requested on the H100).
    for s in range(S):
        qr = a_idx * S + (S - 1 - s)
        kr = b_idx * S + s
        qt = tl.load(q_ptr + qr[:, None] * sqn + cols[None, :] * sqd,
                     mask=(qr[:, None] < nq_src) & (cols[None, :] < D), other=0.0)
        kt = tl.load(k_ptr + kr[:, None] * skn + cols[None, :] * skd,
                     mask=(kr[:, None] < nk_src) & (cols[None, :] < D), other=0.0)
        if DOT_FP32:
            acc += tl.dot(qt.to(tl.float32), tl.trans(kt.to(tl.float32)))
        else:
            acc += tl.dot(qt.to(kt.dtype), tl.trans(kt))
    return acc


@triton.jit
def _key_logw(b_idx, kv_len, k_tokens, trust_ptr, RK: tl.constexpr, HAS_TRUST: tl.constexpr):
    # log(#valid keys the feature row covers); -inf for none or for an untrusted key block.
    cnt = tl.minimum(tl.maximum(kv_len - b_idx * k_tokens, 0), k_tokens).to(tl.float32)
    ok = cnt > 0
    if HAS_TRUST:
        ok = ok & (tl.load(trust_ptr + b_idx // RK) != 0)
    return tl.where(ok, tl.log(tl.maximum(cnt, 1.0)), float("-inf"))


@triton.jit
def _block_select_kernel(
    q_ptr, k_ptr, thr_ptr, lens_ptr, trust_ptr, mass_ptr, mask_ptr,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd,
    H, N, nq_src, nk_src, nq, nk, q_tokens, k_tokens, scale,
    D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr, RQ: tl.constexpr, RK: tl.constexpr,
    QB: tl.constexpr, KB: tl.constexpr, NKP: tl.constexpr, SR: tl.constexpr,
    HAS_LENS: tl.constexpr, HAS_TRUST: tl.constexpr, DOT_FP32: tl.constexpr, SELECT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    QT: tl.constexpr = QB * RQ
    KT: tl.constexpr = KB * RK
    q_base = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh  # int64: B*H*N*D may pass 2**31
    k_base = k_ptr + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    t_base = trust_ptr + bh * nk
    kv_len = N
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(lens_ptr + b), N)
    cols = tl.arange(0, DP)
    a_idx = pid * QT + tl.arange(0, QT)
    n_key_rows = nk * RK

    # Pass 1: per query feature row, max and normaliser of exp(score + logw) over all key rows.
    m_i = tl.full((QT,), -1.0e30, dtype=tl.float32)  # finite: -inf - -inf would be NaN
    l_i = tl.zeros((QT,), dtype=tl.float32)
    for k0 in range(0, n_key_rows, KT):
        b_idx = k0 + tl.arange(0, KT)
        s = _scores(q_base, k_base, sqn, sqd, skn, skd, a_idx, b_idx, nq_src, nk_src, cols, D, S, DOT_FP32)
        s = s * scale + _key_logw(b_idx, kv_len, k_tokens, t_base, RK, HAS_TRUST)[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new

    # Pass 2: probabilities, weighted by each query row's valid tokens, summed per block pair.
    wq = tl.minimum(tl.maximum(N - a_idx * q_tokens, 0), q_tokens).to(tl.float32)
    row_w = wq / tl.where(l_i > 0, l_i, 1.0)
    w_blk = tl.sum(tl.reshape(wq, (QB, RQ)), axis=1)
    w_blk = tl.where(w_blk > 0, w_blk, 1.0)
    qblk = pid * QB + tl.arange(0, QB)
    out_base = bh * nq * nk
    for k0 in range(0, n_key_rows, KT):
        b_idx = k0 + tl.arange(0, KT)
        s = _scores(q_base, k_base, sqn, sqd, skn, skd, a_idx, b_idx, nq_src, nk_src, cols, D, S, DOT_FP32)
        s = s * scale + _key_logw(b_idx, kv_len, k_tokens, t_base, RK, HAS_TRUST)[None, :]
        p = tl.exp(s - m_i[:, None]) * row_w[:, None]
        blk_mass = tl.sum(tl.sum(tl.reshape(p, (QB, RQ, KB, RK)), axis=3), axis=1) / w_blk[:, None]
        kblk = k0 // RK + tl.arange(0, KB)
        tl.store(mass_ptr + out_base + qblk[:, None] * nk + kblk[None, :], blk_mass,
                 mask=(qblk[:, None] < nq) & (kblk[None, :] < nk))
    if SELECT:
        _select_rows(mass_ptr + out_base, mask_ptr + out_base, thr_ptr + h, pid * QB, nq, nk, QB, NKP, SR)


@triton.jit
def _select_rows(mass_ptr, mask_ptr, thr_ptr, row0, nq, nk, QB: tl.constexpr, NKP: tl.constexpr, SR: tl.constexpr):
    # Top-CDF per query block: largest cutoff c with sum(mass >= c) >= thr * total; SR rows at once.
    tl.debug_barrier()  # the rows were just written by other threads of this program
    thr = tl.load(thr_ptr)
    kcols = tl.arange(0, NKP)
    for g in tl.static_range(QB // SR):
        rows = row0 + g * SR + tl.arange(0, SR)
        offs = rows[:, None] * nk + kcols[None, :]
        ok = (rows[:, None] < nq) & (kcols[None, :] < nk)
        m = tl.load(mass_ptr + offs, mask=ok, other=0.0)
        bits = m.to(tl.int32, bitcast=True)
        target = tl.sum(m, axis=1) * thr
        lo = tl.zeros((SR,), dtype=tl.int32)
        hi = tl.max(bits, axis=1) + 1
        for _ in range(32):
            mid = lo + (hi - lo) // 2
            reach = tl.sum(tl.where(bits >= mid[:, None], m, 0.0), axis=1) >= target
            lo = tl.where(reach, mid, lo)
            hi = tl.where(reach, hi, mid)
        lo = tl.where(thr >= 1.0, 0, lo)  # masses are >= 0: cutoff 0 keeps every block
        tl.store(mask_ptr + offs, (bits >= lo[:, None]).to(tl.int8), mask=ok)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimated block masses and their top-CDF selection: returns (mask bool (B, H, nq, nk),
    mass fp32 (B, H, nq, nk)). Arguments and semantics as `block_mass_reference` and `top_cdf`
    (cdf_threshold: fp32 (H,)); runs the Triton kernel where kernels are available."""
    b, h = qf.shape[:2]
    nq, nk = -(-n_tokens // block_m), -(-n_tokens // block_n)
    rq, rk = block_m // q_tokens, block_n // k_tokens
    if qf.dim() != 4 or kf.dim() != 4 or kf.shape[:2] != (b, h) or qf.shape[-1] != kf.shape[-1]:
        raise ValueError(f"qf and kf must be (B, H, M, D) alike, got {tuple(qf.shape)}, {tuple(kf.shape)}")
    if rq * q_tokens != block_m or rk * k_tokens != block_n or rk > KEY_ROWS:
        raise ValueError(f"q_tokens={q_tokens}, k_tokens={k_tokens} must divide the blocks {block_m}x{block_n}")
    kw = dict(stride=stride, q_tokens=q_tokens, k_tokens=k_tokens, n_tokens=n_tokens, block_m=block_m,
              block_n=block_n, scale=scale, kv_lens=kv_lens, k_trusted=k_trusted)
    if not kernels_available(qf.device):
        return block_select_reference(qf, kf, cdf_threshold, **kw)
    qb = max(1, QUERY_ROWS // rq)
    mass = torch.empty(b, h, nq, nk, device=qf.device, dtype=torch.float32)
    mask = torch.empty(b, h, nq, nk, device=qf.device, dtype=torch.int8)
    thr = cdf_threshold.to(device=qf.device, dtype=torch.float32).contiguous()
    lens = kv_lens.to(device=qf.device, dtype=torch.int32) if kv_lens is not None else thr
    trust = k_trusted.to(torch.int8).contiguous() if k_trusted is not None else mask
    interp = triton_interpreting()
    select = nk <= MAX_KEY_BLOCKS  # wider rows: torch's sort-based selection below
    nkp = max(16, triton.next_power_of_2(nk)) if select else 16
    _block_select_kernel[(-(-nq // qb), b * h)](
        qf, kf, thr, lens, trust, mass, mask, *qf.stride(), *kf.stride(),
        h, n_tokens, qf.shape[-2], kf.shape[-2], nq, nk, q_tokens, k_tokens, scale / stride,
        D=qf.shape[-1], DP=max(16, triton.next_power_of_2(qf.shape[-1])), S=stride, RQ=rq, RK=rk,
        QB=qb, KB=KEY_ROWS // rk, NKP=nkp, SR=max(1, min(qb, SELECT_ELEMENTS // nkp)),
        HAS_LENS=kv_lens is not None, HAS_TRUST=k_trusted is not None,
        # fp32 dots for fp32 features, and under the interpreter (its bf16 dot is wrong).
        DOT_FP32=interp or (qf.dtype == torch.float32 and kf.dtype == torch.float32),
        SELECT=select, num_warps=NUM_WARPS,
    )
    if not select:
        return top_cdf(mass, thr), mass
    return mask.view(torch.bool), mass
