"""What per-step thresholds would add to the toy profile's sparsity, from calibration statistics alone (CPU).

    python scripts/session45/per_step_selection.py STATE.calib-state.json [--dense-steps 8] [--budgets 0.15,0.2]

The profile holds one threshold per head for every sparse step: the candidate skipping the most whose worst
error over the measured calls standing for steps >= d stays within the budget (calibration/select.py). With a
threshold per head AND per measured step instead (scripts/session44/sweep24.py's --per-step rule), each
measured step, standing for the steps up to the next one, takes its own. Printed: the mean mask sparsity over
the sparse steps (weighted as they stand) of both, over every head, a dense layer's heads at 0. Every call
stays within the same per-call budget in both, so this is the sparsity the profile format forgoes, not a
quality claim (scripts/session45/per_step_cpu.py renders it).
"""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session44"))
import sweep24  # noqa: E402

from sparsediff.calibration import select  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("state")
parser.add_argument("--dense-steps", type=int, default=8)
parser.add_argument("--budgets", default="0.15,0.2,0.225,0.25")
parser.add_argument("--total-steps", type=int, default=16)
args = parser.parse_args()

stats = select.CalibrationStats.from_dict(json.load(open(args.state))["stats"])
sparsity = stats.sparsity_sum / stats.calls.clamp(min=1).double()[:, :, None, None]
sparse = sweep24.sparse_step_weights(stats, args.total_steps, args.dense_steps)
slot = {first: j for j, first in ((j, max(s, args.dense_steps)) for j, s in enumerate(stats.steps)) if sparse[j] > 0}


def head_sparsity(i: int, j: int, h: int, candidate: select.Candidate) -> float:
    return 0.0 if candidate == select.DENSE_HEAD else float(sparsity[i, j, stats.candidates.index(candidate), h])


for budget in (float(b) for b in args.budgets.split(",")):
    plan = SimpleNamespace(budget=budget, steps=args.total_steps, lead_steps=0, dense_steps=args.dense_steps,
                           min_layer_sparsity=select.DEFAULT_MIN_LAYER_SPARSITY)
    whole_run = sweep24.select_whole_run(plan, stats)
    sweep24.select_for_per_step(plan, stats)  # fills sweep24.PHASES
    n_heads = sum(stats.heads)
    one_threshold = sum(whole_run.layer_sparsity(i) * heads for i, heads in enumerate(stats.heads)) / n_heads
    per_step = sum(float(sparse[slot[first]]) * head_sparsity(i, slot[first], h, c)
                   for first, choice in sweep24.PHASES for i, layer in enumerate(choice) for h, c in enumerate(layer))
    per_step /= float(sparse.sum()) * n_heads
    print(f"dense steps {args.dense_steps}, budget {budget}: one threshold per head {one_threshold:.1%}, "
          f"one per head and measured step {per_step:.1%}")
