"""Per-step thresholds against one threshold per head at nearly the same sparsity, rendered on the CPU (fp32).

    python scripts/session45/per_step_cpu.py [--prompts P.txt] [--captions 0,1,8,9,16,17] [--configs 0,1,2]
        [--weights DIR] [--out X.json]

The toy model (shipped weights, 16 steps, guidance 3), from the forty-third session's guidance-3 statistics,
renders some of --prompts (scripts/session44/captions24.txt by default; caption i from seed i, as the GPU
validation's calibrate-sweep does) dense and with each profile below, sparse attention computed by the torch
references (calibration's `_MeasuringController`, which runs sparse calls on the CPU): PSNR / SSIM against dense
and the blocks skipped after the dense steps. Profiles (--configs picks them by index; 0-2 by default): after 8
dense steps, the budget rule at 0.2 (the profile shipped until the forty-sixth session) and 0.225, and
scripts/session44/sweep24.py's per-step rule at 0.2; after 9 dense steps (forty-sixth session), the budget rule at
0.225 (the profile shipped since) and 0.25. A CPU stand-in for the GPU sweep when no device is lent. --weights renders
other weights (a training's output folder) with the same profiles, calibrated on the shipped weights' statistics.
"""

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts" / "session44"))
import sweep24  # noqa: E402

import sparsediff  # noqa: E402
from sparsediff.calibration import driver  # noqa: E402
from sparsediff.calibration.measure import _MeasuringController  # noqa: E402  (runs sparse on the CPU, references)
from sparsediff.cli import main as cli  # noqa: E402
from sparsediff.metrics import video_psnr, video_ssim  # noqa: E402
from sparsediff.pipelines.toy_shapes import WEIGHTS_DIR, ToyShapesPipeline  # noqa: E402
from sparsediff.processors.controller import AttentionController  # noqa: E402

STATE = ROOT / "bench-results/h100-2026-12-06-session43/toy-guidance3/sweep-dense6/calibration.calib-state.json"
CONFIGS = [("budget rule 0.2", 0.2, 8, False), ("budget rule 0.225", 0.225, 8, False), ("per-step 0.2", 0.2, 8, True),
           ("9 dense, budget rule 0.225", 0.225, 9, False), ("9 dense, budget rule 0.25", 0.25, 9, False)]


@contextlib.contextmanager
def per_step(enabled: bool):
    saved = driver.select_for, AttentionController._layer_thresholds
    if enabled:
        driver.select_for, AttentionController._layer_thresholds = (sweep24.select_for_per_step,
                                                                    sweep24.layer_thresholds_per_step)
    try:
        yield
    finally:
        driver.select_for, AttentionController._layer_thresholds = saved


def profile_for(budget: float, dense_steps: int, folder: Path) -> sparsediff.SparsityProfile:
    folder.mkdir(parents=True)
    out = folder / f"budget-{budget:g}.json"
    (folder / f"budget-{budget:g}.calib-state.json").write_text(STATE.read_text())
    cli(["calibrate", "--model", "toy-shapes", "--out", str(out), "--budget", str(budget),
         "--dense-steps", str(dense_steps), "--method", "sampled8", "--device", "cpu"])
    return sparsediff.SparsityProfile.load(out)


parser = argparse.ArgumentParser()
parser.add_argument("--prompts", type=Path, default=ROOT / "scripts/session44/captions24.txt")
parser.add_argument("--captions", default="0,1,8,9,16,17", help="indices into --prompts")
parser.add_argument("--configs", default="0,1,2")
parser.add_argument("--weights", type=Path, help="a toy weights folder (default: the shipped weights)")
parser.add_argument("--out", default="per-step-cpu.json")
args = parser.parse_args()
configs = [CONFIGS[int(c)] for c in args.configs.split(",")]
lines = [x for x in args.prompts.read_text().splitlines() if not x.startswith("#")]
chosen = [int(i) for i in args.captions.split(",")]
pipe = ToyShapesPipeline.from_folder(args.weights or WEIGHTS_DIR)
results = {name: [] for name, *_ in configs}
with tempfile.TemporaryDirectory() as tmp:
    profiles = {}
    for name, budget, dense_steps, stepwise in configs:
        with per_step(stepwise):
            folder = Path(tmp) / name.replace(" ", "-").replace(",", "")
            profiles[name] = (profile_for(budget, dense_steps, folder), list(sweep24.PHASES))
for i in chosen:
    render = lambda: pipe(prompt=lines[i], generator=torch.Generator().manual_seed(i)).frames[0]  # noqa: E731
    started = time.perf_counter()
    dense = render()
    print(f"caption {i}: {lines[i]!r}, dense {time.perf_counter() - started:.0f} s", flush=True)
    for name, *_, stepwise in configs:
        profile, phases = profiles[name]
        sweep24.PHASES[:] = phases
        with per_step(stepwise):
            handle = sparsediff.apply(pipe, profile, controller_cls=_MeasuringController)
            try:
                started = time.perf_counter()
                sparse = render()
                sparsity = handle.stats.mean_sparsity()
            finally:
                handle.remove()
        row = dict(caption=lines[i], seed=i, psnr_db=video_psnr(sparse, dense), ssim=video_ssim(sparse, dense),
                   sparsity_after_dense_steps=sparsity)
        results[name].append(row)
        print(f"  {name}: {sparsity:.1%} {row['psnr_db']:.2f} dB SSIM {row['ssim']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
summary = {name: dict(mean_psnr_db=sum(r["psnr_db"] for r in rows) / len(rows),
                      mean_ssim=sum(r["ssim"] for r in rows) / len(rows),
                      sparsity_after_dense_steps=sum(r["sparsity_after_dense_steps"] for r in rows) / len(rows))
           for name, rows in results.items()}
for name, s in summary.items():
    print(f"{name}: {s['sparsity_after_dense_steps']:.1%} {s['mean_psnr_db']:.2f} dB SSIM {s['mean_ssim']:.3f}")
Path(args.out).write_text(json.dumps(dict(summary=summary, videos=results, torch=torch.__version__), indent=1))
