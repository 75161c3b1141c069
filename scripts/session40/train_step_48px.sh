#!/usr/bin/env bash
# Fortieth session, on the lent GPU (carry .whl): the toy training step at 48x48 (the first phase of a
# `--start-size 48` run) and at 64x64, compiled as trained (no-persistent) and with inductor's CUDA graphs.
# $OUT gets train_step_sizes.json (written after each cell) and its log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
PYTHONPATH=/tmp/site:$PWD/pipelines PYTHONUNBUFFERED=1 python3 scripts/session34/train_step_variants.py \
    --variants no-persistent cuda-graphs --size 48 64 --out "$OUT/train_step_sizes.json" 2>&1 \
    | grep -v "Warning\|warn(" | cut -c1-400 | tee "$OUT/train_step_sizes.log"
