"""Twenty-sixth session: q's self-similarity measured inside the scoring launch (`block_select(...,
sim_below=)`) against its own pass (`block_stats`) before it, at the four model shapes: the default
predictor (`sampled`, sim 0.2, cdf 0.95) with its lookup table, each CUDA-graphed, interleaved over
rounds, with cuDNN's graphed dense call as the yardstick; the two give the same flags and masks.

    OUT=DIR PYTHONPATH=/tmp/site:. python3 scripts/session26/fused_similarity.py [ROUNDS]

Writes $OUT/fused-similarity.json and prints a line per shape and round.
"""
import json
import os
import statistics
import sys

import torch

from sparsediff.attention import BLOCK_M, BLOCK_N, SAMPLED_QUERIES, head_thresholds, predict_with, sample_rows
from sparsediff.bench.kernel import GPU_SHAPES, SHAPES
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_select import block_select
from sparsediff.kernels.block_sparse_attn import build_block_lut
from sparsediff.kernels.block_stats import block_stats

REPLAYS = 30


def graphed_us(fn) -> float:
    """Median µs of one graph replay of fn, over REPLAYS replays timed with CUDA events."""
    replay = cuda_graphed(fn)
    replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def separate_pass(q, k, thresholds, text_tokens):
    """The sampled predictor as before: q's self-similarity in its own launch, then the scores."""
    n = q.shape[2]
    _, _, below = block_stats(q, BLOCK_M, pooled=False, sim_below=thresholds.sim)
    mask, _, _ = block_select(q, k, thresholds.cdf[0], n_tokens=n, block_m=BLOCK_M, block_n=BLOCK_N,
                              scale=q.shape[-1] ** -0.5, stride=1, q_tokens=BLOCK_M // SAMPLED_QUERIES["sampled"],
                              k_tokens=1, q_rows=sample_rows(n, SAMPLED_QUERIES["sampled"], q.device))
    mask = mask.contiguous()
    return mask, below, build_block_lut(mask, n, None, out_mask=mask, dense_rows=below, dense_tail_tokens=text_tokens)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rows = []
    for name in GPU_SHAPES:
        s = SHAPES[name]
        q, k, v = (torch.randn(s.batch, s.heads, s.tokens, s.head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        thresholds = head_thresholds([0.95], 0.2, s.heads, q.device)
        fused = lambda: predict_with(q, k, thresholds, method="sampled", scale=s.head_dim ** -0.5,  # noqa: E731
                                     kv_lens=None, dense_tail_tokens=s.text_tokens)
        separate = lambda: separate_pass(q, k, thresholds, s.text_tokens)  # noqa: E731
        new, = fused()
        old_mask, _, old_lut = separate()
        same = torch.equal(new.mask, old_mask) and torch.equal(new.lut.counts, old_lut.counts)
        dense_us = graphed_us(lambda: cudnn_dense(q, k, v))
        for r in range(rounds):
            row = {"shape": name, "round": r, "same_masks_and_counts": same, "cudnn_dense_graph_us": dense_us,
                   "separate_us": graphed_us(separate), "fused_us": graphed_us(fused)}
            row.update({f"{key}_of_dense": row[f"{key}_us"] / dense_us for key in ("separate", "fused")})
            rows.append(row)
            print(f"{name} round {r}: cuDNN {dense_us:.1f} us; separate pass {row['separate_us']:.1f} us "
                  f"({row['separate_of_dense']:.1%}), fused {row['fused_us']:.1f} us ({row['fused_of_dense']:.1%}); "
                  f"same masks and counts: {same}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    with open(os.path.join(os.environ["OUT"], "fused-similarity.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
