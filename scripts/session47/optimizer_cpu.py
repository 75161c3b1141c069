"""AdamW against Muon for the toy model, small clips on the CPU: the held-out loss after equal steps.

    python scripts/session47/optimizer_cpu.py --steps 400 --out bench-results/cpu-2026-12-07-session47/optimizer

Each run is `toy_shapes.train` at the shipped model's shape (6 layers, 4 heads of 64) on 32x32 clips of
5 frames (320 tokens), batch 8, bf16 autocast, seed 0; only the optimiser and its learning rate differ. Writes
one train_log.json a run and summary.json (held-out loss at each logged step, EMA at the end).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "pipelines"))
from toy_shapes.config import TrainConfig  # noqa: E402
from toy_shapes.train import train  # noqa: E402

RUNS = {"adamw-4e-4": ("adamw", 4e-4), "muon-4e-4": ("muon", 4e-4), "muon-1e-3": ("muon", 1e-3),
        "adamw-1e-3": ("adamw", 1e-3), "muon-3e-3": ("muon", 3e-3),
        "adamw-3e-3": ("adamw", 3e-3)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    summary = {}
    for name in args.runs.split(","):
        opt, lr = RUNS[name]
        cfg = TrainConfig(steps=args.steps, height=32, width=32, num_frames=5, batch_size=8,
                          optimizer=opt, lr=lr, warmup_steps=50, foreground_weight=4.0, log_every=50)
        log = train(cfg, out / name, "cpu")
        summary[name] = {"val": [(h["step"], h["val_loss"]) for h in log["history"]],
                         "final_ema": log["final_val_loss_ema"], "final_raw": log["final_val_loss_raw"],
                         "seconds": log["seconds"]}
        print(name, json.dumps(summary[name]), flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
