"""The Gluon Hopper kernel's grids side by side (a measurement aid, H100 / H200).

    python scripts/session55/persistent_ab.py --out DIR [SHAPE ...]    # default: flux wan hunyuan

Per model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k/v in diffusers' (B, N, H, D)
layout, random and video-like (local) masks at keep 1 / 0.25 / 0.1, heavy rows first: the kernel
alone (`block_sparse_attention_hopper`, its lookup table built) with one program a row, with a
persistent grid of one program an SM taking every SM-th row (static), and with one taking rows from
the counter (dynamic). Each is captured in a CUDA graph and timed in ROUNDS interleaved rounds
(median of triton's do_bench each), and reported as a share of cuDNN's graphed dense call per kept
block, as `bench kernel` reports its graphed ratios. The three outputs are compared bit for bit, and
the dynamic grid's counters must be back at zero. Writes DIR/persistent-ab.json after every shape.
"""
import argparse
import json
import statistics
from pathlib import Path

import torch
import triton

from sparsediff.bench.kernel import SHAPES, _make_qkv, _Timer, local_mask, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels import block_sparse_attn_hopper as hk
from sparsediff.kernels.block_sparse_attn import build_block_lut

ROUNDS = 3
KEEPS = (1.0, 0.25, 0.1)


bench = _Timer("cuda", warmup_ms=25, rep_ms=100)  # median of triton's do_bench, as `bench kernel` times


def run_shape(shape_name: str, sms: int) -> list[dict]:
    s = SHAPES[shape_name]
    q, k, v = _make_qkv(s, torch.bfloat16, "cuda")
    assert hk.hopper_unsupported(q, k, v, torch.empty_like(q)) is None, hk.hopper_unsupported(q, k, v, q)
    dense_ms = bench(cuda_graphed(lambda: cudnn_dense(q, k, v)))
    print(f"{shape_name}: cuDNN graphed {dense_ms:.3f} ms, {sms} SMs", flush=True)
    grids = {"row": {}, "static": {"programs": sms, "dynamic": False}, "dynamic": {"programs": sms, "dynamic": True}}
    rows = []
    for kind, make_mask in (("random", random_mask), ("local", local_mask)):
        for keep in KEEPS:
            mask = make_mask(s, keep, q.device)
            kept = mask.float().mean().item()
            lut = build_block_lut(mask, s.tokens)
            outs = {name: torch.empty_like(q) for name in grids}

            def call(name):
                hk.block_sparse_attention_hopper(q, k, v, outs[name], lut.counts, lut.indices, lut.order,
                                                 s.head_dim**-0.5, **grids[name])

            replays = {name: cuda_graphed(lambda n=name: call(n)) for name in grids}
            times = {name: [] for name in grids}
            for _ in range(ROUNDS):
                for name, replay in replays.items():
                    times[name].append(bench(replay))
            for name in grids:
                call(name)  # eager, after the replays: the outputs compared are these
            torch.cuda.synchronize()
            row = {"shape": shape_name, "mask": kind, "keep_target": keep, "keep": kept, "dense_graphed_ms": dense_ms,
                   "bit_equal": all(torch.equal(outs["row"], outs[name]) for name in grids),
                   "counters_zero": all(not c.any() for c in hk._WORK_COUNTERS.values())}
            for name in grids:
                ms = statistics.median(times[name])
                row[f"{name}_ms"], row[f"{name}_ms_rounds"] = ms, times[name]
                row[f"{name}_of_dense"] = dense_ms * kept / ms
            rows.append(row)
            print(f"  {kind} keep {keep} ({kept:.3f}): of cuDNN per kept block, one program a row "
                  f"{row['row_of_dense']:.3f}, static {row['static_of_dense']:.3f}, dynamic "
                  f"{row['dynamic_of_dense']:.3f}; bit-equal {row['bit_equal']}, counters zero "
                  f"{row['counters_zero']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("shapes", nargs="*", default=["flux", "wan", "hunyuan"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for shape_name in args.shapes:
        rows += run_shape(shape_name, sms)
        torch.cuda.empty_cache()
        (args.out / "persistent-ab.json").write_text(json.dumps(  # after every shape: a cut run keeps what finished
            {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "rounds": ROUNDS, "sms": sms, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
