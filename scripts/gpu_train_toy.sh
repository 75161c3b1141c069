#!/usr/bin/env bash
# Train the toy shapes model on the lent GPU, evaluate it, and leave the results in $OUT.
#   scripts/gpu_train_toy.sh MINUTES [train flags...]     (run from the repository root)
# The shipped weights are three runs, each from the previous one's weights copied into
# pipelines/toy_shapes/weights (pipelines/toy_shapes/README.md):
#   scripts/gpu_train_toy.sh 8 --compile true --height 48 --width 48
#   scripts/gpu_train_toy.sh 7.5 --compile true --init-from pipelines/toy_shapes/weights --lr 3e-4
#   scripts/gpu_train_toy.sh 4 --compile true --init-from pipelines/toy_shapes/weights --lr 2e-4 --foreground-weight 4
# The device has torch but no diffusers: the wheels in .whl/ are installed to /tmp/site. The
# package is imported as top-level `toy_shapes` (its imports are relative), so neither an
# install of sparsediff nor the rest of the library is needed there.
# $OUT gets: transformer.safetensors, text_encoder.safetensors, meta.tar (configs, vocab,
# train_log.json, eval_report.json), samples.png, run.log.
set -o pipefail
minutes=${1:?usage: gpu_train_toy.sh MINUTES [train flags...]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/pipelines:$PYTHONPATH PYTHONUNBUFFERED=1
out=${OUT:-/tmp/toy_out}
run=/tmp/toy_run
mkdir -p "$out"
rm -rf "$run"
python3 -m toy_shapes.train --out "$run" --minutes "$minutes" "$@" 2>&1 | tee "$out/run.log" || exit 1
# Pack the weights before evaluating, and again after: a call stopped at the device's time limit
# during the evaluation still returns the trained model.
pack() {
  cp "$run/transformer/diffusion_pytorch_model.safetensors" "$out/transformer.safetensors"
  cp "$run/text_encoder/diffusion_pytorch_model.safetensors" "$out/text_encoder.safetensors"
  tar -C "$run" -cf "$out/meta.tar" transformer/config.json text_encoder/config.json tokenizer scheduler \
      train_config.json train_log.json "$@"
}
pack
# shellcheck disable=SC2086  # EVAL_STEPS is a list of step counts
python3 -m toy_shapes.eval --weights "$run" --out "$run/eval_report.json" --steps ${EVAL_STEPS:-16 24} \
    --png "$out/samples.png" 2>&1 | tee -a "$out/run.log" || exit 1
pack eval_report.json
ls -l "$out"
