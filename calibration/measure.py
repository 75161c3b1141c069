"""What calibration measures inside each attention call: the candidate grid, the steps it samples,
and the controller subclass that evaluates every candidate on the fly while the run stays dense.

Per measured call (one layer, one step, one CFG branch) and per candidate threshold set, per head:
- sparsity: the fraction of (b, query block, key block) pairs its predicted mask skips (over the
  whole sequence; key blocks wholly in padding are not counted, as in SparsityStats);
- error: relative L1 of the sparse output against dense SDPA, sum|o - ref| / sum|ref| over a sample
  of the video-only query blocks (text query blocks are always dense, error 0: leaving them out of
  the denominator makes the estimate conservative);
- pv_skipped: with a pv threshold, the fraction of pairs kept by the mask whose P·V the kernel skipped.
Only these (C, H) numbers are kept (on the device until `drain`), never q/k/v.

Cost: one dense SDPA (returned, so the pipeline's trajectory is the dense one), then per sim value
one block-mass estimate over the whole sequence (`predict_with`: every cdf candidate of that sim
is a cheap top-CDF selection on the same estimate; scalar thresholds, all heads at once), and per
candidate one `block_sparse_attention` over the sampled query blocks only. Estimate for the
default grid (12 candidates over 2 sim values, 1/8 of the query blocks): kernel work 0.125 x (sum
of the candidates' keep fractions, <= 9.7 when attention is near uniform) ~ 1.2 dense calls at
most, plus 2 estimates; on the leading 20% of steps and every 4th after. bench_overhead.py
measures it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch
import torch.nn.functional as F

from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N
from sparsediff.kernels.block_sparse_attn_reference import valid_key_blocks
from sparsediff.processors.controller import AttentionCall, AttentionController

# Default grid. cdf: the fewest key blocks holding this share of each query block's predicted mass;
# dense enough near 1 where a few percent of error lives. sim: 0.0 trusts every pooled block; 0.3
# keeps the rows of query blocks whose tokens disagree (attention.py: 0.6 keeps whole rows the
# predictor ranked correctly, 0.0-0.2 cost nothing on video workloads).
DEFAULT_CDF_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
DEFAULT_SIM_GRID = (0.0, 0.3)
# Query blocks measured per call: this fraction of the video query blocks, at least MIN_ROW_BLOCKS
# (all of them on short sequences). The kernel then costs row_fraction x keep of a full call.
DEFAULT_ROW_FRACTION = 0.125
MIN_ROW_BLOCKS = 16
# Steps: every one of the leading steps (the dense_steps candidates), then every STRIDE-th, and the last.
DEFAULT_LEAD_FRACTION = 0.2
DEFAULT_STEP_STRIDE = 4


@dataclass(frozen=True)
class Candidate:
    """One threshold set evaluated on every head at once."""

    cdf: float
    sim: float
    pv: float | None = None  # None: the kernel computes every kept block exactly

    def as_dict(self) -> dict[str, float | None]:
        return {"cdf": self.cdf, "sim": self.sim, "pv": self.pv}


def candidate_grid(cdf: tuple[float, ...], sim: tuple[float, ...], pv: tuple[float, ...] = ()) -> list[Candidate]:
    """Every (sim, cdf, pv) combination; pv None (exact) is always included."""
    for name, values, low, high, low_open in (("cdf", cdf, 0.0, 1.0, True), ("sim", sim, 0.0, 1.0, False),
                                              ("pv", pv, 0.0, 1.0, True)):
        for x in values:
            if not (math.isfinite(x) and low <= x <= high) or (low_open and x == low):
                bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
                raise ValueError(f"{name} grid values must be in {bound}, got {x!r}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} grid has repeated values: {values}")
    if not cdf or not sim:
        raise ValueError("cdf and sim grids must each hold at least one value")
    return [Candidate(c, s, p) for s, c, p in product(sim, cdf, (None, *pv))]


def measured_steps(steps: int, lead: int, stride: int) -> list[int]:
    """Steps measured in each generation: all of [0, lead), then lead, lead + stride, ..., and the last."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= lead <= steps:
        raise ValueError(f"lead steps must be in [0, {steps}], got {lead}")
    if stride < 1:
        raise ValueError(f"step stride must be >= 1, got {stride}")
    return sorted(set(range(lead)) | set(range(lead, steps, stride)) | {steps - 1})


def default_lead_steps(steps: int) -> int:
    """Leading steps measured one by one by default (the dense_steps candidates): 20% of the steps."""
    return math.ceil(DEFAULT_LEAD_FRACTION * steps)


def step_weights(measured: list[int], steps: int) -> list[int]:
    """How many denoising steps each measured step stands for (up to the next measured one); sums to `steps`."""
    ends = measured[1:] + [steps]
    return [end - s for s, end in zip(measured, ends)]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None) -> torch.Tensor:
    """Stock softmax attention (SDPA) of (B, H, N, D) tensors; keys at index >= kv_lens[b] excluded."""
    mask = None
    if kv_lens is not None:
        mask = (torch.arange(k.shape[2], device=k.device)[None, :] < kv_lens[:, None].to(k.device))[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def head_error(out: torch.Tensor, ref: torch.Tensor, ref_l1: torch.Tensor) -> torch.Tensor:
    """Per-head relative L1 of (B, H, N, D) outputs: sum|out - ref| / ref_l1, where ref is fp32 and
    ref_l1 = sum|ref| per head (the caller's, as one reference often serves several outputs)."""
    return (out.float() - ref).abs().sum(dim=(0, 2, 3)) / ref_l1.clamp(min=torch.finfo(torch.float32).tiny)


class _MeasuringController(AttentionController):
    """A controller that measures rather than serves: it runs wherever torch runs."""

    def can_run_sparse(self, device: torch.device) -> bool:
        # predict_block_mask and block_sparse_attention fall back to their torch references on a CPU
        # without the interpreter, so measuring works everywhere (it never needs kernel speed).
        return device.type in ("cuda", "cpu")


class CalibrationController(_MeasuringController):
    """Routes every call of every sparse-capable layer to `run_sparse`, returns the dense output there and,
    on measured steps, evaluates the candidate grid (see the module docstring).

    Install with `apply(pipe, uniform_profile, dense_steps=0, controller_cls=CalibrationController)`,
    then `handle.controller.configure(...)`; after each generation `drain()` hands back the statistics.
    """

    def __init__(self, profile, **kwargs) -> None:
        super().__init__(profile, **kwargs)
        self.candidates: list[Candidate] = [Candidate(0.9, 0.0)]
        self.steps_to_measure: frozenset[int] = frozenset()
        self.row_fraction = DEFAULT_ROW_FRACTION
        self._calls = 0  # rotates which query blocks a call samples; restarts with each generation
        # (layer index, step) -> [err_max, err_sum, sparsity_sum, pv_sum] (C, H) on the device, calls
        self._acc: dict[tuple[int, int], tuple[list[torch.Tensor], int]] = {}

    def configure(self, candidates: list[Candidate], steps_to_measure: list[int], row_fraction: float) -> None:
        if not candidates:
            raise ValueError("candidates must not be empty")
        if not 0.0 < row_fraction <= 1.0:
            raise ValueError(f"row_fraction must be in (0, 1], got {row_fraction}")
        self.candidates = list(candidates)
        self.steps_to_measure = frozenset(steps_to_measure)
        self.row_fraction = row_fraction

    def run_sparse(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        ref = dense_attention(q, k, v, call.kv_lens)
        if call.step in self.steps_to_measure:
            with torch.no_grad():
                self._measure(call, q, k, v, ref)
        full = torch.ones(q.shape[0], q.shape[1], math.ceil(q.shape[2] / BLOCK_M), math.ceil(q.shape[2] / BLOCK_N),
                          dtype=torch.bool, device=q.device)
        return ref, full  # the run stays dense, and the stats count it as dense

    def _sample_blocks(self, n_tokens: int, text_tokens: int) -> list[int]:
        """Video-only query blocks to measure this call: evenly strided, offset rotating between calls."""
        video_blocks = (n_tokens - text_tokens) // BLOCK_M
        want = max(MIN_ROW_BLOCKS, math.ceil(self.row_fraction * video_blocks))
        if want >= video_blocks:
            return list(range(video_blocks))
        stride = video_blocks // want
        offset = self._calls % stride
        return list(range(offset, video_blocks, stride))[:want]

    def _measure(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 ref: torch.Tensor) -> None:
        from sparsediff.attention import DEFAULT_METHOD, block_sparse_attention, head_thresholds, predict_with

        self._calls += 1
        batch, heads, n_tokens, _ = q.shape
        blocks = self._sample_blocks(n_tokens, call.text_tokens)
        if not blocks:
            return
        device = q.device
        block_idx = torch.tensor(blocks, device=device)
        rows = (block_idx[:, None] * BLOCK_M + torch.arange(BLOCK_M, device=device)).flatten()
        q_rows = q.index_select(2, rows)
        ref_rows = ref.index_select(2, rows).float()
        ref_l1 = ref_rows.abs().sum(dim=(0, 2, 3))
        n_kb = math.ceil(n_tokens / BLOCK_N)
        valid_kb = valid_key_blocks(batch, n_kb, BLOCK_N, n_tokens, call.kv_lens, device)  # (B, KB)
        pairs = math.ceil(n_tokens / BLOCK_M) * valid_kb.sum()
        # One block-mass estimate per sim value serves every cdf (and pv) candidate sharing it.
        masks: dict[tuple[float, float], torch.Tensor] = {}
        for sim in dict.fromkeys(c.sim for c in self.candidates):
            cdfs = list(dict.fromkeys(c.cdf for c in self.candidates if c.sim == sim))
            predicted = predict_with(q, k, head_thresholds(cdfs, sim, heads, device), method=call.method or DEFAULT_METHOD,
                                     scale=q.shape[-1] ** -0.5, kv_lens=call.kv_lens, dense_tail_tokens=call.text_tokens)
            masks.update(((sim, cdf), p.mask) for cdf, p in zip(cdfs, predicted))

        n_cand = len(self.candidates)
        err = torch.empty(n_cand, heads, device=device)
        sparsity = torch.empty(n_cand, heads, device=device)
        pv_skipped = torch.zeros(n_cand, heads, device=device)
        for c, cand in enumerate(self.candidates):
            mask = masks[cand.sim, cand.cdf] & valid_kb[:, None, None, :]
            sparsity[c] = 1.0 - mask.sum(dim=(0, 2, 3)) / pairs
            mask_rows = mask.index_select(2, block_idx)
            out = block_sparse_attention(q_rows, k, v, mask_rows, kv_lens=call.kv_lens, pv_threshold=cand.pv,
                                         return_pv_skips=cand.pv is not None)
            if cand.pv is not None:
                out, skips = out
                pv_skipped[c] = skips.sum(dim=(0, 2)) / mask_rows.sum(dim=(0, 2, 3)).clamp(min=1)
            err[c] = head_error(out, ref_rows, ref_l1)

        key = (call.layer_index, call.step)
        if key in self._acc:
            (e_max, e_sum, s_sum, p_sum), n = self._acc[key]
            self._acc[key] = ([torch.maximum(e_max, err), e_sum + err, s_sum + sparsity, p_sum + pv_skipped], n + 1)
        else:
            self._acc[key] = ([err, err.clone(), sparsity, pv_skipped], 1)

    def drain(self) -> dict[tuple[int, int], tuple[list[torch.Tensor], int]]:
        """The statistics gathered since the last drain, moved to the CPU as float64; then forgets them and
        restarts the rotation of sampled blocks, so that a prompt's statistics do not depend on the prompts
        measured before it in this process (a resumed calibration equals one run straight through)."""
        out = {key: ([t.double().cpu() for t in tensors], n) for key, (tensors, n) in self._acc.items()}
        self._acc.clear()
        self._calls = 0
        return out


class HeadErrorController(_MeasuringController):
    """Runs the profile sparse, as `apply()` does, and measures each call's per-head error against
    dense SDPA: relative L1 over the video query rows (the text segment, last in the attention
    order, is dense). Keeps the worst error per (layer, head) seen: how a profile holds on prompts
    it was not calibrated on. Like calibration, it computes through the public functions, whose
    torch references also serve a CPU without the interpreter (see `_MeasuringController`)."""

    def __init__(self, profile, **kwargs) -> None:
        super().__init__(profile, **kwargs)
        self.worst: dict[str, torch.Tensor] = {}  # layer -> (H,) on the device

    def run_sparse(self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        out, mask = super().run_sparse(call, q, k, v)
        video = slice(0, q.shape[2] - call.text_tokens)
        ref = dense_attention(q, k, v, call.kv_lens)[:, :, video].float()
        err = head_error(out[:, :, video], ref, ref.abs().sum(dim=(0, 2, 3)))
        previous = self.worst.get(call.layer_name)
        self.worst[call.layer_name] = err if previous is None else torch.maximum(previous, err)
        return out, mask

