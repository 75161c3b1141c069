#!/usr/bin/env bash
# Nsight Compute on the attention kernel, the FP8 path against bf16, at Wan's (D=128) and CogVideoX's
# (D=64) shapes at keep 1: what bounds the FP8 path (#13's 1.4x). Device tool, from the repository root:
#   run(command="bash scripts/session25/ncu_attention.sh", carry=[".whl"])
set -uo pipefail
bash scripts/gpu_session.sh >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
for shape in wan cogvideox; do
  for path in fp8 bf16; do
    ncu --clock-control none -k regex:_block_sparse_attn_kernel --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats \
      --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
      --metrics "regex:sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active,regex:sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active" \
      python3 scripts/session25/ncu_attention.py "$shape" 1 "$path" > "$out/ncu-attention-$shape-$path.txt" 2>&1
    grep -E "Duration|Issue Slots Busy|No Eligible|Registers Per|pipe_(tensor|fma|alu|xu|fp16|fmaheavy).*pct" "$out/ncu-attention-$shape-$path.txt" | head -30
  done
done
