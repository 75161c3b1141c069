"""Several `sparsediff bench e2e --steps` reports in one plot (`sparsediff.bench.e2e.plot_steps`).

    python scripts/plot_e2e.py OUT.png REPORT.json [REPORT.json ...]

Each bar is one family, mode and sparse setting: the speed-up achieved over dense, the attainable
bound outlined around it, the ceiling (the sparse steps' attention free) dashed, achieved / bound
above them; where reports overlap, the latest one counts.
--settings A,B draws only those settings (by label; default: all).
"""
import argparse
import json
from pathlib import Path

from sparsediff.bench.e2e import plot_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--settings", type=lambda s: s.split(","), default=None, help="comma-separated labels, e.g. A,B")
    args = p.parse_args()
    plot_steps([json.loads(path.read_text()) for path in args.reports], args.out, args.settings)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
