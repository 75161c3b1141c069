"""Twenty-fourth session: which of the toy model's layers can lose attention blocks without hurting
the frames? (CPU, fp32, shipped weights.)

    python scripts/session24/toy_layer_sensitivity.py --prompt "..." [--cdf 0.6] [--dense-steps 6] [--sets 0,1,2,4,5 ...]

Renders each caption dense (seed 0, 16 steps), then once per layer with only that layer's video
self-attention calls after the dense steps computed on the oracle's blocks (top `--cdf` of the true
block mass, one threshold for every head; the other layers dense), and once with every layer so.
--sets: those layer sets instead. Reports, per run, the share of the chosen layers' blocks skipped,
the share of all blocks skipped, and PSNR / SSIM / MSE against the dense clip. If the layers' errors
added up, the all-layer MSE would be the sum of the single-layer ones: the last line compares the
two. A layer whose MSE is a small share of the sum could take a low threshold and one that dominates
a high one: per-layer thresholds from frame sensitivity rather than from a uniform attention-error
budget. The layers are counted by call order within a step (the pipeline batches the CFG pair into
one transformer call).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from toy_attention_sparsity import render, source_masks  # noqa: E402

from sparsediff.attention import block_sparse_attention  # noqa: E402
from sparsediff.io import atomic_write_json  # noqa: E402
from sparsediff.metrics import video_psnr, video_ssim  # noqa: E402
from sparsediff.pipelines.toy_shapes import load_pipeline  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", nargs="+", default=["a blue square bounces, a yellow triangle rotates on a checkered background"])
    p.add_argument("--cdf", type=float, default=0.6)
    p.add_argument("--dense-steps", type=int, default=6)
    p.add_argument("--sets", nargs="+", type=lambda text: [int(i) for i in text.split(",")],
                   help="comma-separated layer sets to run instead of each layer alone and all of them")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    n_layers = pipe.transformer.config.num_layers
    rows = []
    for prompt in args.prompt:
        dense = render(pipe, prompt, lambda *call: None)
        for layers in args.sets or [[i] for i in range(n_layers)] + [list(range(n_layers))]:
            calls = {"step": -1, "layer": 0}
            skipped: list[float] = []

            def masked(step, q, k, v):
                if step != calls["step"]:
                    calls.update(step=step, layer=0)
                layer = calls["layer"]
                calls["layer"] += 1
                if step < args.dense_steps:
                    return None
                if layer not in layers:
                    skipped.append(0.0)
                    return None
                (mask,) = source_masks("oracle", q, k, (args.cdf,))
                skipped.append(1.0 - float(mask.float().mean()))
                return block_sparse_attention(q, k, v, mask)

            frames = render(pipe, prompt, masked)
            psnr = video_psnr(frames, dense)
            row = {"prompt": prompt, "layers": layers, "sparsity_all": sum(skipped) / len(skipped),
                   "sparsity_layers": sum(skipped) / len(skipped) * n_layers / len(layers),
                   "psnr": psnr, "ssim": video_ssim(frames, dense), "mse": 10.0 ** (-psnr / 10.0)}  # pixels in [0, 1]
            rows.append(row)
            print(f"layers {','.join(map(str, layers)):11s} cdf {args.cdf:g}: layer sparsity {row['sparsity_layers']:.3f}, "
                  f"of all blocks {row['sparsity_all']:.3f}, PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, "
                  f"MSE {row['mse']:.2e}  ({prompt})", flush=True)
        if args.sets:
            continue
        singles = [r["mse"] for r in rows[-n_layers - 1:-1]]
        print(f"sum of single-layer MSEs {sum(singles):.2e} against all layers {rows[-1]['mse']:.2e}; shares "
              + " ".join(f"{m / sum(singles):.2f}" for m in singles), flush=True)
    if args.out:
        atomic_write_json(args.out, {"cdf": args.cdf, "dense_steps": args.dense_steps, "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
