#!/usr/bin/env bash
# One lent-GPU session's measurements, from the repository root: installs the carried wheels
# (the device image has torch + triton but no diffusers), then runs the named stages and packs
# every result into $OUT/results.tgz (the device tool returns at most 8 files).
#   scripts/gpu_session.sh kernel predict e2e steps    # benchmarks (tune: tile-config search; kernel8: with FP8; fp8: FP8 rows, no search)
#   scripts/gpu_session.sh toy overhead render         # model-level measurements
#   scripts/gpu_session.sh hopper                      # the Gluon Hopper kernel's tests (pytest carried in .whl)
#   HOPPER_TESTS=gpu scripts/gpu_session.sh hopper persistent   # its GPU test alone, then its grids timed side by side
#   FINETUNE_MINUTES=6.5 FINETUNE_FLAGS="--batch-size 16" scripts/gpu_session.sh finetune   # the toy fine-tune
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# sparsediff.pipelines/.calibration/.apps map to top-level folders: install the package editable.
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
out=${OUT:-/tmp/gpu-out}
res=/tmp/gpu-results
# A warm machine keeps /tmp between calls (and a lease may find an earlier one's files): start empty,
# so that the archive holds this call's results alone.
rm -rf "$res"
mkdir -p "$out" "$res"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$res/gpu.txt"
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" | tee -a "$res/gpu.txt"
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    smoke)    python3 scripts/gpu_smoke.py ;;
    hopper)   python3 -m pytest -q -rsP tests/test_block_sparse_attn_hopper.py ${HOPPER_TESTS:+-k "$HOPPER_TESTS"} ;;
    demotime) python3 scripts/demo_timing.py --repeats 4 ;;
    profile)  python3 scripts/profile_predict.py flux cogvideox wan ;;
    kernel)   python3 -m sparsediff bench kernel --out "$res/kernel" ;;
    kernelall) python3 -m sparsediff bench kernel --fp8 --shapes flux,cogvideox,wan,hunyuan --keeps 1,0.5,0.25,0.1 \
                  --masks random --out "$res/kernelall" ;;
    kernelbf16) python3 -m sparsediff bench kernel --shapes flux,cogvideox,wan,hunyuan --keeps 1,0.25,0.1 --masks random \
                  --out "$res/kernelbf16" ;;
    kernelbf16-local) python3 -m sparsediff bench kernel --shapes flux,cogvideox,wan,hunyuan --keeps 1,0.25,0.1 \
                  --masks random,local --out "$res/kernelbf16-local" ;;  # random and video-like (local) masks
    kernel8)  python3 -m sparsediff bench kernel --fp8 --tune --shapes flux,cogvideox,wan --keeps 1,0.25 --masks random \
                  --out "$res/kernel8" ;;
    stepprof) python3 scripts/profile_step.py cogvideox --compile && python3 scripts/profile_step.py wan --compile &&
              python3 scripts/profile_step.py cogvideox ;;
    hunyuan)  python3 -m sparsediff bench e2e --steps 3 --families hunyuan_video --out "$res/steps" ;;
    # Compiled HunyuanVideo at its real size: one setting a call fits the 10-minute limit. Five steps,
    # of which the first is dense: setting A's 20%; setting B gets 20% too, not its 10%.
    hunyuan-compiled-a) python3 -m sparsediff bench e2e --steps 5 --modes compiled --settings A --families hunyuan_video \
                  --out "$res/steps" ;;
    hunyuan-compiled-b) python3 -m sparsediff bench e2e --steps 5 --modes compiled --settings B --families hunyuan_video \
                  --out "$res/steps" ;;
    # Setting B at its own 10% of dense steps: ten steps, one dense (about 550 s on an H100).
    hunyuan-compiled-b10) python3 -m sparsediff bench e2e --steps 10 --modes compiled --settings B \
                  --families hunyuan_video --out "$res/steps" ;;
    order)    python3 scripts/tune_row_order.py ;;
    pdl)      python3 scripts/session50/pdl_ab.py --out "$res/pdl" ;;  # programmatic dependent launch off / on
    persistent) python3 scripts/session55/persistent_ab.py --out "$res/persistent" ;;  # the Gluon kernel's grids
    # The graphed prediction of another tree (AB_BASE: a folder holding its sparsediff package) and of
    # this one, in turn.
    predict-ab) for round in 1 2; do
                  PYTHONPATH=$AB_BASE:$PYTHONPATH python3 scripts/session50/predict_ab.py --label base \
                      --out "$res/predict-ab.jsonl" &&
                  python3 scripts/session50/predict_ab.py --label tree --out "$res/predict-ab.jsonl" || break
                done ;;
    flux-compiled) python3 -m sparsediff bench e2e --steps 10 --modes compiled --families flux --setting-a-cdf 0.04 \
                  --setting-b-cdf 0.02 --out "$res/steps" ;;
    flux-compiled-a) python3 -m sparsediff bench e2e --steps 10 --modes compiled --settings A --families flux \
                  --setting-a-cdf 0.04 --out "$res/steps" ;;
    flux-graphs) python3 -m sparsediff bench e2e --steps 10 --modes eager,compiled --families flux --setting-a-cdf 0.04 \
                  --setting-b-cdf 0.02 --cuda-graphs on,off --out "$res/steps" ;;
    wan-compiled) python3 -m sparsediff bench e2e --steps 10 --modes compiled --families wan --out "$res/steps" ;;
    fluxprof) python3 scripts/profile_step.py flux --compile --cdf 0.04 && python3 scripts/profile_step.py flux --compile --cdf 0.02 --fp8 ;;
    # The attention-free step that bench e2e's bound counts as a step's non-attention part: Wan's beside
    # its sparse step, then CogVideoX's (against cogprof's sparse step).
    freeprof) python3 scripts/profile_step.py wan --compile --attention-free && python3 scripts/profile_step.py wan --compile &&
              python3 scripts/profile_step.py cogvideox --compile --attention-free ;;
    cogprof)  python3 scripts/profile_step.py cogvideox --compile --cdf 0.15 &&
              python3 scripts/profile_step.py cogvideox --compile --cdf 0.1 --fp8 ;;
    select)   python3 scripts/tune_block_select.py ;;
    cogvideox-compiled) python3 -m sparsediff bench e2e --steps 10 --modes compiled --families cogvideox --out "$res/steps" ;;
    cogvideox-compiled-a) python3 -m sparsediff bench e2e --steps 10 --modes compiled --settings A --families cogvideox \
                  --out "$res/steps" ;;
    fp8)      python3 -m sparsediff bench kernel --fp8 --shapes flux,cogvideox,wan --keeps 1,0.25 --masks random \
                  --out "$res/fp8" ;;
    tune)     python3 -m sparsediff bench kernel --tune --shapes flux,cogvideox,wan --keeps 1,0.25 --masks random \
                  --out "$res/tune" ;;
    predict)  python3 -m sparsediff bench predict --out "$res/predict" ;;
    e2e)      python3 -m sparsediff bench e2e --out "$res/e2e" ;;
    steps)    python3 -m sparsediff bench e2e --steps 10 --modes eager,compiled --families wan,cogvideox --out "$res/steps" ;;
    eager)    python3 -m sparsediff bench e2e --steps 10 --modes eager --families wan,cogvideox --out "$res/steps" ;;
    toy)      python3 -m sparsediff calibrate --model toy-shapes --out "$res/toy/toy-shapes.json" --validate ;;
    # The toy model's sparsity-quality curves, one calibrate-sweep per count of dense warm-up steps
    # ("auto": calibration chooses); SWEEP_DENSE_STEPS="6" runs one; SWEEP_METHOD picks the predictor,
    # SWEEP_BUDGETS the per-head error budgets; SWEEP_STATE_FROM, a folder of earlier sweeps' sweep-denseN/,
    # resumes from their statistics (calibration.calib-state.json), so that only selection and validation run;
    # SWEEP_FLAGS passes more calibrate-sweep flags (e.g. "--cdf-grid 0.5,0.7,0.9 --min-layer-sparsity 0").
    sweep)    for dense in ${SWEEP_DENSE_STEPS:-auto 4 6 8 10}; do
                flag=(); [ "$dense" = auto ] || flag=(--dense-steps "$dense")
                if [ -n "${SWEEP_STATE_FROM:-}" ]; then
                  mkdir -p "$res/sweep-dense$dense" &&
                      cp "$SWEEP_STATE_FROM/sweep-dense$dense/calibration.calib-state.json" "$res/sweep-dense$dense/" || exit 1
                fi
                python3 -m sparsediff calibrate-sweep --model toy-shapes --budgets "${SWEEP_BUDGETS:-0.1,0.2,0.3,0.5,0.7}" "${flag[@]}" \
                    --method "${SWEEP_METHOD:-sampled}" --out "$res/sweep-dense$dense" ${SWEEP_FLAGS:-} || exit 1
              done ;;
    flux)     python3 -m sparsediff bench e2e --steps 10 --modes eager,compiled --families flux --setting-a-cdf 0.04 --setting-b-cdf 0.02 \
                  --out "$res/steps" ;;
    overhead) python3 -m sparsediff.calibration.bench_overhead --steps 20 --out "$res/overhead" ;;
    render)   printf 'a red fox running through snow\na city street at night in the rain\n' > /tmp/prompts.txt
              python3 -m sparsediff render --model wan2.1-t2v-1.3b --random-weights --prompts /tmp/prompts.txt \
                  --out "$res/render-dense" --steps 10 --dense &&
              python3 -m sparsediff render --model wan2.1-t2v-1.3b --random-weights --prompts /tmp/prompts.txt \
                  --out "$res/render-sparse" --steps 10 --cdf-threshold 0.9 --sim-threshold 0.0 --dense-steps 2 &&
              cat "$res"/render-*/summary.csv ;;
    # The toy model's sparsity-aware fine-tune (scripts/session28/toy_sparse_finetune.py) for FINETUNE_MINUTES,
    # FINETUNE_FLAGS passed on (e.g. "--batch-size 16 --lr 5e-5"), then the held-out colour / motion scores.
    finetune) python3 scripts/session28/toy_sparse_finetune.py --out "$res/finetune" --steps 1000000 \
                  --minutes "${FINETUNE_MINUTES:-6.5}" ${FINETUNE_FLAGS:-} &&
              python3 -m sparsediff.pipelines.toy_shapes.eval --weights "$res/finetune" \
                  --out "$res/finetune/eval_report.json" --steps 16 ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac 2>&1 | tee "$res/$stage.log"
  echo "== stage $stage: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" | tee -a "$res/stages.txt"
  # Pack after every stage, so a run stopped at the time limit still returns what finished.
  find "$res" -name '*.mp4' -size +4M -delete  # keep the archive small; sidecars and CSVs stay
  tar -C "$res" -czf "$out/results.tgz" .
done
ls -l "$out"
