#!/usr/bin/env bash
# Forty-third session, on this machine: the README's sparsity-quality plot. The shipped weights at the
# old default guidance 4 (thirty-ninth session's sweeps) and at the new default 3 (this session's), and
# the weights trained 8.6 minutes more (guidance 4; not shipped).
b=bench-results/h100-2026-12-06-session43
d=bench-results/h100-2026-12-06-session39/toy-resweep
python scripts/plot_sweeps.py "$b/toy-sweeps.png" \
  "shipped weights, guidance 3 (the default now), 6 dense=$b/toy-guidance3/sweep-dense6/sweep.json" \
  "shipped weights, guidance 3, 10 dense=$b/toy-guidance3/sweep-dense10/sweep.json" \
  "shipped weights, guidance 4, 6 dense=$d/sweep-dense6/sweep.json" \
  "shipped weights, guidance 4, 10 dense=$d/sweep-dense10/sweep.json" \
  "trained 8.6 min more, guidance 4, 6 dense=$b/toy-continued/sweep-dense6/sweep.json" \
  "trained 8.6 min more, guidance 4, 10 dense=$b/toy-continued/sweep-dense10/sweep.json" \
  --title "toy-shapes, sampled8, held-out captions, H100, 2026-12-06: guidance 3 against 4, and more training"
