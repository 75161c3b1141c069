"""`sparsediff bench predict`: how good and how cheap the block-mask predictors are.

Accuracy: on video-like workloads (sparsediff.workloads) in raster and 3D-tile token order, each
predictor's cdf_threshold is swept and every mask's sparsity is set against the attention error it
causes (relative L1 of the output vs the all-blocks output of the same kernel, so only skipping
counts). The oracle is top-CDF on the TRUE mean-over-queries block mass, computed blockwise
(chunks of query blocks, never N x N). Reported: sparsity reached at the error budget (5%) and
that as a fraction of the oracle's. Then the P·V skip (stage 2) on the default predictor's mask:
kept blocks it skips and the error it adds. On CUDA also: prediction time vs cuDNN SDPA dense at
the four model shapes, and sparse_attention (prediction included) at ~80% sparsity vs cuDNN
dense at the CogVideoX, Wan and Hunyuan shapes, bf16 and FP8 kernel, with each one's relative L1
error against dense; and, per sampled predictor, sparse_attention at the sparsest cdf that keeps
the error budget there (which predictor is faster at one quality). Each timing is taken as a
plain call and as a CUDA-graph replay, the graphed ones against cuDNN's graphed call. Writes
predict-<device>.json and .png under --out.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.bench.values import as_text, finite
from sparsediff.metrics import relative_l1
from sparsediff.pipelines.prompts import MAX_SEED

BUDGET = 0.05
CDF_SWEEP = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
PV_SWEEP = (1e-3, 1e-2, 1e-1, 0.5)
TILE = (2, 8, 8)
# Sizes of the accuracy workload: the Wan latent grid on CUDA, a reduced one on CPU.
ACCURACY = {"cuda": dict(grid=(21, 30, 52), heads=12, head_dim=128), "cpu": dict(grid=(8, 16, 16), heads=6, head_dim=64)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--grid", default=None, help="accuracy workload grid TxHxW (default: 21x30x52 cuda, 8x16x16 cpu)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=BUDGET, help="error budget (relative L1) for the summary")
    parser.add_argument("--out", default="bench-results", help="folder for the JSON and PNG")


def true_block_mass(q: torch.Tensor, k: torch.Tensor, block_m: int, block_n: int, budget_bytes: float = 2**30) -> torch.Tensor:
    """Exact mean-over-queries attention mass (B, H, nq, nk) per block pair, chunked over query
    blocks so no more than ~budget_bytes of scores exist at once."""
    b, h, n, d = q.shape
    nq, nk = -(-n // block_m), -(-n // block_n)
    mass = torch.empty(b, h, nq, nk, device=q.device)
    step = max(1, int(budget_bytes // (b * h * block_m * n * 4)))
    kt = k.float().transpose(-1, -2)
    for i0 in range(0, nq, step):
        i1 = min(nq, i0 + step)
        p = torch.softmax(q[:, :, i0 * block_m : i1 * block_m].float() @ kt * d**-0.5, dim=-1)
        p = torch.nn.functional.pad(p, (0, nk * block_n - n, 0, (i1 - i0) * block_m - p.shape[2]))
        rows = (n - torch.arange(i0, i1, device=q.device) * block_m).clamp(max=block_m)
        mass[:, :, i0:i1] = p.view(b, h, i1 - i0, block_m, nk, block_n).sum((3, 5)) / rows[:, None]
    return mass


def sparsity_at_budget(points: list[tuple[float, float]], budget: float) -> float:
    """Highest sparsity with error <= budget along the (sparsity, error) curve, interpolating
    linearly between the two sweep points that bracket the budget."""
    pts = sorted(points)
    best = max([s for s, e in pts if e <= budget], default=0.0)
    for (s0, e0), (s1, e1) in zip(pts, pts[1:]):
        if e0 <= budget < e1:
            best = max(best, s0 + (s1 - s0) * (budget - e0) / (e1 - e0))
    return best


def _timeit(fn, device: torch.device, reps: int = 10) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dense_times(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, device: torch.device) -> dict[str, float]:
    """cuDNN dense's time (ms) as a plain call and as a CUDA-graph replay: the yardsticks of our plain
    and our graphed timings. At FLUX's length the plain call carries the host's launch (0.42-0.51 ms
    against 0.436 ms graphed, H200), so graphed times are taken against the graphed call."""
    call = lambda: cudnn_dense(q, k, v)  # noqa: E731
    return {"cudnn_dense_ms": _timeit(call, device) * 1e3, "cudnn_dense_graph_ms": _timeit(cuda_graphed(call), device) * 1e3}


def _accuracy(w, order: str, device: torch.device, budget: float) -> dict:
    from sparsediff._runtime import kernels_available
    from sparsediff.attention import BLOCK_M, BLOCK_N, DEFAULT_METHOD, METHODS, block_sparse_attention, predict_block_mask
    from sparsediff.kernels.block_select_reference import top_cdf
    from sparsediff.workloads import to_tile_order

    q, k, v = w.q, w.k, w.v
    if order == "tiles":
        q, k, v = (to_tile_order(x, w.grid, TILE) for x in (q, k, v))
    b, h, n, _ = q.shape
    full = torch.ones(b, h, -(-n // BLOCK_M), -(-n // BLOCK_N), dtype=torch.bool, device=device)
    ref = block_sparse_attention(q, k, v, full)

    def point(mask: torch.Tensor) -> tuple[float, float]:
        return 1.0 - float(mask.float().mean()), float(relative_l1(block_sparse_attention(q, k, v, mask), ref))

    mass = true_block_mass(q, k, BLOCK_M, BLOCK_N)
    series = {"oracle": [point(top_cdf(mass, torch.full((h,), t, device=device))) for t in CDF_SWEEP]}
    # Predictors judged on their estimates alone (sim 0 trusts every block); then the default
    # predictor with its default similarity threshold, as users get it.
    for method in METHODS:
        series[method] = [point(predict_block_mask(q, k, t, 0.0, method=method)) for t in CDF_SWEEP]
    series[f"{DEFAULT_METHOD} (default sim)"] = [point(predict_block_mask(q, k, t, method=DEFAULT_METHOD)) for t in CDF_SWEEP]
    series["pooled (sim 0.6)"] = [point(predict_block_mask(q, k, t, 0.6, method="pooled")) for t in CDF_SWEEP]
    at = {name: sparsity_at_budget(pts, budget) for name, pts in series.items()}
    # "nan" where the oracle reaches no sparsity within the budget (a strict one): strict JSON has no NaN.
    frac = {name: finite(s / at["oracle"] if at["oracle"] > 0 else math.nan) for name, s in at.items()}

    # Stage 2 on the default predictor's mask at the sparsest sweep point within the budget.
    ok = [t for t, (_, e) in zip(CDF_SWEEP, series[DEFAULT_METHOD]) if e <= budget]
    cdf = min(ok) if ok else CDF_SWEEP[-1]
    mask = predict_block_mask(q, k, cdf, 0.0)
    base_err = float(relative_l1(block_sparse_attention(q, k, v, mask), ref))
    kept = int(mask.sum())
    pv: list[dict] | str = "skipped: the CPU reference never skips P·V (run under TRITON_INTERPRET=1 or on CUDA)"
    if kernels_available(q.device):
        pv = []
        for thr in PV_SWEEP:
            o, skips = block_sparse_attention(q, k, v, mask, pv_threshold=thr, return_pv_skips=True)
            pv.append({"pv_threshold": thr, "skipped_of_kept": int(skips.sum()) / max(kept, 1),
                       "error": float(relative_l1(o, ref)), "added_error": float(relative_l1(o, ref)) - base_err})
    return {"order": order, "tokens": n, "sparsity_at_budget": at, "fraction_of_oracle": frac,
            "curves": {name: [{"cdf": t, "sparsity": s, "error": e} for t, (s, e) in zip(CDF_SWEEP, pts)]
                       for name, pts in series.items()},
            "pv_skip": {"method": DEFAULT_METHOD, "cdf_threshold": cdf, "stage1_error": base_err, "sweep": pv}}


def _overhead(device: torch.device) -> list[dict]:
    from sparsediff.attention import METHODS, predict_block_mask
    from sparsediff.bench.kernel import GPU_SHAPES, SHAPES

    rows = []
    for name in GPU_SHAPES:
        s = SHAPES[name]
        q, k, v = (torch.randn(s.batch, s.heads, s.tokens, s.head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
        row = {"shape": name, **_dense_times(q, k, v, device)}
        for method in METHODS:
            predict = lambda: predict_block_mask(q, k, dense_tail_tokens=s.text_tokens, method=method)  # noqa: E731
            row[f"{method}_ms"] = _timeit(predict, device) * 1e3
            row[f"{method}_fraction_of_dense"] = row[f"{method}_ms"] / row["cudnn_dense_ms"]
            row[f"{method}_graph_ms"] = _timeit(cuda_graphed(predict), device) * 1e3
            row[f"{method}_graph_fraction_of_dense"] = row[f"{method}_graph_ms"] / row["cudnn_dense_graph_ms"]
        rows.append(row)
        del q, k, v
    return rows


def cdf_for_sparsity(q: torch.Tensor, k: torch.Tensor, sparsity: float, **predict_kwargs) -> float:
    """The cdf threshold (sim 0) at which the default predictor's mask on q, k just exceeds
    `sparsity` (bisection, 12 halvings); the smallest cdf tried where no cdf reaches it."""
    from sparsediff.attention import predict_block_mask

    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        reached = 1.0 - float(predict_block_mask(q, k, mid, 0.0, **predict_kwargs).float().mean())
        lo, hi = (mid, hi) if reached > sparsity else (lo, mid)
    return lo if lo > 0.0 else hi  # cdf 0 asks for no attention mass: refused


def _video_shapes(device: torch.device, seed: int):
    """(name, q, k, v, predictor keywords) of the video workloads at the CogVideoX, Wan and Hunyuan
    shapes in tile order, one at a time (the next is built after the caller is done with one)."""
    from sparsediff.bench.kernel import SHAPES
    from sparsediff.workloads import to_tile_order, video_workload

    for name in ("cogvideox", "wan", "hunyuan"):
        s = SHAPES[name]
        w = video_workload(s.grid, heads=s.heads, head_dim=s.head_dim, text_tokens=s.text_tokens, seed=seed,
                           dtype=torch.bfloat16, device=device)
        q, k, v = (to_tile_order(x, s.grid, TILE) for x in (w.q, w.k, w.v))
        del w
        yield name, q, k, v, dict(dense_tail_tokens=s.text_tokens)
        del q, k, v
        torch.cuda.empty_cache()


def _speed(device: torch.device, seed: int) -> list[dict]:
    from sparsediff.attention import predict_block_mask, sparse_attention

    rows = []
    for name, q, k, v, kw in _video_shapes(device, seed):
        cdf = cdf_for_sparsity(q, k, 0.8, **kw)
        o, sparsity = sparse_attention(q, k, v, cdf, 0.0, return_sparsity=True, **kw)
        ref = cudnn_dense(q, k, v)
        predict = _timeit(lambda: predict_block_mask(q, k, cdf, 0.0, **kw), device)
        row = {"shape": name, "cdf_threshold": cdf, "sparsity": sparsity, **_dense_times(q, k, v, device),
               "prediction_ms": predict * 1e3}
        for path, fp8 in (("", False), ("fp8_", True)):  # the bf16 kernel, then the FP8 path
            run = lambda: sparse_attention(q, k, v, cdf, 0.0, fp8=fp8, **kw)  # noqa: E731
            sparse, graphed = _timeit(run, device) * 1e3, _timeit(cuda_graphed(run), device) * 1e3
            row.update({f"{path}error": float(relative_l1(run() if fp8 else o, ref)), f"{path}sparse_attention_ms": sparse,
                        f"{path}speedup": row["cudnn_dense_ms"] / sparse, f"{path}sparse_attention_graph_ms": graphed,
                        f"{path}speedup_graph": row["cudnn_dense_graph_ms"] / graphed})
        rows.append(row)
    return rows


def _equal_error(device: torch.device, seed: int, budget: float) -> list[dict]:
    """Per sampled predictor (SAMPLED_QUERIES) at the video shapes: the lowest cdf (sim 0) whose
    sparse_attention stays within `budget` relative L1 of dense (bisection, 10 halvings), its
    sparsity, and its CUDA-graphed time (prediction included) against cuDNN dense graphed. Which predictor
    is faster at one quality: a dearer prediction may buy fewer kept blocks."""
    from sparsediff.attention import SAMPLED_QUERIES, sparse_attention

    rows = []
    for name, q, k, v, kw in _video_shapes(device, seed):
        ref = cudnn_dense(q, k, v)
        dense = _dense_times(q, k, v, device)
        for method in SAMPLED_QUERIES:
            def error(cdf: float) -> float:
                return float(relative_l1(sparse_attention(q, k, v, cdf, 0.0, method=method, **kw), ref))

            lo, hi = 0.0, 1.0  # error(hi) <= budget throughout: cdf 1 keeps every block
            for _ in range(10):
                mid = (lo + hi) / 2
                lo, hi = (lo, mid) if error(mid) <= budget else (mid, hi)
            sparsity = sparse_attention(q, k, v, hi, 0.0, method=method, return_sparsity=True, **kw)[1]
            graphed = _timeit(cuda_graphed(lambda: sparse_attention(q, k, v, hi, 0.0, method=method, **kw)), device) * 1e3
            rows.append({"shape": name, "method": method, "cdf_threshold": hi, "sparsity": sparsity,
                         "error": error(hi), **dense, "sparse_attention_graph_ms": graphed,
                         "speedup_graph": dense["cudnn_dense_graph_ms"] / graphed})
    return rows


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsediff.io import atomic_output

    accs = results["accuracy"]
    fig, axes = plt.subplots(1, len(accs), figsize=(6.5 * len(accs), 4.8), squeeze=False)
    for ax, acc in zip(axes[0], accs):
        for name, pts in acc["curves"].items():
            style = "k-" if name == "oracle" else "-"
            ax.plot([p["error"] for p in pts], [p["sparsity"] for p in pts], style, marker=".",
                    label=f"{name} ({as_text(acc['fraction_of_oracle'][name], '.2f')} of oracle)")
        ax.axvline(results["budget"], color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("attention error (relative L1 vs dense)")
        ax.set_ylabel("block sparsity")
        ax.set_title(f"{acc['order']} order, grid {'x'.join(map(str, results['workload']['grid']))}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import triton

    from sparsediff.attention import METHODS
    from sparsediff.io import atomic_write_json, writable_dir
    from sparsediff.workloads import video_workload

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if not 0 < args.budget < 1:
        raise ValueError(f"--budget must lie in (0, 1), got {args.budget}")
    if not 0 <= args.seed <= MAX_SEED:  # torch.Generator.manual_seed said only "Overflow when unpacking long long"
        raise ValueError(f"--seed must be in [0, {MAX_SEED}] (64 bits), got {args.seed}")
    size = dict(ACCURACY[device.type])
    if args.grid:
        try:
            size["grid"] = tuple(int(x) for x in args.grid.lower().split("x"))
        except ValueError:
            raise ValueError(f"--grid must look like 8x16x16, got {args.grid!r}") from None
    # `is None`, not `or`: a 0 given is refused by video_workload, not replaced by the default.
    size["heads"] = size["heads"] if args.heads is None else args.heads
    size["head_dim"] = size["head_dim"] if args.head_dim is None else args.head_dim
    out = writable_dir(args.out)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    w = video_workload(size["grid"], size["heads"], size["head_dim"], seed=args.seed, dtype=dtype, device=device)
    # Which run, as bench kernel records it: the timings depend on the torch and Triton versions.
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "budget": args.budget, "workload": {**size, "seed": args.seed, "dtype": str(dtype)},
               "accuracy": []}
    for order in ("raster", "tiles"):
        acc = _accuracy(w, order, device, args.budget)
        results["accuracy"].append(acc)
        print(f"[{order}] sparsity at {args.budget:.0%} error (fraction of oracle): "
              + ", ".join(f"{k} {v:.3f} ({as_text(acc['fraction_of_oracle'][k], '.2f')})" for k, v in acc["sparsity_at_budget"].items()),
              flush=True)
        for p in acc["pv_skip"]["sweep"] if isinstance(acc["pv_skip"]["sweep"], list) else []:
            print(f"[{order}] P·V skip {p['pv_threshold']:g}: skips {p['skipped_of_kept']:.3f} of kept blocks, "
                  f"error {acc['pv_skip']['stage1_error']:.4f} -> {p['error']:.4f}", flush=True)
    del w
    if device.type == "cuda":
        results["overhead"] = _overhead(device)
        for row in results["overhead"]:
            print(f"[overhead] {row['shape']}: cuDNN dense {row['cudnn_dense_ms']:.3f} ms (graphed {row['cudnn_dense_graph_ms']:.3f}); "
                  + ", ".join(f"{m} {row[f'{m}_fraction_of_dense']:.1%} (graphed {row[f'{m}_graph_fraction_of_dense']:.1%})"
                              for m in METHODS),
                  flush=True)
        results["speed"] = _speed(device, args.seed)
        for row in results["speed"]:
            print(f"[speed] {row['shape']}: sparsity {row['sparsity']:.3f}, sparse_attention {row['sparse_attention_ms']:.2f} ms "
                  f"(prediction {row['prediction_ms']:.2f}) vs cuDNN dense {row['cudnn_dense_ms']:.2f} ms: {row['speedup']:.2f}x; "
                  f"CUDA-graphed {row['sparse_attention_graph_ms']:.2f} ms vs {row['cudnn_dense_graph_ms']:.2f} ms: "
                  f"{row['speedup_graph']:.2f}x, error {row['error']:.4f}; "
                  f"FP8 {row['fp8_sparse_attention_ms']:.2f} ms: {row['fp8_speedup']:.2f}x, CUDA-graphed "
                  f"{row['fp8_speedup_graph']:.2f}x, error {row['fp8_error']:.4f}", flush=True)
        results["equal_error"] = _equal_error(device, args.seed, args.budget)
        for row in results["equal_error"]:
            print(f"[equal error] {row['shape']} {row['method']}: cdf {row['cdf_threshold']:.4f}, error {row['error']:.4f}, "
                  f"sparsity {row['sparsity']:.3f}, sparse_attention CUDA-graphed {row['sparse_attention_graph_ms']:.2f} ms "
                  f"vs cuDNN dense graphed {row['cudnn_dense_graph_ms']:.2f} ms: {row['speedup_graph']:.2f}x", flush=True)
    else:
        results["overhead"] = results["speed"] = results["equal_error"] = "skipped: timings need CUDA"
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(out / f"predict-{device.type}.json", results)
    _plot(results, out / f"predict-{device.type}.png")
    print(f"wrote {out / f'predict-{device.type}.json'} and .png ({results['seconds']:.0f} s)")
    return 0
