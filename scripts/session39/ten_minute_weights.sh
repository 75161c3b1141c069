#!/usr/bin/env bash
# Thirty-ninth session, on the lent GPU (carry .whl): score the ten-minute weights against the shipped ones
# (seeds 0-2, 16 steps), then put them in place of the shipped ones (in the device's copy of the tree) and
# calibrate them (sampled8, 6 and 10 dense steps) as the shipped profile was. $OUT gets the evaluations,
# results6.tgz (the 6-dense sweep) and results.tgz (the 10-dense one). WEIGHTS names the folder to score:
# this session scored bench-results/h100-2026-12-06-session39/toy-10min-start48/weights, whose two .safetensors
# files left the tree in the forty-first session (`git checkout 09e5d06 -- <that folder>` restores them); that
# session scored its own run with WEIGHTS=bench-results/h100-2026-12-06-session41/toy-10min-nosync/weights, whose
# .safetensors files left the tree in the forty-third (`git checkout 3945b91 -- <that folder>` restores them).
new=${WEIGHTS:?set WEIGHTS to the weights folder to score}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/pipelines PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
s=$(date +%s)
for w in shipped ten-minute; do for seed in 0 1 2; do d=pipelines/toy_shapes/weights; [ $w = ten-minute ] && d=$new
timeout 45 python3 -m toy_shapes.eval --weights $d --out "$OUT/eval-$w-seed$seed.json" --steps 16 --seed $seed --time-repeats 0 2>&1 | grep "pass rates" | sed "s/^/$w $seed /"; done; done; echo "eval $(( $(date +%s) - s )) s"
for m in transformer text_encoder; do cp "$new/$m/diffusion_pytorch_model.safetensors" pipelines/toy_shapes/weights/$m/; done
# The calibration as the shipped profile's, 6 then 10 dense steps on the same statistics: the sweeps that
# scripts/session43/continued_weights.sh runs (the same budgets, time limits and $OUT files).
EVAL=0 bash scripts/session43/continued_weights.sh
