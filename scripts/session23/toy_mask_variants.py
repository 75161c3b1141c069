"""Twenty-third session: does the toy model's attention get sparser at equal error with another token
order, or with a pooled stand-in token for each skipped key block? (CPU, fp32, shipped weights.)

    python scripts/session23/toy_mask_variants.py --prompt "..." [--steps 6 10 14]
        [--orders 4,4,8 raster ...] [--sources oracle sampled] [--skipped drop pooled]

Captures q, k, v of every video self-attention call (conditional half of the CFG batch) at the
given denoising steps of one clip (seed 0, 16 steps), then for each token order (a tile shape T,H,W
or `raster`), mask source (the oracle's top cdf of the true block mass, or a predictor at sim 0) and
treatment of the skipped blocks (`drop`: the kernel's; `pooled`: `toy_attention_sparsity.py
--skipped pooled`'s stand-in tokens) sweeps the cdf threshold and reports the highest share of
blocks skipped whose output error (relative L1 against dense, over all heads of the call) stays
within 5%, 10% and 20%: per call, then the mean over calls.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import ATTEND, GRID, TILE, dense_attention, render, source_masks  # noqa: E402

from sparsediff.attention import METHODS  # noqa: E402
from sparsediff.bench.predict import CDF_SWEEP, sparsity_at_budget  # noqa: E402
from sparsediff.layout import tile_permutation  # noqa: E402
from sparsediff.metrics import relative_l1  # noqa: E402
from sparsediff.pipelines.toy_shapes import load_pipeline  # noqa: E402

BUDGETS = (0.05, 0.1, 0.2)
RASTER = (1, GRID[1], GRID[2])  # one tile a frame: raster order


def parse_order(text: str) -> tuple[int, int, int]:
    return RASTER if text == "raster" else tuple(int(x) for x in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="a blue square bounces, a yellow triangle rotates on a checkered background")
    p.add_argument("--steps", type=int, nargs="+", default=[6, 10, 14])
    p.add_argument("--orders", type=parse_order, nargs="+", default=[TILE])
    p.add_argument("--sources", nargs="+", choices=["oracle", *METHODS], default=["oracle"])
    p.add_argument("--skipped", nargs="+", choices=sorted(ATTEND), default=["drop"])
    args = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def capture(step, q, k, v):
        if step in args.steps:
            calls.append((step, *(x[:1].clone() for x in (q, k, v))))
        return None

    render(pipe, args.prompt, capture, RASTER)
    means: dict[tuple, list[float]] = {}
    for step, q, k, v in calls:
        for order in args.orders:
            perm = tile_permutation(GRID, order)
            qt, kt, vt = (x[:, :, perm] for x in (q, k, v))
            ref = dense_attention(qt, kt, vt)
            for source in args.sources:
                masks = source_masks(source, qt, kt, CDF_SWEEP)
                for skipped in args.skipped:
                    points = [(1.0 - float(m.float().mean()), float(relative_l1(ATTEND[skipped](qt, kt, vt, m), ref)))
                              for m in masks]
                    reached = [sparsity_at_budget(points, b) for b in BUDGETS]
                    for b, s in zip(BUDGETS, reached):
                        means.setdefault((order, source, skipped, b), []).append(s)
                    print(f"step {step} order {order} {source} {skipped}: " +
                          " ".join(f"{b:g}: {s:.3f}" for b, s in zip(BUDGETS, reached)), flush=True)
    print(f"mean over {len(calls)} calls (steps {args.steps}), sparsity at relative L1 {BUDGETS}:")
    for order in args.orders:
        for source in args.sources:
            for skipped in args.skipped:
                print(f"order {order} {source} {skipped}: " +
                      " ".join(f"{sum(means[order, source, skipped, b]) / len(means[order, source, skipped, b]):.3f}"
                               for b in BUDGETS))


if __name__ == "__main__":
    main()
