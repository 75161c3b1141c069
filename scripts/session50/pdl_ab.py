"""Programmatic dependent launch (PDL) off and on, side by side in one process (a measurement aid).

    python scripts/session50/pdl_ab.py --out DIR [SHAPE ...]    # default: flux cogvideox wan hunyuan

Per model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k/v in diffusers' (B, N, H, D)
layout, each call captured in a CUDA graph once with SPARSEDIFF_PDL=0 and once with 1, the two
replays timed in ROUNDS interleaved rounds (median of triton's do_bench each):
- the processors' prediction (`predict_with`, default method, cdf 0.95, its lookup table and row
  order included) at sim 0 and at the default sim threshold, as a share of cuDNN's graphed call
  (#4's overhead);
- `block_sparse_attention` on random masks at keep 1 / 0.25 / 0.1 (lookup table, row order and
  kernel), of cuDNN's graphed call per kept block (`bench kernel`'s graphed ratio, #13).
The outputs of each pair (masks, lookup tables, attention) are compared bit for bit, after the
replays and from eager calls: a missing wait would show there as a difference.
Writes DIR/pdl-ab.json.
"""
import argparse
import json
import os
import statistics
from pathlib import Path

import torch
import triton

from sparsediff.attention import DEFAULT_SIM_THRESHOLD, block_sparse_attention, head_thresholds, predict_with
from sparsediff.bench.kernel import SHAPES, _make_qkv, _Timer, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_sparse_attn import BlockLut

ROUNDS = 3
KEEPS = (1.0, 0.25, 0.1)


def with_pdl(on: bool, fn):
    """fn run with PDL on or off (the launchers read SPARSEDIFF_PDL at every launch)."""
    os.environ["SPARSEDIFF_PDL"] = "1" if on else "0"
    try:
        return fn()
    finally:
        os.environ.pop("SPARSEDIFF_PDL")


bench = _Timer("cuda", warmup_ms=25, rep_ms=100)  # median of triton's do_bench, as `bench kernel` times


def graphed_pair(call):
    """Replays of `call` captured with PDL off and on, and the tensors each replay rewrites."""
    pair = {}
    for on in (False, True):
        outputs = []
        replay = with_pdl(on, lambda: cuda_graphed(lambda: outputs.append(call()) or outputs[-1]))
        pair[on] = (replay, outputs[-1])  # the captured call's outputs live in the graph's memory
    return pair


def flat_tensors(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, BlockLut):  # a row's entries past its count are unspecified
        listed = torch.arange(result.indices.shape[-1], device=result.indices.device) < result.counts[..., None]
        return [result.counts, result.order, torch.where(listed, result.indices, 0)]
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in flat_tensors(r)]
    return [t for r in vars(result).values() for t in flat_tensors(r)]  # PredictedBlocks, BlockLut


def same_bits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(flat_tensors(a), flat_tensors(b), strict=True))


def measure(name: str, call, dense_ms: float, keep: float | None) -> dict:
    pair = graphed_pair(call)
    times = {False: [], True: []}
    for _ in range(ROUNDS):
        for on in (False, True):
            times[on].append(bench(pair[on][0]))
    for on in (False, True):
        pair[on][0]()
    torch.cuda.synchronize()
    eager = [with_pdl(on, call) for on in (False, True)]
    torch.cuda.synchronize()
    row = {"call": name, "keep": keep, "off_ms": times[False], "on_ms": times[True],
           "off_median_ms": statistics.median(times[False]), "on_median_ms": statistics.median(times[True]),
           "replays_equal": same_bits(pair[False][1], pair[True][1]), "eager_equal": same_bits(*eager)}
    row["on_over_off"] = row["on_median_ms"] / row["off_median_ms"]
    for on, label in ((False, "off"), (True, "on")):
        ms = row[f"{label}_median_ms"]
        row[f"{label}_of_dense"] = ms / dense_ms if keep is None else dense_ms * keep / ms
    return row


def run_shape(shape_name: str) -> list[dict]:
    s = SHAPES[shape_name]
    q, k, v = _make_qkv(s, torch.bfloat16, "cuda")
    dense_ms = bench(cuda_graphed(lambda: cudnn_dense(q, k, v)))
    print(f"{shape_name}: cuDNN graphed {dense_ms:.3f} ms", flush=True)
    calls = []
    for sim in (0.0, DEFAULT_SIM_THRESHOLD):
        thresholds = head_thresholds([0.95], sim, s.heads, q.device)
        calls.append((f"predict sim {sim}", None, lambda t=thresholds: predict_with(
            q, k, t, method="sampled", scale=s.head_dim**-0.5, kv_lens=None, dense_tail_tokens=s.text_tokens)))
    for keep in KEEPS:
        mask = random_mask(s, keep, q.device)
        calls.append(("block_sparse_attention", keep, lambda m=mask: block_sparse_attention(q, k, v, m)))
    rows = []
    for name, keep, call in calls:
        row = {"shape": shape_name, "dense_graphed_ms": dense_ms, **measure(name, call, dense_ms, keep)}
        rows.append(row)
        what = "of dense" if keep is None else "of cuDNN per kept block"
        print(f"  {name}{'' if keep is None else f' keep {keep}'}: off {row['off_median_ms'] * 1e3:.1f} us, "
              f"on {row['on_median_ms'] * 1e3:.1f} us (on/off {row['on_over_off']:.3f}); {what} "
              f"{row['off_of_dense']:.3f} -> {row['on_of_dense']:.3f}; bit-equal replays "
              f"{row['replays_equal']}, eager {row['eager_equal']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("shapes", nargs="*", default=["flux", "cogvideox", "wan", "hunyuan"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape_name in args.shapes:
        rows += run_shape(shape_name)
        torch.cuda.empty_cache()
        (args.out / "pdl-ab.json").write_text(json.dumps(  # after every shape: a cut run keeps what finished
            {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "rounds": ROUNDS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
