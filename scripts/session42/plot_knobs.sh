#!/usr/bin/env bash
# Forty-second session, on this machine: the README's sparsity-quality plot from the knobs' sweeps
# (toy_calibration_knobs.sh) and the thirty-ninth session's default-grid sweeps of the shipped weights.
b=bench-results/h100-2026-12-06-session42/toy-calibration-knobs
d=bench-results/h100-2026-12-06-session39/toy-resweep
python scripts/plot_sweeps.py "$b/toy-sweeps.png" \
  "sampled8, 6 dense (shipped profile's settings)=$d/sweep-dense6/sweep.json" \
  "sampled8, 10 dense, default grid=$d/sweep-dense10/sweep.json" \
  "sampled8, 6 dense, fine cdf grid=$b/fine/sweep-dense6/sweep.json" \
  "sampled8, 6 dense, fine grid, every layer sparse=$b/fine-all-layers/sweep-dense6/sweep.json" \
  "sampled8, 6 dense, fine grid, every layer, every step measured=$b/stride1/sweep-dense6/sweep.json" \
  "sampled8, 8 dense, fine grid, every layer=$b/dense8/sweep-dense8/sweep.json,$b/dense8-017/sweep-dense8/sweep.json" \
  "sampled8, 10 dense, fine grid, every layer=$b/dense10/sweep-dense10/sweep.json" \
  --title "toy-shapes (shipped weights), held-out captions, H100, 2026-12-06: calibration knobs (forty-second session) against the default grid"
