#!/usr/bin/env bash
# Forty-first session, on the lent GPU (carry .whl and .gpu/baseline, which holds pipelines/toy_shapes/*.py
# of commit 3cba482): the toy training loop before and after its batch and caption copies stopped
# synchronising the stream. For each code and clip size: scripts/session41/loop_syncs.py, then a real
# `toy_shapes.train --steps N` run whose train_log.json gives the loop's time a step (steps 100 -> N, the
# held-out loss every 50 steps included, as in any training). $OUT gets the logs and loop_timing.json.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
flags="--batch-size 32 --compile true --foreground-weight 4 --lr 4e-4 --seed 0"
for size in 48 64; do
  steps=$([ "$size" = 48 ] && echo 400 || echo 300)
  for code in baseline new; do
    pkg=$([ "$code" = baseline ] && echo "$PWD/.gpu/baseline" || echo "$PWD/pipelines")
    PYTHONPATH=/tmp/site:$pkg python3 scripts/session41/loop_syncs.py --size "$size" \
        --out "$OUT/syncs-$code-$size.json" 2>&1 | grep -v "Warning\|warn(" | tail -30
    PYTHONPATH=/tmp/site:$pkg python3 -m toy_shapes.train --out "/tmp/loop-$code-$size" --steps "$steps" \
        --height "$size" --width "$size" $flags 2>&1 | grep -v "Warning\|warn(" > "$OUT/train-$code-$size.log"
    tail -2 "$OUT/train-$code-$size.log"
    cp "/tmp/loop-$code-$size/train_log.json" "$OUT/train_log-$code-$size.json"
  done
done
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for size in (48, 64):
    for code in ("baseline", "new"):
        h = json.load(open(f"{out}/train_log-{code}-{size}.json"))["history"]
        a = next(e for e in h if e["step"] == 100)
        rows[f"{code}-{size}"] = {"ms_per_step": round(1000 * (h[-1]["seconds"] - a["seconds"]) / (h[-1]["step"] - 100), 2),
                                  "final_loss": h[-1]["loss"], "final_val_loss": h[-1]["val_loss"]}
print(json.dumps(rows, indent=1))
json.dump(rows, open(f"{out}/loop_timing.json", "w"), indent=1)
PY
