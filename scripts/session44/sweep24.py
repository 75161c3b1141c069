"""`sparsediff calibrate-sweep` for the 24-caption validation: each validation render is timed once (these
sweeps measure sparsity and quality; five timed renders per caption would triple their time), and with
--tradeoff or --per-step first, an experimental selection rule instead of the per-head worst-error budget.

    python scripts/session44/sweep24.py [--tradeoff | --per-step] CALIBRATE-SWEEP ARGUMENTS

The shipped rule gives every head the same worst-error budget B. Heads differ in how much sparsity an extra
unit of error buys, so here each head takes the candidate maximising
    mean skipped work - mean error / B     (mean over the measured calls standing for the sparse steps)
among those whose worst error stays <= WORST_CAP, and a layer below --min-layer-sparsity runs dense as before.
On the forty-third session's guidance-3 statistics (6 dense steps) it reaches about 3 points more sparsity at
the same mean per-head error (0.542 at 0.070 against 0.513 at 0.072); whether PSNR follows is what this measures.
B comes from --budgets; the profiles --tradeoff writes are experiments.

--per-step (forty-fifth session): the same budget rule, but a threshold per head AND per measured step: each
measured step at or after the dense steps (standing for the steps up to the next measured one) takes, per head,
the candidate skipping the most whose worst error at that step is <= B, and a layer below --min-layer-sparsity
at that step runs its heads at cdf 1.0 there (every block kept). A profile holds one threshold per head, so the
validation renders read the per-step table from PHASES through a patched AttentionController._layer_thresholds;
the profile written is the usual selection, with a layer dense only where it is dense at every step. Every
call's error stays within B as before, at more sparsity (scripts/session45/per_step_selection.py); whether
PSNR follows is what this measures.
"""

import math
import sys

import torch

from sparsediff.attention import head_thresholds
from sparsediff.calibration import driver, select
from sparsediff.calibration.measure import step_weights
from sparsediff.cli import main
from sparsediff.processors.controller import AttentionController

WORST_CAP = 0.4


def select_for_tradeoff(stats, budget, sparse_weights, called, work, min_layer_sparsity):
    choice, idx, dense_layers, measured = [], [], [], []
    calls = stats.calls.clamp(min=1).double()[:, :, None, None]
    for i, heads in enumerate(stats.heads):
        ok = (sparse_weights > 0) & called[i]
        w = sparse_weights[ok][:, None, None]
        worst = stats.err_max[i, ok, :, :heads].amax(dim=0)  # (C, H)
        mean_work = (work[i, ok, :, :heads] * w).sum(0) / w.sum()
        mean_error = ((stats.err_sum / calls)[i, ok, :, :heads] * w).sum(0) / w.sum()
        score = torch.where(worst <= WORST_CAP, mean_work - mean_error / budget, torch.full_like(mean_work, -math.inf))
        best_val, best_c = score.max(dim=0)  # the dense head scores 0
        layer_idx = [int(c) if math.isfinite(v) and v > 0 else -1 for c, v in zip(best_c.tolist(), best_val.tolist())]
        layer_work = sum(float(mean_work[c, h]) for h, c in enumerate(layer_idx) if c >= 0) / heads
        idx.append(layer_idx)
        choice.append([stats.candidates[c] if c >= 0 else select.DENSE_HEAD for c in layer_idx])
        dense_layers.append(layer_work < min_layer_sparsity)
        measured.append(True)
    return choice, idx, dense_layers, measured


PHASES: list[tuple[int, list[list[select.Candidate]]]] = []  # (first step, per layer per head) of the last selection
LAYERS: list[str] = []  # the statistics' layer names, in PHASES' order
select_whole_run = driver.select_for


def sparse_step_weights(stats, steps: int, dense_steps: int) -> torch.Tensor:
    """Per measured step, how many of the `steps` steps after the dense ones it stands for (0: none)."""
    weights = torch.tensor(step_weights(stats.steps, steps), dtype=torch.float64)
    return select._sparse_weights(torch.tensor(stats.steps), weights, dense_steps)


def select_for_per_step(plan, stats):
    """The usual selection (dense steps, report), and in PHASES each measured sparse step's own choice."""
    sel = select_whole_run(plan, stats)
    sparse = sparse_step_weights(stats, plan.steps, sel.dense_steps)
    called = stats.calls > 0
    calls = stats.calls.clamp(min=1).double()[:, :, None, None]
    work = (stats.sparsity_sum + select.PV_SKIP_WEIGHT * stats.pv_sum) / calls
    PHASES.clear()
    LAYERS[:] = stats.layers
    dense_everywhere = [True] * len(stats.layers)
    for j, step in enumerate(stats.steps):
        if sparse[j] > 0:
            only_j = torch.where(torch.arange(len(sparse)) == j, sparse, torch.zeros_like(sparse))
            choice, _, dense_layers, _ = select._select_for(stats, plan.budget, only_j, called, work,
                                                            plan.min_layer_sparsity)
            PHASES.append((max(step, sel.dense_steps),
                           [[select.DENSE_HEAD] * len(c) if dense else c for c, dense in zip(choice, dense_layers)]))
            dense_everywhere = [a and b for a, b in zip(dense_everywhere, dense_layers)]
    sel.dense_layers = dense_everywhere
    print("per-step phases from steps", [first for first, _ in PHASES])
    return sel


def layer_thresholds_per_step(self, layer_name, device):
    # The last phase begun at this step; validation's warm-up runs step 0 sparse: the first phase.
    first, choice = max((p for p in PHASES if p[0] <= self.step), key=lambda p: p[0], default=PHASES[0])
    key = (layer_name, device, first)
    if key not in self._thresholds:
        heads = choice[LAYERS.index(layer_name)]
        self._thresholds[key] = (head_thresholds([torch.tensor([c.cdf for c in heads])],
                                                 torch.tensor([c.sim for c in heads]), len(heads), device), None)
    return self._thresholds[key]


if __name__ == "__main__":
    driver.VALIDATE_MAX_RENDERS = 1
    argv = sys.argv[1:]
    if argv[:1] == ["--tradeoff"]:
        select._select_for = select_for_tradeoff
        argv = argv[1:]
    elif argv[:1] == ["--per-step"]:
        driver.select_for = select_for_per_step
        AttentionController._layer_thresholds = layer_thresholds_per_step
        argv = argv[1:]
    sys.exit(main(["calibrate-sweep", *argv]))
