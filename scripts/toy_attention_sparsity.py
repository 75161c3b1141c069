"""How sparse can the toy model's attention be, and how much of that do the predictors find?

    python scripts/toy_attention_sparsity.py [--steps 2 8 14] [--budget 0.05] [--prompt "..."]

Renders one clip with the shipped toy-shapes weights (CPU, fp32, 16 steps) and captures q, k, v
of every self-attention call at the chosen steps, in the tile order the processors use. For each
head and each mask source, the cdf threshold is swept and reported is the highest sparsity whose
output error (relative L1 against all blocks) stays within the budget. Sources: the oracle (top
cdf on the TRUE block attention mass, `bench predict`'s oracle: no predictor beats it at the same
block size) and every predictor at sim 0. Unlike calibration, each call gets its own best
threshold here, so these are upper bounds of what a per-head profile can reach.
"""
from __future__ import annotations

import argparse

import torch
import diffusers.models.transformers.transformer_wan as transformer_wan

from sparsediff.attention import BLOCK_M, BLOCK_N, METHODS, block_sparse_attention, predict_block_mask
from sparsediff.bench.predict import CDF_SWEEP, sparsity_at_budget, true_block_mass
from sparsediff.io import atomic_write_json
from sparsediff.kernels.block_select_reference import top_cdf
from sparsediff.layout import choose_tile
from sparsediff.metrics import relative_l1
from sparsediff.pipelines.toy_shapes import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, load_pipeline
from sparsediff.workloads import to_tile_order


def head_sparsity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: float) -> dict[str, list[float]]:
    """Per mask source, per head of (1, H, N, D) inputs: the sparsity reached at `budget` relative L1."""
    h = q.shape[1]
    full = torch.ones(1, h, -(-q.shape[2] // BLOCK_M), -(-k.shape[2] // BLOCK_N), dtype=torch.bool)
    ref = block_sparse_attention(q, k, v, full)
    mass = true_block_mass(q, k, BLOCK_M, BLOCK_N)
    sources = {"oracle": lambda cdf: top_cdf(mass, torch.full((h,), cdf))}
    sources.update({m: (lambda cdf, m=m: predict_block_mask(q, k, cdf, 0.0, method=m)) for m in METHODS})
    result = {}
    for name, mask_at in sources.items():
        curves: list[list[tuple[float, float]]] = [[] for _ in range(h)]
        for cdf in CDF_SWEEP:
            mask = mask_at(cdf)
            out = block_sparse_attention(q, k, v, mask)
            for i in range(h):
                curves[i].append((1.0 - float(mask[:, i].float().mean()), float(relative_l1(out[:, i], ref[:, i]))))
        result[name] = [sparsity_at_budget(points, budget) for points in curves]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 8, 14], help="denoising steps (0-based) to capture")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--prompt", default="a red circle moves left on a black background")
    p.add_argument("--out", help="also write the table as JSON here")
    args = p.parse_args()

    grid = (DEFAULT_FRAMES, DEFAULT_HEIGHT // 4, DEFAULT_WIDTH // 4)
    tile = choose_tile(grid, BLOCK_M)
    n_video = grid[0] * grid[1] * grid[2]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    state = {"step": 0, "layer": 0}
    table: list[dict] = []
    stock = transformer_wan.dispatch_attention_fn

    def capture(query, key, value, *a, **kw):
        if query.shape[1] == key.shape[1] == n_video and state["step"] in args.steps:
            # (B, N, H, D) -> the conditional half's (1, H, N, D) in tile order
            q, k, v = (to_tile_order(x[:1].transpose(1, 2).float(), grid, tile) for x in (query, key, value))
            table.append({"step": state["step"], "layer": state["layer"], **head_sparsity(q, k, v, args.budget)})
            state["layer"] += 1
        return stock(query, key, value, *a, **kw)

    def next_step(pipe, i, t, kw):
        state.update(step=i + 1, layer=0)
        return kw

    transformer_wan.dispatch_attention_fn = capture
    try:
        pipe(prompt=args.prompt, generator=torch.Generator().manual_seed(0), callback_on_step_end=next_step)
    finally:
        transformer_wan.dispatch_attention_fn = stock
    sources = ["oracle", *METHODS]
    print(f"sparsity per head at {args.budget:g} relative L1 (tiles {tile}, blocks of {BLOCK_M}x{BLOCK_N}):")
    for row in table:
        print(f"step {row['step']:2d} layer {row['layer']}: " +
              "  ".join(f"{name} " + " ".join(f"{s:.2f}" for s in row[name]) for name in sources))
    means = {name: sum(sum(r[name]) for r in table) / sum(len(r[name]) for r in table) for name in sources}
    print("mean over heads, layers and steps: " + ", ".join(f"{name} {m:.3f}" for name, m in means.items()))
    if args.out:
        atomic_write_json(args.out, {"budget": args.budget, "tile": tile, "prompt": args.prompt, "means": means,
                                     "rows": table}, indent=1)


if __name__ == "__main__":
    main()
