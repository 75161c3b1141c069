#!/usr/bin/env bash
# Forty-first session, on the lent GPU (carry .whl): loop_gaps.py at 48x48 and 64x64 with this tree's toy
# package. $OUT gets gaps-SIZE/gaps.json and trace.json.gz, and the log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for size in 48 64; do
  PYTHONPATH=/tmp/site:$PWD/pipelines PYTHONUNBUFFERED=1 python3 scripts/session41/loop_gaps.py --size "$size" \
      --out "$OUT/gaps-$size" 2>&1 | grep -v "Warning\|warn(" | cut -c1-600
done
