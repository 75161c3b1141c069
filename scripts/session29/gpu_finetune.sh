#!/usr/bin/env bash
# Twenty-ninth session: the toy model's sparsity-aware fine-tune (scripts/session28/toy_sparse_finetune.py)
# at GPU size, then the held-out colour / motion evaluation of the result, on the lent GPU.
#   scripts/session29/gpu_finetune.sh MINUTES [fine-tune flags...]   (from the repository root)
# $OUT gets finetune.log, eval.log and finetune.tgz (the weights folder, its log and eval report).
set -o pipefail
minutes=${1:?usage: gpu_finetune.sh MINUTES [fine-tune flags...]}
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
out=${OUT:-/tmp/ft-out}
run=/tmp/ft-run
mkdir -p "$out"
rm -rf "$run"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/finetune.log"
python3 scripts/session28/toy_sparse_finetune.py --out "$run" --steps 1000000 --minutes "$minutes" "$@" 2>&1 |
    grep -v UserWarning | tee -a "$out/finetune.log" || exit 1
tar -C "$run" -czf "$out/finetune.tgz" .
python3 -m sparsediff.pipelines.toy_shapes.eval --weights "$run" --out "$run/eval_report.json" --steps 16 2>&1 |
    tee "$out/eval.log" || exit 1
tar -C "$run" -czf "$out/finetune.tgz" .
ls -l "$out"
