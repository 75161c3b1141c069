"""What per-step thresholds would add to the toy profile's sparsity, from calibration statistics alone (CPU).

    python scripts/session45/per_step_selection.py STATE.calib-state.json [--dense-steps 8] [--budgets 0.15,0.2,0.25]

The profile holds one threshold per head for every sparse step: the candidate skipping the most whose worst
error over the measured calls standing for steps >= d stays within the budget (calibration/select.py). With a
threshold per head AND per measured step instead, each measured step (standing for the steps up to the next
one) takes its own best feasible candidate. Printed: the mean mask sparsity over the sparse steps (weighted as
they stand) of both, all layers and heads, the dense layers select.py keeps included at 0. Every call stays
within the same per-call budget in both, so this is the sparsity the profile format forgoes, not a quality claim.
"""

import argparse
import json

import torch

from sparsediff.calibration import select
from sparsediff.calibration.measure import step_weights

parser = argparse.ArgumentParser()
parser.add_argument("state")
parser.add_argument("--dense-steps", type=int, default=8)
parser.add_argument("--budgets", default="0.15,0.2,0.225,0.25")
parser.add_argument("--total-steps", type=int, default=16)
args = parser.parse_args()

stats = select.CalibrationStats.from_dict(json.load(open(args.state))["stats"])
called = stats.calls > 0
calls = stats.calls.clamp(min=1).double()[:, :, None, None]
work = stats.sparsity_sum / calls  # no pv grid in these statistics: skipped work is the mask sparsity
weights = torch.tensor(step_weights(stats.steps, args.total_steps), dtype=torch.float64)
sparse = select._sparse_weights(torch.tensor(stats.steps), weights, args.dense_steps)


def mean_sparsity(step_weights_: torch.Tensor) -> float:
    """Mean over every head of the chosen candidates' sparsity over the steps `step_weights_` covers."""
    _, idx, dense_layers, _ = select._select_for(stats, budget, step_weights_, called, work,
                                                 select.DEFAULT_MIN_LAYER_SPARSITY)
    total = 0.0
    for i, heads in enumerate(stats.heads):
        ok = (step_weights_ > 0) & called[i]
        w = step_weights_[ok]
        for h, c in enumerate(idx[i]):
            if c >= 0 and not dense_layers[i]:
                total += float((work[i, ok, c, h] * w).sum() / w.sum())
    return total / sum(stats.heads)


for budget in (float(b) for b in args.budgets.split(",")):
    one_threshold = mean_sparsity(sparse)
    per_step = sum(float(sparse[j]) * mean_sparsity(torch.where(torch.arange(len(sparse)) == j, sparse, 0.0))
                   for j in range(len(sparse)) if sparse[j] > 0) / float(sparse.sum())
    print(f"dense steps {args.dense_steps}, budget {budget}: one threshold per head {one_threshold:.1%}, "
          f"one per head and measured step {per_step:.1%}")
