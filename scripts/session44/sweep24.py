"""`sparsediff calibrate-sweep` for the 24-caption validation: each validation render is timed once (these
sweeps measure sparsity and quality; five timed renders per caption would triple their time), and with
--tradeoff first, an experimental selection rule instead of the per-head worst-error budget.

    python scripts/session44/sweep24.py [--tradeoff] CALIBRATE-SWEEP ARGUMENTS

The shipped rule gives every head the same worst-error budget B. Heads differ in how much sparsity an extra
unit of error buys, so here each head takes the candidate maximising
    mean skipped work - mean error / B     (mean over the measured calls standing for the sparse steps)
among those whose worst error stays <= WORST_CAP, and a layer below --min-layer-sparsity runs dense as before.
On the forty-third session's guidance-3 statistics (6 dense steps) it reaches about 3 points more sparsity at
the same mean per-head error (0.542 at 0.070 against 0.513 at 0.072); whether PSNR follows is what this measures.
B comes from --budgets; the profiles --tradeoff writes are experiments.
"""

import math
import sys

import torch

from sparsediff.calibration import driver, select
from sparsediff.cli import main

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


if __name__ == "__main__":
    driver.VALIDATE_MAX_RENDERS = 1
    argv = sys.argv[1:]
    if argv[:1] == ["--tradeoff"]:
        select._select_for = select_for_tradeoff
        argv = argv[1:]
    sys.exit(main(["calibrate-sweep", *argv]))
