"""How sparse can the toy model's attention be, and how much of that do the predictors find?

    python scripts/toy_attention_sparsity.py [--steps 2 8 14] [--budget 0.05] [--prompt "..."]
    python scripts/toy_attention_sparsity.py --frames-cdf 0.95 0.9 0.8 [--dense-steps 4] [--prompt ...]
        [--frames-source oracle|sampled|...]
    either with [--skipped drop|pooled|pooled16|pooled-gaussian]

Renders with the shipped toy-shapes weights (CPU, fp32, 16 steps, seed 0), attention in the tile
order the processors use.

Per head (default): captures q, k, v of every self-attention call at the chosen steps of one clip.
For each head and each mask source, the cdf threshold is swept and reported is the highest
sparsity whose output error (relative L1 against all blocks) stays within the budget. Sources: the
oracle (top cdf on the TRUE block attention mass, `bench predict`'s oracle: no predictor beats it
at the same block size) and every predictor at sim 0. Unlike calibration, each call gets its own
best threshold here, so these are upper bounds of what a per-head profile can reach.

Frames (--frames-cdf): renders each prompt dense, then with every self-attention call after the
dense steps computed on the oracle's blocks at each cdf (one threshold for every head), and
reports the blocks skipped and PSNR / SSIM against the dense clip: the frame quality that masks
from a perfect predictor would give. --frames-source METHOD: the same with a predictor's masks
(sim 0), for the predictor's cost in frame quality at one uniform threshold.

An experiment, both modes: --skipped pooled gives every query block, for each key block its mask
skips, one stand-in token (the block's mean key and mean value, its logit raised by log(token
count)) instead of nothing: a first-order estimate of the skipped mass, which the kernel does not
compute (torch only, here). pooled16: one stand-in per 16 keys; pooled-gaussian: one a block, its
logit corrected for the spread of the block's keys (`pooled_stand_ins`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools

import torch
import diffusers.models.transformers.transformer_wan as transformer_wan

from sparsediff.attention import BLOCK_M, BLOCK_N, METHODS, block_sparse_attention, predict_block_mask
from sparsediff.bench.predict import CDF_SWEEP, sparsity_at_budget, true_block_mass
from sparsediff.io import atomic_write_json
from sparsediff.kernels.block_select_reference import top_cdf
from sparsediff.kernels.block_sparse_attn_reference import expand_block_mask
from sparsediff.layout import choose_tile, inverse_permutation, tile_permutation
from sparsediff.metrics import relative_l1, video_psnr, video_ssim
from sparsediff.pipelines.toy_shapes import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, load_pipeline

GRID = (DEFAULT_FRAMES, DEFAULT_HEIGHT // 4, DEFAULT_WIDTH // 4)  # the latent grid: 4x4 pixel-unshuffle
TILE = choose_tile(GRID, BLOCK_M)
N_VIDEO = GRID[0] * GRID[1] * GRID[2]


def pooled_stand_ins(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, tokens: int = BLOCK_N,
                     gaussian: bool = False) -> torch.Tensor:
    """Attention of (B, H, N, D) inputs over the mask's kept blocks plus stand-in tokens for each
    skipped key block, one per `tokens` keys (a divisor of BLOCK_N): their mean key with the logit
    raised by log(token count), their mean value. exp(q.mean(k)) <= mean(exp(q.k)) (Jensen), so a
    stand-in under-counts its keys' mass; `gaussian` adds the diagonal-Gaussian correction
    0.5 * sum_d (q_d * scale)^2 var(k_d) to the logit."""
    b, h, n, d = q.shape
    n_stand_ins = -(-n // tokens)
    counts = (n - torch.arange(n_stand_ins) * tokens).clamp(max=tokens).float()
    pad = (0, 0, 0, n_stand_ins * tokens - n)
    k_groups, v_groups = (torch.nn.functional.pad(x, pad).view(b, h, n_stand_ins, tokens, d) for x in (k, v))
    k_mean, v_mean = (x.sum(3) / counts[:, None] for x in (k_groups, v_groups))
    scale = d**-0.5
    stand_in = q @ k_mean.transpose(-1, -2) * scale + counts.log()
    if gaussian:
        k_var = (k_groups**2).sum(3) / counts[:, None] - k_mean**2
        stand_in = stand_in + 0.5 * scale**2 * (q * q) @ k_var.transpose(-1, -2)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~expand_block_mask(mask, n, n, BLOCK_M, BLOCK_N), float("-inf"))
    # A stand-in stands for the keys its block's mask skips: -inf where the block is kept.
    kept_stand_ins = expand_block_mask(mask, n, n_stand_ins, BLOCK_M, BLOCK_N // tokens)
    stand_in = stand_in.masked_fill(kept_stand_ins, float("-inf"))
    p = torch.softmax(torch.cat([scores, stand_in], -1), -1)
    return p[..., :n] @ v + p[..., n:] @ v_mean


ATTEND = {"drop": block_sparse_attention, "pooled": pooled_stand_ins,
          "pooled16": functools.partial(pooled_stand_ins, tokens=16),
          "pooled-gaussian": functools.partial(pooled_stand_ins, gaussian=True)}


def source_masks(source: str, q: torch.Tensor, k: torch.Tensor, cdfs: tuple[float, ...], *,
                 block_m: int = BLOCK_M, block_n: int = BLOCK_N, shared: bool = False) -> list[torch.Tensor]:
    """Block masks of (B, H, N, D) q and k at each cdf threshold: `oracle`, the top cdf of the true
    block mass (computed once) in blocks of block_m x block_n, or predictor `source`'s at sim 0 (in
    the kernel's blocks only). `shared` (oracle only): one mask for the whole batch, the top cdf of
    the mass averaged over it (a CFG batch's halves drop the same blocks)."""
    if source == "oracle":
        mass = true_block_mass(q, k, block_m, block_n)
        if shared:
            mass = mass.mean(0, keepdim=True)
        return [top_cdf(mass, torch.full((q.shape[1],), cdf)).expand(q.shape[0], -1, -1, -1) for cdf in cdfs]
    if shared:
        raise ValueError(f"a batch-shared mask is implemented for the oracle only, not {source!r}")
    if (block_m, block_n) != (BLOCK_M, BLOCK_N):
        raise ValueError(f"predictor {source!r} makes {BLOCK_M}x{BLOCK_N} blocks only, asked for {block_m}x{block_n}")
    return [predict_block_mask(q, k, cdf, 0.0, method=source) for cdf in cdfs]


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference the masks are judged against: every block of (B, H, N, D) inputs kept."""
    b, h = q.shape[:2]
    return block_sparse_attention(q, k, v, torch.ones(b, h, -(-q.shape[2] // BLOCK_M), -(-k.shape[2] // BLOCK_N),
                                                      dtype=torch.bool))


def head_sparsity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, budget: float, skipped: str) -> dict[str, list[float]]:
    """Per mask source, per head of (1, H, N, D) inputs: the sparsity reached at `budget` relative L1."""
    h = q.shape[1]
    ref = dense_attention(q, k, v)
    attend = ATTEND[skipped]
    result = {}
    for name in ("oracle", *METHODS):
        curves: list[list[tuple[float, float]]] = [[] for _ in range(h)]
        for mask in source_masks(name, q, k, CDF_SWEEP):
            out = attend(q, k, v, mask)
            for i in range(h):
                curves[i].append((1.0 - float(mask[:, i].float().mean()), float(relative_l1(out[:, i], ref[:, i]))))
        result[name] = [sparsity_at_budget(points, budget) for points in curves]
    return result


@contextlib.contextmanager
def video_self_attention(self_attention, tile: tuple[int, int, int] = TILE):
    """Within the block, `self_attention(q, k, v)` computes every video self-attention call of the toy
    model's transformer: (B, H, N, D) tensors in `tile` order in, the output likewise out (None: the
    stock computation)."""
    stock = transformer_wan.dispatch_attention_fn
    tile_order = tile_permutation(GRID, tile)
    raster_order = inverse_permutation(tile_order)

    def attention(query, key, value, *a, **kw):
        if query.shape[1] == key.shape[1] == N_VIDEO:
            order = tile_order.to(query.device)
            out = self_attention(*(x.transpose(1, 2)[:, :, order] for x in (query, key, value)))
            if out is not None:
                return out[:, :, raster_order.to(query.device)].transpose(1, 2).to(query.dtype)
        return stock(query, key, value, *a, **kw)

    transformer_wan.dispatch_attention_fn = attention
    try:
        yield
    finally:
        transformer_wan.dispatch_attention_fn = stock


def render(pipe, prompt: str, self_attention, tile: tuple[int, int, int] = TILE) -> tuple:
    """One clip of `prompt` (seed 0) with `self_attention(step, q, k, v)` computing every video
    self-attention call: (B, H, N, D) fp32 tensors in `tile` order in, the output likewise out (None:
    the stock computation). Returns the frames (F, H, W, 3) in [0, 1]."""
    state = {"step": 0}

    def next_step(pipe, i, t, kw):
        state["step"] = i + 1
        return kw

    with video_self_attention(lambda q, k, v: self_attention(state["step"], q.float(), k.float(), v.float()), tile):
        return pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), callback_on_step_end=next_step,
                    output_type="np").frames[0]


def per_head(pipe, args: argparse.Namespace) -> dict:
    table: list[dict] = []

    def capture(step, q, k, v):
        if step in args.steps:  # the conditional half of the CFG batch
            layer = sum(row["step"] == step for row in table)
            table.append({"step": step, "layer": layer, **head_sparsity(q[:1], k[:1], v[:1], args.budget, args.skipped)})
        return None

    render(pipe, args.prompt[0], capture)
    sources = ["oracle", *METHODS]
    print(f"sparsity per head at {args.budget:g} relative L1 (tiles {TILE}, blocks of {BLOCK_M}x{BLOCK_N}, "
          f"skipped blocks: {args.skipped}):")
    for row in table:
        print(f"step {row['step']:2d} layer {row['layer']}: " +
              "  ".join(f"{name} " + " ".join(f"{s:.2f}" for s in row[name]) for name in sources))
    means = {name: sum(sum(r[name]) for r in table) / sum(len(r[name]) for r in table) for name in sources}
    print("mean over heads, layers and steps: " + ", ".join(f"{name} {m:.3f}" for name, m in means.items()))
    return {"budget": args.budget, "tile": TILE, "skipped": args.skipped, "prompt": args.prompt[0], "means": means,
            "rows": table}


def masked_frames(pipe, args: argparse.Namespace) -> dict:
    dense = [render(pipe, prompt, lambda *call: None) for prompt in args.prompt]
    attend = ATTEND[args.skipped]
    rows = []
    for cdf in args.frames_cdf:
        skipped: list[float] = []

        def masked(step, q, k, v):
            if step < args.dense_steps:
                return None
            (mask,) = source_masks(args.frames_source, q, k, (cdf,))
            skipped.append(1.0 - float(mask.float().mean()))
            return attend(q, k, v, mask)

        for prompt, reference in zip(args.prompt, dense):
            skipped.clear()
            frames = render(pipe, prompt, masked)
            rows.append({"cdf": cdf, "prompt": prompt, "sparsity": sum(skipped) / len(skipped),
                         "psnr": video_psnr(frames, reference), "ssim": video_ssim(frames, reference)})
            r = rows[-1]
            print(f"{args.frames_source} cdf {cdf:g}, {args.dense_steps} dense steps, skipped blocks {args.skipped}: sparsity {r['sparsity']:.3f}, "
                  f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}  ({prompt})", flush=True)
    return {"dense_steps": args.dense_steps, "source": args.frames_source, "tile": TILE, "skipped": args.skipped,
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[2, 8, 14], help="denoising steps (0-based) to capture")
    p.add_argument("--budget", type=float, default=0.05)
    p.add_argument("--prompt", nargs="+", default=["a red circle moves left on a black background"],
                   help="one caption per head table (the first), one or more for --frames-cdf")
    p.add_argument("--frames-cdf", type=float, nargs="+", help="render with oracle masks at these cdf thresholds")
    p.add_argument("--dense-steps", type=int, default=4, help="with --frames-cdf: steps left dense")
    p.add_argument("--frames-source", choices=["oracle", *METHODS], default="oracle",
                   help="with --frames-cdf: whose masks (the oracle's, or a predictor's at sim 0)")
    p.add_argument("--skipped", choices=sorted(ATTEND), default="drop",
                   help="blocks outside the mask: dropped (the kernel), or stand-in tokens (pooled_stand_ins): one a "
                        "block, one per 16 keys, or one a block with the Gaussian correction")
    p.add_argument("--out", help="also write the table as JSON here")
    args = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    result = masked_frames(pipe, args) if args.frames_cdf else per_head(pipe, args)
    if args.out:
        atomic_write_json(args.out, result, indent=1)


if __name__ == "__main__":
    main()
