"""The attention kernel with one program a row against a persistent grid, side by side in one process
(a measurement aid).

    python scripts/session51/persistent_ab.py --out DIR [SHAPE ...]    # default: flux cogvideox wan hunyuan

Per model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k/v in diffusers' (B, N, H, D) layout and
random block masks at keep 1 / 0.25 / 0.1, the lookup table built once: the kernel alone
(`attention_from_lut`), CUDA-graphed, with the declared tile config and with the same config on a persistent
grid of two programs an SM (registers capped at 128 so that two fit), ROUNDS interleaved rounds of do_bench's
median; of cuDNN's graphed dense call per kept block (`bench kernel`'s ratio). Outputs compared bit for bit.
Writes DIR/persistent-ab.json.
"""
import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton

from sparsediff.bench.kernel import SHAPES, _make_qkv, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_sparse_attn import attention_from_lut, build_block_lut, tile_config

ROUNDS = 3
KEEPS = (1.0, 0.25, 0.1)


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def run_shape(shape_name: str) -> list[dict]:
    s = SHAPES[shape_name]
    q, k, v = _make_qkv(s, torch.bfloat16, "cuda")
    dense_ms = bench(cuda_graphed(lambda: cudnn_dense(q, k, v)))
    print(f"{shape_name}: cuDNN graphed {dense_ms:.3f} ms", flush=True)
    declared = tile_config(q.shape[-1], q.dtype, q.device, q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2])
    persistent = replace(declared, programs_per_sm=2, max_registers=declared.max_registers or 128)
    rows = []
    for keep in KEEPS:
        lut = build_block_lut(random_mask(s, keep, q.device), k.shape[2])
        replays, outs = {}, {}
        for name, config in (("declared", declared), ("persistent", persistent)):
            captured = []
            replays[name] = cuda_graphed(lambda c=config: captured.append(attention_from_lut(
                q, k, v, lut, s.head_dim**-0.5, config=c)) or captured[-1])
            outs[name] = captured[-1]
        times = {name: [] for name in replays}
        for _ in range(ROUNDS):
            for name, replay in replays.items():
                times[name].append(bench(replay))
        for replay in replays.values():
            replay()
        torch.cuda.synchronize()
        row = {"shape": shape_name, "keep": keep, "dense_graphed_ms": dense_ms,
               "configs": {name: asdict(c) for name, c in (("declared", declared), ("persistent", persistent))},
               "equal": torch.equal(outs["declared"], outs["persistent"])}
        for name, ts in times.items():
            row[f"{name}_ms"] = ts
            row[f"{name}_of_cudnn"] = dense_ms * keep / statistics.median(ts)
        row["persistent_over_declared"] = statistics.median(times["persistent"]) / statistics.median(times["declared"])
        rows.append(row)
        print(f"  keep {keep}: declared {statistics.median(times['declared']) * 1e3:.1f} us "
              f"({row['declared_of_cudnn']:.3f} of cuDNN), persistent "
              f"{statistics.median(times['persistent']) * 1e3:.1f} us ({row['persistent_of_cudnn']:.3f}); "
              f"ratio {row['persistent_over_declared']:.3f}; rounds {times}; bit-equal {row['equal']}", flush=True)
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
        (args.out / "persistent-ab.json").write_text(json.dumps(  # after every shape: a cut run keeps what finished
            {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
             "rounds": ROUNDS, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
