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
SWEEP_DENSE_STEPS=6 SWEEP_BUDGETS=0.1,0.15,0.2,0.25,0.3 SWEEP_METHOD=sampled8 timeout 200 bash scripts/gpu_session.sh sweep > "$OUT/sweep6.log" 2>&1; echo "sweep6 exit $? $(( $(date +%s) - s )) s"
rm -rf /tmp/first; cp -r /tmp/gpu-results /tmp/first; mkdir -p /tmp/first/sweep-dense10; cp /tmp/first/sweep-dense6/calibration.calib-state.json /tmp/first/sweep-dense10/
cp "$OUT/results.tgz" "$OUT/results6.tgz"
SWEEP_STATE_FROM=/tmp/first SWEEP_DENSE_STEPS="10" SWEEP_BUDGETS=0.15,0.2,0.25,0.3 SWEEP_METHOD=sampled8 timeout 90 bash scripts/gpu_session.sh sweep > "$OUT/sweep10.log" 2>&1; echo "sweep10 exit $? $(( $(date +%s) - s )) s"
