#!/usr/bin/env bash
# GPU run of the block-sparse attention kernel, from the repository root: on-device check against
# the torch reference, then `bench kernel` (optionally --tune) with its JSON and PNG in $OUT (or
# bench-results/). Extra arguments go to the bench, e.g. `scripts/gpu_kernel.sh --tune`.
#
# It imports only the kernel and bench modules: `import sparsediff` pulls in diffusers through the
# processors, and the GPU image has no diffusers. So the package is registered without running its
# __init__.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
python3 - --out "$out" "$@" <<'EOF' 2>&1 | tee "$out/kernel-bench.log"
import os
import sys
import types

package = types.ModuleType("sparsediff")
package.__path__ = [os.path.abspath("sparsediff")]
sys.modules["sparsediff"] = package

from sparsediff.bench.kernel import main

sys.exit(main(sys.argv[1:]))
EOF
