#!/usr/bin/env bash
# The README's sparsity-quality plot since the forty-eighth session: the Muon weights (shipped since then) after 9,
# 10, 11 and 12 dense steps of 16, every curve from one set of calibration statistics and validated on the 24
# captions of scripts/session44/captions24.txt (scripts/session44/validate24.sh PART=6 and PART=7, H100), beside the
# weights shipped before them at 9 dense steps (the forty-sixth session's curve).
a=bench-results/h100-2026-12-07-session48 b=bench-results/h100-2026-12-07-session46
d10=$a/muon-part7-captions24/w-dense10/sweep.json,$a/muon-validate24/w-dense10/sweep.json
python scripts/plot_sweeps.py "$a/toy-sweeps-24.png" \
  "Muon weights, 9 dense=$a/muon-validate24/w-dense9/sweep.json" \
  "Muon weights, 10 dense (shipped: budget 0.15)=$d10" \
  "Muon weights, 11 dense=$a/muon-part7-captions24/w-dense11/sweep.json" \
  "Muon weights, 12 dense=$a/muon-part7-captions24/w-dense12/sweep.json" \
  "weights before (three runs), 9 dense=$b/g3-dense9/sweep.json" \
  --title "toy-shapes, sampled8, guidance 3, 24 validation captions, H100, 2026-12-07"
