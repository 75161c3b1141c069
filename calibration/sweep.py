"""`sparsediff calibrate-sweep`: the sparsity-quality curve of a model, one calibrated profile per budget.

    sparsediff calibrate-sweep --model toy-shapes --budgets 0.05,0.1,0.2,0.3,0.5 --out DIR

Calibrates once (the statistics do not depend on the budget: later budgets re-select from the saved
state, see calibration/driver.py), and for each budget writes DIR/budget-B.json (the profile) and its
report, validated on the held-out prompts: every sparse head's held-out attention error, and PSNR /
SSIM of the sparse render against the dense one at the same seeds. Then DIR/sweep.json and
DIR/sweep.png: block sparsity after the dense steps (measured on the held-out renders) against mean
PSNR and SSIM. Any other `sparsediff calibrate` option is passed through.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sparsediff.calibration import cli

    cli.add_arguments(parser, sweep=True)


def _budgets(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be a comma list of numbers, got {text!r}") from None
    if not values or any(not 0.0 < b < 1.0 for b in values) or len({_name(b) for b in values}) != len(values):
        raise ValueError(f"--budgets must be distinct values in (0, 1) (to 6 significant digits, which name their "
                         f"files), got {text!r}")
    return sorted(values)


def _name(budget: float) -> str:
    return f"budget-{budget:g}"


def _validated_before(plan: Any, report_path: Path) -> dict[str, Any] | None:
    """The report at `report_path` if an earlier sweep validated this budget from the same statistics,
    settings and held-out prompts (validation renders them all: a resumed sweep keeps it), else None."""
    from sparsediff.calibration.driver import build_report, measure, select_for

    if plan.state is None or len(plan.state["prompts"]) < len(plan.prompts):
        return None  # statistics still to measure
    try:
        earlier = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("validation"), dict):
        return None
    stats, prompts, versions = measure(plan, None)
    # Through JSON, as the earlier report was written (tuples become lists).
    now = json.loads(json.dumps(build_report(plan, stats, select_for(plan, stats), prompts, versions)))

    def reproducible(report: dict[str, Any]) -> dict[str, Any]:  # without the time and the run's own history
        records = [{k: v for k, v in p.items() if k != "resumed"} if isinstance(p, dict) else p
                   for p in report.get("prompts") or []]
        return {k: v for k, v in report.items() if k not in ("finished_at", "validation", "prompts")} | {"prompts": records}

    if reproducible(now) != reproducible(earlier):
        return None
    validated = [{k: v.get(k) for k in ("prompt", "negative_prompt", "seed")}
                 for v in earlier["validation"].get("videos", []) if isinstance(v, dict)]
    return earlier if validated == [p.as_dict() for p in plan.validate_prompts] else None


def _point(budget: float, report: dict[str, Any]) -> dict[str, Any]:
    validation = report["validation"]
    videos = validation["videos"]
    measured = [v["sparsity_after_dense_steps"] for v in videos if v["sparsity_after_dense_steps"] is not None]
    return {
        "budget": budget,
        "dense_steps": report["dense_steps"]["value"],
        "expected_sparsity": report["expected_mean_sparsity"],
        "sparsity_after_dense_steps": sum(measured) / len(measured) if measured else 0.0,
        "mean_psnr_db": validation["mean_psnr_db"],  # None: every video identical to dense
        "mean_ssim": validation["mean_ssim"],
        "max_head_error": validation["max_head_error"],
        "heads_over_budget": validation["heads_over_budget"],
        "meaningful": validation["meaningful"],
    }


def plot(points: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsediff.io import atomic_output

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [p["sparsity_after_dense_steps"] for p in points]
    # Identical renders have infinite PSNR: drawn at the top of the axis, marked as such.
    finite = [p["mean_psnr_db"] for p in points if p["mean_psnr_db"] is not None]
    top = max(finite + [40.0]) + 5
    ys = [p["mean_psnr_db"] if p["mean_psnr_db"] is not None else top for p in points]
    ax.plot(xs, ys, "o-", color="tab:blue", label="mean PSNR (dB) vs dense")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"budget {p['budget']:g}" + ("" if p["mean_psnr_db"] is not None else " (identical)"),
                    (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(30, color="grey", ls=":", label="30 dB")
    ax.set_xlabel("attention block sparsity after the dense steps (held-out renders)")
    ax.set_ylabel("PSNR (dB)")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["mean_ssim"] for p in points], "s--", color="tab:orange", label="mean SSIM")
    ax2.axhline(0.95, color="tab:orange", ls=":", lw=0.8)
    ax2.set_ylabel("SSIM")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="lower left")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from sparsediff.calibration.driver import calibrate, make_plan, sidecar_paths
    from sparsediff.io import atomic_write_bytes, atomic_write_json, writable_dir
    from sparsediff.pipelines.recipes import ModelUnavailableError

    try:
        budgets = _budgets(args.budgets)
        writable_dir(args.out)
    except ValueError as e:
        print(f"sparsediff calibrate-sweep: error: {e}", file=sys.stderr)
        return 2
    work = args.out / "calibration.json"  # one statistics state, re-selected per budget
    points = []
    for i, budget in enumerate(budgets):
        # --fresh discards the state once: the later budgets re-select from what the first one measured
        plan_args = argparse.Namespace(**{**vars(args), "out": work, "budget": budget, "validate": True,
                                          "fresh": args.fresh and i == 0})
        del plan_args.budgets
        try:
            plan = make_plan(plan_args)
        except ValueError as e:
            print(f"sparsediff calibrate-sweep: error: {e}", file=sys.stderr)
            return 2
        budget_profile, budget_report = args.out / f"{_name(budget)}.json", args.out / f"{_name(budget)}.report.json"
        # --fresh redoes every budget's validation too
        report = _validated_before(plan, budget_report) if budget_profile.is_file() and not args.fresh else None
        if report is not None:
            print(f"calibrate-sweep: budget {budget:g} was validated by an earlier run from the same statistics "
                  f"and settings: kept ({budget_report.name})")
        else:
            try:
                report = calibrate(plan)
            except ModelUnavailableError as e:
                print(f"sparsediff calibrate-sweep: error: {e}", file=sys.stderr)
                return 1
            report_path, _ = sidecar_paths(work)
            profile = json.loads(work.read_text(encoding="utf-8"))
            profile["calibration"]["extra"]["report"] = budget_report.name  # its own, not the last budget's
            atomic_write_json(budget_profile, profile, indent=1)
            atomic_write_bytes(budget_report, report_path.read_bytes())
        points.append(_point(budget, report))
    result = {"model": report["model"], "points": points}
    atomic_write_json(args.out / "sweep.json", result)
    plot(points, args.out / "sweep.png", f"{report['model']['name']}: sparsity vs quality, one profile per budget")
    print(f"{'budget':>7} {'dense steps':>11} {'sparsity':>8} {'PSNR dB':>8} {'SSIM':>6} {'worst head err':>14}")
    for p in points:
        psnr = "inf" if p["mean_psnr_db"] is None else f"{p['mean_psnr_db']:.2f}"
        print(f"{p['budget']:>7g} {p['dense_steps']:>11} {p['sparsity_after_dense_steps']:>8.3f} {psnr:>8} "
              f"{p['mean_ssim']:>6.4f} {p['max_head_error']:>14.4f}")
    if not all(p["meaningful"] for p in points):
        print("note: validation ran without the kernels (see the reports): PSNR/SSIM say nothing", file=sys.stderr)
    print(f"wrote {args.out / 'sweep.json'} and {args.out / 'sweep.png'}")
    return 0 if all(math.isfinite(p["mean_ssim"]) for p in points) else 1
