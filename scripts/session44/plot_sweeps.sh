#!/usr/bin/env bash
# Forty-fourth session, on this machine: the README's sparsity-quality plot, every curve validated on the
# 24 captions of captions24.txt. The shipped weights at guidance 3 after 6, 8 and 10 dense steps (the
# forty-third session's statistics), sweep24.py's trade-off rule at 6, and guidance 2.5 (fresh statistics).
b=bench-results/h100-2026-12-07-session44
python scripts/plot_sweeps.py "$b/toy-sweeps-24.png" \
  "guidance 3, 6 dense=$b/guidance3/g3-dense6/sweep.json" \
  "guidance 3, 8 dense (shipped: budget 0.2)=$b/guidance3/g3-dense8/sweep.json" \
  "guidance 3, 10 dense=$b/guidance3/g3-dense10/sweep.json" \
  "guidance 3, 6 dense, trade-off rule=$b/guidance3/g3-tradeoff-dense6/sweep.json" \
  "guidance 2.5, 6 dense=$b/guidance2.5/g2.5-dense6/sweep.json" \
  "guidance 2.5, 8 dense=$b/guidance2.5/g2.5-dense8/sweep.json" \
  --title "toy-shapes, sampled8, 24 validation captions, H100, 2026-12-07"
