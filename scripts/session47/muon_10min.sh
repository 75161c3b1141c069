#!/usr/bin/env bash
# Forty-seventh session, on the lent GPU (carry .whl): the forty-first session's ten-minute recipe
# (bench-results/h100-2026-12-06-session41/toy-10min-nosync: 10,468 steps in 528 s, AdamW) with Muon for the
# transformer blocks' weight matrices (--optimizer muon), at LR; everything else as that run, so that the two
# held-out loss curves compare step for step. MAX_MINUTES (8.8 there) stops it earlier, to fit what is left of a
# session's device time. $OUT gets gpu_train_toy.sh's files.
LR=${LR:-4e-4} MAX_MINUTES=${MAX_MINUTES:-8.8}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
EVAL_STEPS=16 bash scripts/gpu_train_toy.sh 8 --steps 10800 --max-minutes "$MAX_MINUTES" --start-size 48 \
    --start-size-fraction 0.8 --batch-size 32 --compile true --foreground-weight 4 --lr "$LR" --seed 0 --optimizer muon
