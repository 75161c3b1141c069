"""Twenty-fourth session: registers and local-memory stack (spills) of every Triton kernel at its
declared configs, compiled ahead of time for sm90 on this machine (no GPU: Triton's own ptxas, then
its cuobjdump --dump-resource-usage on each cubin).

    python scripts/session24/sm90_resources.py    # from the repository root, TRITON_INTERPRET unset

The kernels and configs are those of `tests/test_kernel_resources.py` (its compile script, with each
kernel's cubin read back). Caveat: this machine's Triton, not the device's (3.6.0 in every GPU run so
far); register allocation can differ between versions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[2]
RETURN_LINE = ('return compiled.metadata.shared, sorted(set(re.findall(r"wgmma\\.mma_async[\\w.]*", '
               'compiled.asm["ptx"])))')
WITH_USAGE = '''import subprocess, tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    registers, stack = (int(re.search(key + r":(\\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return [compiled.metadata.shared, registers, stack], sorted(set(re.findall(r"wgmma\\.mma_async[\\w.]*", compiled.asm["ptx"])))'''


def main() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_kernel_resources import COMPILE_SCRIPT

    if RETURN_LINE not in COMPILE_SCRIPT:
        raise SystemExit("tests/test_kernel_resources.py's compile script changed: update RETURN_LINE")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    script = f"CUOBJDUMP = {str(cuobjdump)!r}\n" + COMPILE_SCRIPT.replace(RETURN_LINE, WITH_USAGE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    print(f"triton {triton.__version__}, sm90; kernel, its config columns, shared bytes, registers, stack bytes")
    for row in json.loads(done.stdout.strip().splitlines()[-1]):
        shared, registers, stack = row[-1]
        print(f"{row[0]:18s} {str(row[1:-1]):70s} {shared:7d} {registers:4d} {stack:4d}")


if __name__ == "__main__":
    main()
