#!/usr/bin/env bash
# Forty-third session, on the lent GPU (carry .whl): score and calibrate the weights in place at
# pipelines/toy_shapes/weights (in the device's copy of the tree: the continued training's weights were
# copied there for its call, the shipped weights' scores at these seeds being the forty-first session's;
# the guidance-3 call ran on the shipped weights with EVAL=0). Seeds 0-2 at 16
# steps, then the shipped profile's calibration (sampled8, fresh statistics) at 6 dense steps and, on
# the same statistics, 10. $OUT gets evals.tgz, sweep6.log, results6.tgz, sweep10.log, results.tgz.
# EVAL=0 skips the scoring (scripts/session39/ten_minute_weights.sh runs it so, after its own scoring); SWEEP_FLAGS (e.g. "--guidance-scale 3"), BUDGETS6 and BUDGETS10 reach the sweeps.
# Scoring and sweeps take the pipeline's default guidance: 4 when the continued weights' call ran, 3 since
# (to repeat that call: SWEEP_FLAGS="--guidance-scale 4", and --guidance 4 in the evaluation below).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/pipelines PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
s=$(date +%s)
[ "${EVAL:-1}" = 1 ] && for seed in 0 1 2; do
  timeout 45 python3 -m toy_shapes.eval --weights pipelines/toy_shapes/weights --out "$OUT/eval-seed$seed.json" --steps 16 \
      --seed $seed --time-repeats 0 2>&1 | grep "pass rates" | sed "s/^/seed $seed /"
done
[ "${EVAL:-1}" = 1 ] && (cd "$OUT" && tar czf evals.tgz eval-seed*.json && rm eval-seed*.json); echo "eval $(( $(date +%s) - s )) s"
SWEEP_DENSE_STEPS=6 SWEEP_BUDGETS=${BUDGETS6:-0.1,0.15,0.2,0.25,0.3} SWEEP_METHOD=sampled8 timeout 200 bash scripts/gpu_session.sh sweep \
    > "$OUT/sweep6.log" 2>&1; echo "sweep6 exit $? $(( $(date +%s) - s )) s"
rm -rf /tmp/first; cp -r /tmp/gpu-results /tmp/first; mkdir -p /tmp/first/sweep-dense10
cp /tmp/first/sweep-dense6/calibration.calib-state.json /tmp/first/sweep-dense10/
cp "$OUT/results.tgz" "$OUT/results6.tgz"
SWEEP_STATE_FROM=/tmp/first SWEEP_DENSE_STEPS=10 SWEEP_BUDGETS=${BUDGETS10:-0.15,0.2,0.25,0.3} SWEEP_METHOD=sampled8 timeout 90 \
    bash scripts/gpu_session.sh sweep > "$OUT/sweep10.log" 2>&1; echo "sweep10 exit $? $(( $(date +%s) - s )) s"
grep -h -E "sparsity|PSNR|psnr" "$OUT"/sweep6.log "$OUT"/sweep10.log | tail -30
