#!/usr/bin/env bash
# Forty-fourth session, on the lent GPU (carry .whl): the toy model's sparsity-quality curves validated on the
# 24 captions of captions24.txt (8 each of one, two and three objects) instead of the 4 bundled held-out ones.
# PART=1: guidance 3 (the default), from the forty-third session's statistics (its toy-guidance3/sweep-dense6
#    state; reselection from it reproduces the shipped profile exactly, checked on the CPU): 6, 8 and 10 dense
#    steps, and sweep24.py's trade-off selection rule at 6.
# PART=2: guidance 2.5 from fresh statistics (6 and 8 dense steps), and what the model renders there: the held-out
#    colour / motion scores at seeds 0-2.
# PART=3 (forty-fifth session; run in the forty-sixth), guidance 3: calibration on 36 captions
#    (scripts/session45/captions36.txt: the 12 bundled ones and 24 others) instead of 12, at 8 and 9 dense steps.
# PART=4 (forty-fifth session; run in the forty-sixth), guidance 3, from the forty-third session's statistics (no
#    calibration: a short call): 9 dense steps, and sweep24.py's per-step thresholds (--per-step) at 8 dense steps
#    (on the CPU, 6 captions: scripts/session45/per_step_cpu.py).
# PART=5 (forty-sixth session), guidance 3, from the forty-third session's statistics: the 9-dense budget-0.225 profile
#    (60.4% at 30.82 dB on the 24, PART=4) and the 8-dense budget-0.2 one shipped before it, validated on 24 fresh
#    captions (scripts/session46/captions24b.txt, drawn after PART=4 had picked the budget on captions24.txt).
# PART=6 (forty-seventh session), guidance 3: the weights in place at pipelines/toy_shapes/weights (the call carries
#    the Muon ten-minute run's there, scripts/session47/muon_10min.sh): held-out colour / motion at seeds 0-2, then
#    fresh statistics and 9 dense steps, and 10 from the same statistics.
# PART=7 (forty-eighth session), guidance 3, the same weights: lower budgets and more dense steps from PART=6's
#    statistics (STATE), for the checkered-background captions whose SSIM PART=6 left at 0.68-0.80.
# PART=8 (forty-eighth session; run as scripts/session48/sparse_eval.sh of 450d348, which this replaces): the
#    weights and profile in place, held-out and seen colour / motion at seeds 0-2 rendered sparse (eval --profile),
#    then seed 0 sparse and dense again with the single-clip render time (median of 5).
# VALIDATE overrides the validation captions.
# C36_BUDGETS overrides the 36-caption sweep's budgets (a short call: fewer validations).
# $OUT/results.tgz holds every sweep's folder and log; it is packed after each sweep.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
res=/tmp/validate24 s=$(date +%s)
rm -rf "$res" && mkdir -p "$res"
state43=bench-results/h100-2026-12-06-session43/toy-guidance3/sweep-dense6/calibration.calib-state.json

# sweep NAME DENSE BUDGETS STATE|- [calibrate-sweep flags]: one curve, validated on the 24 captions
# (RULE=--tradeoff: sweep24.py's experimental selection rule).
sweep() {
  local rule=${RULE:-} name=$1 dense=$2 budgets=$3 state=$4; shift 4
  mkdir -p "$res/$name"
  [ "$state" = - ] || cp "$state" "$res/$name/calibration.calib-state.json"
  timeout 240 python3 scripts/session44/sweep24.py $rule --model toy-shapes --method sampled8 --dense-steps "$dense" \
      --budgets "$budgets" \
      --validate-prompts "${VALIDATE:-scripts/session44/captions24.txt}" --out "$res/$name" "$@" > "$res/$name.log" 2>&1
  echo "$name exit $? at $(( $(date +%s) - s )) s"
  python3 -c "import json, sys
for p in json.load(open(sys.argv[1]))['points']:
    print(f\"  budget {p['budget']}: {p['sparsity_after_dense_steps']:.1%} {p['mean_psnr_db']:.2f} dB SSIM {p['mean_ssim']:.3f}\",
          f\"max head {p['max_head_error']:.3f} over {p['heads_over_budget']}\")" "$res/$name/sweep.json"
  tar -C "$res" -czf "$OUT/results.tgz" .
}

# evals TAG [eval flags]: the held-out and seen colour / motion scores of the weights in place, seeds 0-2 (SEEDS).
evals() {
  local tag=$1; shift
  for seed in ${SEEDS:-0 1 2}; do
    timeout 60 python3 -m sparsediff.pipelines.toy_shapes.eval --weights pipelines/toy_shapes/weights --steps 16 \
        --seed $seed --time-repeats 0 --out "$res/eval-${tag}seed$seed.json" "$@" 2>&1 | grep -E "pass rates|one clip" |
        sed "s/^/seed $seed /"
  done
}

case ${PART:-1} in
1)  sweep g3-dense6 6 0.15,0.175,0.2,0.225,0.25 "$state43"
    RULE=--tradeoff sweep g3-tradeoff-dense6 6 0.3,0.35,0.4,0.45 "$state43"
    sweep g3-dense8 8 0.15,0.2,0.25 "$state43"
    sweep g3-dense10 10 0.2,0.25,0.3 "$state43" ;;
2)  sweep g2.5-dense6 6 0.2,0.25 - --guidance-scale 2.5
    sweep g2.5-dense8 8 0.2,0.25 "$res/g2.5-dense6/calibration.calib-state.json" --guidance-scale 2.5
    evals g2.5- --guidance 2.5 ;;
3)  c36=scripts/session45/captions36.txt
    sweep c36-dense8 8 "${C36_BUDGETS:-0.2,0.225,0.25}" - --prompts $c36
    sweep c36-dense9 9 0.2,0.25 "$res/c36-dense8/calibration.calib-state.json" --prompts $c36 ;;
4)  sweep g3-dense9 9 0.2,0.225,0.25 "$state43"
    RULE=--per-step sweep ps-dense8 8 0.15,0.175,0.2 "$state43" ;;
5)  export VALIDATE=scripts/session46/captions24b.txt
    sweep fresh24-dense9 9 0.225 "$state43"
    sweep fresh24-dense8 8 0.2 "$state43" ;;
6)  evals ""
    echo "eval at $(( $(date +%s) - s )) s"
    sweep w-dense9 9 "${BUDGETS9:-0.2,0.225,0.25}" -
    sweep w-dense10 10 "${BUDGETS10:-0.225,0.25,0.3}" "$res/w-dense9/calibration.calib-state.json" ;;
7)  sweep w-dense10 10 "${BUDGETS10:-0.1,0.15,0.175}" "$STATE"
    sweep w-dense12 12 "${BUDGETS12:-0.15,0.2,0.25}" "$STATE"
    sweep w-dense11 11 "${BUDGETS11:-0.15,0.2}" "$STATE" ;;
8)  profile=calibration/profiles/toy-shapes.json
    evals sparse- --profile $profile
    SEEDS=0 evals sparse-timed- --profile $profile --time-repeats 5
    SEEDS=0 evals dense-timed- --time-repeats 5 ;;
esac
echo "done at $(( $(date +%s) - s )) s"
tar -C "$res" -czf "$OUT/results.tgz" .
