"""#13's compiled end-to-end targets against what `bench e2e --steps` reports allow.

    python scripts/session49/e2e_ceilings.py --out DIR REPORT.json [REPORT.json ...]

For each compiled row of the reports: the speed-up achieved, its attainable bound, its ceiling (the
sparse steps' attention free: `sparsediff.bench.e2e.attainable_speedup` at 0) and #13's target. A
target above the ceiling cannot be reached by any attention kernel, since the dense steps and
everything outside attention stay. Otherwise `needed ratio` is the sparse steps' attention time, as a
share of its dense time, that would reach the target at the bound itself, and `needed efficiency` is
the kernel speed per kept block over cuDNN's per dense block that this asks at the row's kept
fraction (1 - sparsity). With --kernel-report (a `bench kernel` JSON of the same GPU), each row
also gets the attention share of a dense step checked another way: cuDNN's graphed call at the
family's shape times the self-attention calls of a step (the config's blocks), over the dense
step. Writes e2e-ceilings.json and e2e-ceilings.md under --out.
"""
import argparse
import json
from pathlib import Path

from sparsediff.bench.e2e import attainable_speedup
from sparsediff.io import atomic_write_text
from sparsediff.pipelines import configs

# Issue #13, compiled runs: setting -> family -> speed-up.
TARGETS = {"A": {"hunyuan_video": 2.3, "wan": 1.8, "cogvideox": 1.65, "flux": 1.2},
           "B": {"hunyuan_video": 3.5, "wan": 2.5, "cogvideox": 2.1, "flux": 1.3}}

# Self-attention calls in one transformer forward: every block attends once (FLUX's and HunyuanVideo's
# double- and single-stream blocks alike).
CONFIGS = {"hunyuan_video": configs.HUNYUANVIDEO_TRANSFORMER, "wan": configs.WAN21_T2V_1_3B_TRANSFORMER,
           "cogvideox": configs.COGVIDEOX_5B_TRANSFORMER, "flux": configs.FLUX1_DEV_TRANSFORMER}
CALLS = {family: c["num_layers"] + c.get("num_single_layers", 0) for family, c in CONFIGS.items()}


def cudnn_ms(kernel_report: dict) -> dict[tuple[int, int, int], float]:
    """cuDNN's graphed dense call (ms) by (heads, tokens, head dim), from a `bench kernel` report."""
    return {(r["H"], r["N"], r["D"]): r["graph_ms"] for r in kernel_report["rows"] if r["impl"] == "cudnn"}


def needed_ratio(dense_s: float, free_s: float, steps: int, dense_steps: int, target: float) -> float:
    """The attention time ratio at which attainable_speedup(...) equals target (negative: above the ceiling)."""
    step_dense, step_free = dense_s / steps, free_s / steps
    step_sparse = (dense_s / target - dense_steps * step_dense) / (steps - dense_steps)
    return (step_sparse - step_free) / (step_dense - step_free)


def rows(report: dict, path: Path, cudnn: dict[tuple[int, int, int], float]) -> list[dict]:
    out = []
    for result in report["results"]:
        row = result["runs"].get("compiled")
        if row is None:
            continue
        call_ms = cudnn.get(tuple(result["attention_shape"][1:]))
        step_ms = row["dense_s"] * 1000 / result["steps"]
        share_from_cudnn = None if call_ms is None else CALLS[result["family"]] * call_ms / step_ms
        for name, setting in result.items():
            if not (name.startswith("setting_") and isinstance(setting, dict) and f"{name}_speedup" in row):
                continue
            label = setting["label"]
            loop = (row["dense_s"], row["attention_free_s"], result["steps"], setting["dense_steps"])
            target = TARGETS[label][result["family"]]
            ratio = needed_ratio(*loop, target)
            keep = 1.0 - row[f"{name}_sparsity"]
            out.append({
                "report": str(path), "device": report["device"], "date": report["time"][:10],
                "family": result["family"], "setting": label, "steps": result["steps"],
                "dense_steps": setting["dense_steps"], "attention_share": row["attention_share"],
                "attention_share_from_cudnn": share_from_cudnn,
                "sparsity": row[f"{name}_sparsity"], "achieved": row[f"{name}_speedup"],
                "bound": row[f"{name}_bound_speedup"], "ceiling": attainable_speedup(*loop, 0.0),
                "target": target, "needed_ratio": ratio, "measured_ratio": row[f"{name}_kernel_time_ratio"],
                "needed_efficiency": keep / ratio if ratio > 0 else None,
                "measured_efficiency": keep / row[f"{name}_kernel_time_ratio"],
            })
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| family | setting | steps (dense) | attention share (cuDNN x calls) | achieved | bound | ceiling | "
             "target | kernel ratio measured / needed | efficiency measured / needed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        needed = ("above the ceiling" if r["needed_efficiency"] is None
                  else f"{r['measured_efficiency']:.2f} / {r['needed_efficiency']:.2f}")
        ratio = "—" if r["needed_ratio"] < 0 else f"{r['needed_ratio']:.3f}"
        check = "" if r["attention_share_from_cudnn"] is None else f" ({r['attention_share_from_cudnn']:.3f})"
        lines.append(f"| {r['family']} | {r['setting']} | {r['steps']} ({r['dense_steps']}) | "
                     f"{r['attention_share']:.3f}{check} | {r['achieved']:.3f}x | {r['bound']:.3f}x | "
                     f"{r['ceiling']:.3f}x | {r['target']}x | {r['measured_ratio']:.3f} / {ratio} | {needed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kernel-report", type=Path, help="a `bench kernel` JSON of the same GPU (cuDNN's call times)")
    p.add_argument("reports", nargs="+", type=Path)
    args = p.parse_args()
    cudnn = cudnn_ms(json.loads(args.kernel_report.read_text())) if args.kernel_report else {}
    table = [r for path in args.reports for r in rows(json.loads(path.read_text()), path, cudnn)]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "e2e-ceilings.json", json.dumps(table, indent=2) + "\n")
    atomic_write_text(args.out / "e2e-ceilings.md", markdown(table))
    print(markdown(table), end="")


if __name__ == "__main__":
    main()
