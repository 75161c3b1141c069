"""Several `calibrate-sweep` curves in one plot: PSNR and SSIM against sparsity after the dense steps.

    python scripts/plot_sweeps.py OUT.png LABEL=DIR/sweep.json[,DIR2/sweep.json] [LABEL=...] [--title T]

Each curve is one sweep (one predictor and count of dense steps), or several joined (comma list: budgets
of one setting measured in separate sweeps), its points in order of sparsity; the dotted lines mark 30 dB
and SSIM 0.95, the bar #9 sets for the toy model.
"""
import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("curves", nargs="+", help="LABEL=path/to/sweep.json[,path/to/another/sweep.json]")
    p.add_argument("--title", default="sparsity vs quality")
    args = p.parse_args()
    fig, (psnr, ssim) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, spec in enumerate(args.curves):
        label, _, path = spec.partition("=")
        if not path:
            p.error(f"expected LABEL=path/to/sweep.json, got {spec!r}")
        points = sorted((q for one in path.split(",") for q in json.loads(Path(one).read_text())["points"]),
                        key=lambda q: q["sparsity_after_dense_steps"])
        xs = [q["sparsity_after_dense_steps"] for q in points]
        style = dict(color=f"C{i}", marker="os^v<>"[i % 6], ls="-" if "sampled8" in label else "--", label=label)
        psnr.plot(xs, [q["mean_psnr_db"] for q in points], **style)
        ssim.plot(xs, [q["mean_ssim"] for q in points], **style)
    for ax, bar, name in ((psnr, 30.0, "mean PSNR vs dense (dB)"), (ssim, 0.95, "mean SSIM vs dense")):
        ax.axhline(bar, color="grey", ls=":")
        ax.axvline(0.6, color="grey", ls=":")
        ax.set_xlabel("attention block sparsity after the dense steps (held-out renders)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    # Below the axes: inside, the legend hid points of the curves.
    fig.legend(*psnr.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
    fig.suptitle(args.title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.035 * ((len(args.curves) + 1) // 2), 1, 1))
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
