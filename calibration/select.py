"""Calibration statistics over a whole run, and the choice of per-head thresholds, dense layers and
dense steps from them.

Selection rule (budget B on the per-head relative L1 error of the attention output):
1. For a number of dense steps d: per head, among the candidates whose WORST error over every
   measured call at steps >= d (all prompts, CFG branches) is <= B, take the one skipping the most
   work (step-weighted mean of: mask sparsity + PV_SKIP_WEIGHT x pv-skipped share). No feasible
   candidate, or none that skips anything: the head keeps every block (cdf 1.0). Worst case rather than a quantile: the samples
   are few (prompts x measured steps x branches), where a high quantile is nearly the maximum
   anyway, and "every measured call stayed within budget" is a promise a user can check.
2. A layer whose mean chosen work (as in 1; the sparsity alone without a pv grid) is under
   `min_layer_sparsity` runs dense: the Triton kernel
   computes a kept block at 0.63-0.75x cuDNN's speed (DESIGN.md), so below ~30% skipped a sparse
   call is not faster than the dense one.
3. d: the measured leading steps are sensitive (the global layout forms there); running them
   sparse forces denser thresholds everywhere. Every d in [0, min(lead, steps - 1)] is tried and the one with the
   lowest estimated attention cost wins (ties: fewer dense steps): cost(d) = d dense steps +
   sum over steps >= d of (dense layers: 1; sparse: keep / KERNEL_SPEED), per layer. The steps
   below the chosen d are then exactly the leading steps whose error at the chosen thresholds
   exceeds the budget or costs more than it saves; the report lists each step's error.
   `--dense-steps` fixes d instead. A measured step stands for the steps up to the next measured one:
   "steps >= d" are the measured steps standing for any step >= d (a d between two measured steps,
   as `--dense-steps` may give, takes the one below it too, for the sparse steps it stands for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sparsediff.calibration.measure import Candidate

# A pv-skipped block still computes Q·K^T but skips exp, the V load and P·V: about half the block's work.
PV_SKIP_WEIGHT = 0.5
# Speed of the sparse kernel per computed block relative to cuDNN dense (DESIGN.md: 0.63-0.75 at D=128).
KERNEL_SPEED = 0.7
DEFAULT_MIN_LAYER_SPARSITY = 0.3  # 1 - KERNEL_SPEED: where a sparse call starts to pay
DENSE_HEAD = Candidate(cdf=1.0, sim=0.0, pv=None)  # keeps every block: error 0, sparsity 0


class CalibrationStats:
    """Per (layer, measured step, candidate, head): worst error, error sum, sparsity sum, pv-skip sum,
    and per (layer, step) the number of calls; float64 on the CPU, NaN/0 where nothing was measured."""

    FIELDS = ("err_max", "err_sum", "sparsity_sum", "pv_sum")

    def __init__(self, layers: list[str], heads: list[int], candidates: list[Candidate], steps: list[int]) -> None:
        self.layers, self.heads, self.candidates, self.steps = list(layers), list(heads), list(candidates), list(steps)
        shape = (len(layers), len(steps), len(candidates), max(heads))
        self.err_max = torch.full(shape, math.nan, dtype=torch.float64)
        self.err_sum = torch.zeros(shape, dtype=torch.float64)
        self.sparsity_sum = torch.zeros(shape, dtype=torch.float64)
        self.pv_sum = torch.zeros(shape, dtype=torch.float64)
        self.calls = torch.zeros(shape[:2], dtype=torch.long)
        self._slot = {s: i for i, s in enumerate(steps)}

    def add(self, drained: dict[tuple[int, int], tuple[list[torch.Tensor], int]]) -> None:
        """Merge what `CalibrationController.drain()` returned."""
        for (layer, step), ((e_max, e_sum, s_sum, p_sum), n) in drained.items():
            i, j, h = layer, self._slot[step], e_max.shape[1]
            self.err_max[i, j, :, :h] = torch.fmax(self.err_max[i, j, :, :h], e_max)
            self.err_sum[i, j, :, :h] += e_sum
            self.sparsity_sum[i, j, :, :h] += s_sum
            self.pv_sum[i, j, :, :h] += p_sum
            self.calls[i, j] += n

    # ------------------------------------------------------------------ JSON (the resume state)

    def to_dict(self) -> dict[str, Any]:
        def rows(t: torch.Tensor) -> list:
            return [[None if math.isnan(x) else x for x in row] for row in t.reshape(-1, t.shape[-1]).tolist()]

        return {"layers": self.layers, "heads": self.heads, "candidates": [c.as_dict() for c in self.candidates],
                "steps": self.steps, "calls": self.calls.tolist(),
                **{name: rows(getattr(self, name)) for name in self.FIELDS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationStats:
        stats = cls(data["layers"], data["heads"], [Candidate(**c) for c in data["candidates"]], data["steps"])
        stats.calls = torch.tensor(data["calls"], dtype=torch.long).reshape(stats.calls.shape)
        for name in cls.FIELDS:
            values = [[math.nan if x is None else x for x in row] for row in data[name]]
            setattr(stats, name, torch.tensor(values, dtype=torch.float64).reshape(getattr(stats, name).shape))
        return stats


@dataclass
class Selection:
    """The chosen thresholds and everything the report shows about them."""

    dense_steps: int
    dense_steps_source: str  # "measured" | "argument"
    choice: list[list[Candidate]]  # per layer, per head
    dense_layers: list[bool]
    measured: list[bool]  # per layer: was it measured at all (else it is dense)
    head_error: list[list[float]]  # worst error over calls standing for steps >= dense_steps (0 for dense heads)
    head_sparsity: list[list[float]]  # mean mask sparsity over the steps >= dense_steps, weighted as they stand
    step_error: list[float | None]  # per measured step: worst error over sparse layers/heads at the choice
    step_sparsity: list[float | None]  # per measured step: mean sparsity over all layers at the choice
    cost_by_dense_steps: dict[int, float]  # estimated attention cost (dense step = 1 per layer)

    def layer_sparsity(self, i: int) -> float:
        return 0.0 if self.dense_layers[i] else sum(self.head_sparsity[i]) / len(self.head_sparsity[i])


def select(stats: CalibrationStats, budget: float, *, total_steps: int, lead_steps: int,
           dense_steps: int | None = None, min_layer_sparsity: float = DEFAULT_MIN_LAYER_SPARSITY) -> Selection:
    """Choose per-head thresholds, dense layers and dense steps (see the module docstring)."""
    from sparsediff.calibration.measure import step_weights

    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget must be in (0, 1), got {budget}")
    weights = torch.tensor(step_weights(stats.steps, total_steps), dtype=torch.float64)
    step_idx = torch.tensor(stats.steps)
    called = stats.calls > 0  # (L, S)
    calls = stats.calls.clamp(min=1).double()[:, :, None, None]
    work = (stats.sparsity_sum + PV_SKIP_WEIGHT * stats.pv_sum) / calls  # (L, S, C, H) mean skipped work
    sparsity = stats.sparsity_sum / calls

    options = [dense_steps] if dense_steps is not None else list(range(0, min(lead_steps, total_steps - 1) + 1))
    costs: dict[int, float] = {}
    best = None
    for d in options:
        sparse_weights = _sparse_weights(step_idx, weights, d)
        sel = _select_for(stats, budget, sparse_weights, called, work, min_layer_sparsity)
        costs[d] = _cost(sel, d, sparse_weights, called, work)
        if best is None or costs[d] < best[0] - 1e-9:
            best = (costs[d], d, sel, sparse_weights)
    _, d, (choice, idx, dense_layers, measured), sparse_weights = best

    n_layers = len(stats.layers)
    head_error, head_sparsity = [], []
    after = sparse_weights > 0
    for i in range(n_layers):
        errs, sps = [], []
        for h in range(stats.heads[i]):
            c = idx[i][h]
            ok = after & called[i]
            if c < 0 or not ok.any():
                errs.append(0.0)
                sps.append(0.0)
                continue
            errs.append(float(stats.err_max[i, ok, c, h].max()))
            w = sparse_weights[ok]
            sps.append(float((sparsity[i, ok, c, h] * w).sum() / w.sum()))
        head_error.append(errs)
        head_sparsity.append(sps)

    step_error, step_sparsity = [], []
    for j in range(len(stats.steps)):
        errs, sps = [], []
        for i in range(n_layers):
            if not called[i, j]:
                continue
            for h in range(stats.heads[i]):
                c = idx[i][h]
                sparse_head = not dense_layers[i] and c >= 0
                if sparse_head:
                    errs.append(float(stats.err_max[i, j, c, h]))
                sps.append(float(sparsity[i, j, c, h]) if sparse_head else 0.0)
        step_error.append(max(errs) if errs else None)
        step_sparsity.append(sum(sps) / len(sps) if sps else None)

    return Selection(
        dense_steps=d, dense_steps_source="measured" if dense_steps is None else "argument",
        choice=choice, dense_layers=dense_layers, measured=measured, head_error=head_error,
        head_sparsity=head_sparsity, step_error=step_error, step_sparsity=step_sparsity,
        cost_by_dense_steps=costs,
    )


def _sparse_weights(step_idx: torch.Tensor, weights: torch.Tensor, d: int) -> torch.Tensor:
    """How many sparse steps (those >= d) each measured step stands for: its span [step, step + weight)
    from d on."""
    return (step_idx.double() + weights - step_idx.clamp(min=d).double()).clamp(min=0.0)


def _select_for(stats: CalibrationStats, budget: float, sparse_weights: torch.Tensor, called: torch.Tensor,
                work: torch.Tensor, min_layer_sparsity: float):
    """Per-head choice for the dense steps that leave `sparse_weights` (`_sparse_weights`): (candidates,
    candidate indices (-1: dense head), dense layers, measured)."""
    choice, idx, dense_layers, measured = [], [], [], []
    for i, heads in enumerate(stats.heads):
        ok = (sparse_weights > 0) & called[i]
        if not ok.any():
            choice.append([DENSE_HEAD] * heads)
            idx.append([-1] * heads)
            dense_layers.append(True)
            measured.append(bool(called[i].any()))
            continue
        worst = stats.err_max[i, ok, :, :heads].amax(dim=0)  # (C, H)
        w = sparse_weights[ok][:, None, None]
        mean_work = (work[i, ok, :, :heads] * w).sum(0) / w.sum()  # (C, H)
        score = torch.where(worst <= budget, mean_work, torch.full_like(mean_work, -math.inf))
        best_val, best_c = score.max(dim=0)
        # No feasible candidate, or the best feasible one skips nothing: the head keeps every block.
        layer_idx = [int(c) if math.isfinite(v) and v > 0 else -1 for c, v in zip(best_c.tolist(), best_val.tolist())]
        layer_work = sum(max(float(best_val[h]), 0.0) if layer_idx[h] >= 0 else 0.0 for h in range(heads)) / heads
        dense = layer_work < min_layer_sparsity
        idx.append(layer_idx)
        choice.append([stats.candidates[c] if c >= 0 else DENSE_HEAD for c in layer_idx])
        dense_layers.append(dense)
        measured.append(True)
    return choice, idx, dense_layers, measured


def _cost(sel, d: int, sparse_weights: torch.Tensor, called: torch.Tensor, work: torch.Tensor) -> float:
    """Estimated attention time of a generation in dense-layer-step units (see the module docstring)."""
    _, idx, dense_layers, _ = sel
    total = 0.0
    for i, heads in enumerate(len(x) for x in idx):
        total += d
        for j, w in enumerate(sparse_weights.tolist()):
            if w == 0:
                continue
            if dense_layers[i] or not called[i, j]:
                total += w
                continue
            keep = sum(1.0 - (float(work[i, j, c, h]) if c >= 0 else 0.0) for h, c in enumerate(idx[i])) / heads
            total += w * keep / KERNEL_SPEED
    return total
