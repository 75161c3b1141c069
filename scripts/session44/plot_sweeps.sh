#!/usr/bin/env bash
# The README's sparsity-quality plot, every curve validated on the 24 captions of captions24.txt (forty-fourth
# session; the forty-sixth added 9 dense steps, the per-step rule and the 36-caption calibration, and moved the
# plot to its folder: the forty-fourth's, without them, stays as it was). The shipped weights at guidance 3 after
# 6, 8, 9 and 10 dense steps (the forty-third session's statistics), sweep24.py's trade-off rule at 6 and per-step
# rule at 8, statistics from 36 calibration captions instead of 12 at 8 and 9, and guidance 2.5 at 8.
a=bench-results/h100-2026-12-07-session44 b=bench-results/h100-2026-12-07-session46
python scripts/plot_sweeps.py "$b/toy-sweeps-24.png" \
  "guidance 3, 6 dense=$a/guidance3/g3-dense6/sweep.json" \
  "guidance 3, 8 dense=$a/guidance3/g3-dense8/sweep.json" \
  "guidance 3, 9 dense (shipped: budget 0.225)=$b/g3-dense9/sweep.json" \
  "guidance 3, 10 dense=$a/guidance3/g3-dense10/sweep.json" \
  "guidance 3, 6 dense, trade-off rule=$a/guidance3/g3-tradeoff-dense6/sweep.json" \
  "guidance 3, 8 dense, per-step thresholds=$b/ps-dense8/sweep.json" \
  "guidance 3, 8 dense, 36 calibration captions=$b/c36-dense8/sweep.json" \
  "guidance 3, 9 dense, 36 calibration captions=$b/c36-dense9/sweep.json" \
  "guidance 2.5, 8 dense=$a/guidance2.5/g2.5-dense8/sweep.json" \
  --title "toy-shapes, sampled8, 24 validation captions, H100, 2026-12-07"
