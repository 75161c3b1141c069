#!/usr/bin/env bash
# Forty-second session, on the lent GPU (carry .whl): the shipped toy weights calibrated (sampled8) with the
# knobs no earlier sweep varied: a finer cdf grid, --min-layer-sparsity 0 (no layer forced dense), every
# step measured (--step-stride 1), and 8 dense steps with both; the second call: 10 dense steps, and budget 0.17
# at 8. `toy_calibration_knobs.sh [VARIANT...]` runs the named variants (default: the first call's five).
# $OUT/knobs.tgz holds one folder per variant (gpu_session.sh's results folder: sweep-denseN/ with the
# profiles, reports and sweep.json).
set -u
start=$(date +%s)
mkdir -p /tmp/knobs
variant() {  # NAME DENSE_STEPS BUDGETS [calibrate-sweep flags...]; STATE_FROM=<variant> reuses its statistics
  local name=$1 dense=$2 budgets=$3
  shift 3
  rm -rf /tmp/gpu-results  # a call that stops before emptying it must not pass the last variant's results off as its own
  SWEEP_STATE_FROM=${STATE_FROM:+/tmp/knobs/$STATE_FROM} SWEEP_DENSE_STEPS=$dense SWEEP_BUDGETS=$budgets \
    SWEEP_METHOD=sampled8 SWEEP_FLAGS="$*" timeout 170 bash scripts/gpu_session.sh sweep > "/tmp/knobs-$name.log" 2>&1
  echo "$name exit $? $(( $(date +%s) - start )) s"
  rm -rf "/tmp/knobs/$name"
  cp -r /tmp/gpu-results "/tmp/knobs/$name"
  mv "/tmp/knobs-$name.log" "/tmp/knobs/$name/call.log"
  tar -C /tmp/knobs -czf "$OUT/knobs.tgz" .
}
fine=--cdf-grid=0.5,0.6,0.7,0.75,0.8,0.85,0.88,0.9,0.92,0.95,0.98
variants=("$@")
[ $# -gt 0 ] || variants=(base fine fine-all-layers stride1 dense8)
for name in "${variants[@]}"; do
  case $name in
    base) variant base 6 0.15,0.2 ;;
    fine) variant fine 6 0.1,0.15,0.2,0.25 "$fine" ;;
    fine-all-layers) STATE_FROM=fine variant fine-all-layers 6 0.15,0.2,0.25 "$fine" --min-layer-sparsity=0 ;;
    stride1) variant stride1 6 0.15,0.2,0.25 "$fine" --min-layer-sparsity=0 --step-stride=1 ;;
    dense8) variant dense8 8 0.15,0.2,0.25 "$fine" --min-layer-sparsity=0 ;;
    dense8-017) variant dense8-017 8 0.17 "$fine" --min-layer-sparsity=0 ;;
    dense10) variant dense10 10 0.15,0.2,0.25 "$fine" --min-layer-sparsity=0 ;;
    *) echo "unknown variant $name"; exit 2 ;;
  esac
done
