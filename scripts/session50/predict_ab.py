"""GPU time of the processors' prediction, CUDA-graphed, for whichever sparsediff is imported (an A/B aid:
run it for two trees in turn, e.g. one put first on PYTHONPATH).

    python scripts/session50/predict_ab.py --label NAME --out FILE.jsonl [SHAPE ...]   # default: flux cogvideox wan

Per model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k (seed 0) in diffusers' layout:
`predict_with` (default method, cdf 0.95, its lookup table and row order included) at sim 0 and at
the default sim threshold, captured in a CUDA graph; the median of three do_bench medians of the
replay, as a share of cuDNN's graphed dense call, and a digest of what it returns (mask, counts,
the listed LUT entries, row order) so that two trees' outputs can be compared. Appends one JSON
line per (shape, sim) to FILE.
"""
import argparse
import hashlib
import json
import statistics
from pathlib import Path

import torch
import triton

import sparsediff
from sparsediff.attention import DEFAULT_SIM_THRESHOLD, head_thresholds, predict_with
from sparsediff.bench.kernel import SHAPES, _make_qkv
from sparsediff.bench.timing import cuda_graphed, cudnn_dense


def bench(fn) -> float:
    return statistics.median(float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
                             for _ in range(3))


def digest(predicted) -> str:
    blocks, = predicted
    lut = blocks.lut
    listed = torch.arange(lut.indices.shape[-1], device=lut.indices.device) < lut.counts[..., None]
    parts = (blocks.mask, lut.counts, torch.where(listed, lut.indices.long(), -1), lut.order)
    return hashlib.sha256(b"".join(t.cpu().contiguous().numpy().tobytes() for t in parts)).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("shapes", nargs="*", default=["flux", "cogvideox", "wan"])
    args = parser.parse_args()
    print(f"{args.label}: sparsediff from {sparsediff.__file__}", flush=True)
    for name in args.shapes:
        s = SHAPES[name]
        torch.manual_seed(0)
        q, k, v = _make_qkv(s, torch.bfloat16, "cuda")
        dense_ms = bench(cuda_graphed(lambda: cudnn_dense(q, k, v)))
        for sim in (0.0, DEFAULT_SIM_THRESHOLD):
            thresholds = head_thresholds([0.95], sim, s.heads, q.device)

            def predict():
                return predict_with(q, k, thresholds, method="sampled", scale=s.head_dim**-0.5, kv_lens=None,
                                    dense_tail_tokens=s.text_tokens)

            ms = bench(cuda_graphed(predict))
            row = {"label": args.label, "shape": name, "sim": sim, "predict_us": ms * 1e3, "dense_ms": dense_ms,
                   "of_dense": ms / dense_ms, "digest": digest(predict()), "gpu": torch.cuda.get_device_name()}
            print(json.dumps(row), flush=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
