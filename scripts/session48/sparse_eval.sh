#!/usr/bin/env bash
# Forty-eighth session, on the lent GPU (carry .whl): does the shipped profile keep what the shipped model learned?
# The held-out and seen colour / motion checks at seeds 0-2 rendered sparse (`eval --profile`), then seed 0 dense in
# the same call, each seed 0 run with its single-clip render time. Reports in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
for seed in 0 1 2; do
  python3 -m sparsediff.pipelines.toy_shapes.eval --steps 16 --seed $seed --time-repeats $(( seed == 0 ? 5 : 0 )) \
      --profile calibration/profiles/toy-shapes.json --out "$OUT/sparse-seed$seed.json" 2>&1 | grep toy_shapes
done
python3 -m sparsediff.pipelines.toy_shapes.eval --steps 16 --seed 0 --time-repeats 5 --out "$OUT/dense-seed0.json" 2>&1 |
    grep toy_shapes
