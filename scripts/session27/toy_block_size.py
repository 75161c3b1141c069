"""Twenty-seventh session: would smaller attention blocks let the toy model skip a larger share of
its attention at the same frame quality? (CPU, fp32, shipped weights, seed 0, 16 steps.)

    python scripts/session27/toy_block_size.py [--prompt ...] [--dense-steps 6] [--blocks 128x64 64x64 ...]
        [--cdf 0.7 0.6]

The kernel's blocks are 128 queries x 64 keys, and the processors put the toy model's 17 x 16 x 16
tokens in tiles of 128 (4 x 4 x 8), half a frame's rows. This renders each caption dense, then with
every video self-attention call after the dense steps computed on the oracle's blocks (top cdf of the
true block mass, one threshold for every head) at each block size and cdf, the tokens in the tiles
`layout.choose_tile` gives for that query-block size, and reports the share of THAT size's blocks
skipped and PSNR / SSIM against the dense clip. torch reference only: the kernels take 128 x 64
blocks. Default captions: the toy model's four held-out validation captions.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import GRID, render, source_masks  # noqa: E402
from toy_step_schedule import HOLDOUT  # noqa: E402

from sparsediff.io import atomic_write_json  # noqa: E402
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference  # noqa: E402
from sparsediff.layout import choose_tile  # noqa: E402
from sparsediff.metrics import video_psnr, video_ssim  # noqa: E402
from sparsediff.pipelines.prompts import load_prompts  # noqa: E402
from sparsediff.pipelines.toy_shapes import load_pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+")
    p.add_argument("--dense-steps", type=int, default=6)
    p.add_argument("--blocks", nargs="+", default=["128x64", "64x64"], help="QUERIESxKEYS per block")
    p.add_argument("--cdf", type=float, nargs="+", default=[0.7, 0.6])
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    prompts = args.prompt or [spec.prompt for spec in load_prompts(HOLDOUT)]
    blocks = [tuple(int(x) for x in text.split("x")) for text in args.blocks]
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for prompt in prompts:
        dense = render(pipe, prompt, lambda *call: None)
        for block_m, block_n in blocks:
            tile = choose_tile(GRID, block_m)
            for cdf in args.cdf:
                skipped: list[float] = []

                def masked(step, q, k, v):
                    if step < args.dense_steps:
                        return None
                    (mask,) = source_masks("oracle", q, k, (cdf,), block_m=block_m, block_n=block_n)
                    skipped.append(1.0 - float(mask.float().mean()))
                    return block_sparse_attention_reference(q, k, v, mask, block_m=block_m, block_n=block_n)

                frames = render(pipe, prompt, masked, tile)
                row = {"prompt": prompt, "block": [block_m, block_n], "tile": tile, "cdf": cdf,
                       "sparsity": sum(skipped) / len(skipped),
                       "psnr": video_psnr(frames, dense), "ssim": video_ssim(frames, dense)}
                rows.append(row)
                print(f"blocks {block_m}x{block_n} (tile {'x'.join(map(str, tile))}) cdf {cdf:g}: sparsity "
                      f"{row['sparsity']:.3f}, PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}  ({prompt})", flush=True)
    print("mean over the captions:")
    for block_m, block_n in blocks:
        for cdf in args.cdf:
            mine = [r for r in rows if r["block"] == [block_m, block_n] and r["cdf"] == cdf]
            print(f"blocks {block_m}x{block_n} cdf {cdf:g}: sparsity {sum(r['sparsity'] for r in mine) / len(mine):.3f}, "
                  f"PSNR {sum(r['psnr'] for r in mine) / len(mine):.2f} dB, SSIM {sum(r['ssim'] for r in mine) / len(mine):.3f}")
    if args.out:
        atomic_write_json(args.out, {"dense_steps": args.dense_steps, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
