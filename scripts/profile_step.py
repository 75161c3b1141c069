"""Where one sparse denoising step of a real-config transformer spends its time (a diagnostic).

    python scripts/profile_step.py FAMILY [--compile] [--cdf 0.15] [--fp8] [--frames N] [--python] [--attention-free]

Builds the family's transformer as `sparsediff bench e2e` does (random bf16 weights, real
resolution), applies sparsediff with one dense step, runs the dense step and two sparse warm-up
steps (compilation), then profiles one sparse step: wall time, the GPU's busy time (kernel time
summed; one stream, so the rest of the wall time is the GPU waiting for the host), kernel time
grouped by what it is for, the top kernels, the host calls that wait for the device, and the
host's costliest calls (a step whose GPU busy time is well under its wall time waits for them).
With --python, one more sparse step runs under cProfile: when the host returned from the forward
against when the GPU finished, and the Python functions of sparsediff, Triton and torch's op
dispatch that took the host longest, per attention call.
With --attention-free, the profiled step is instead `bench e2e`'s attention-free step (self-attention
replaced by a copy of the query, no sparsediff), whose time the attainable bound counts as the part
of a step that is not attention: its GPU busy time against a sparse step's non-attention groups
shows whether that stand-in costs what the rest of a real step costs.
"""
import argparse
import cProfile
import pstats
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.nn.attention import sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import sparsediff
from sparsediff.bench.e2e import CASES, _attention_free, _build, _sdpa_priority

GROUPS = (  # (group, substrings of kernel names), first match wins
    ("attention kernel", ("_block_sparse_attn_kernel",)),
    ("prediction", ("_partial_mass_kernel", "_combine_select_kernel", "_block_stats_kernel", "_select_kernel")),
    ("lookup table and row order", ("_build_lut_kernel", "_heavy_rows_first_kernel")),
    ("FP8 quantisation", ("_quantize_fp8_kernel", "_channel_partials_kernel", "_channel_finish_kernel")),
    # Inductor's fused kernels name the ops they fuse ("..._copy_mul_...", "..._cudnn_attention_..."):
    # a group of their own, before the groups those words would match.
    ("inductor fusions (norms, elementwise, copies)", ("triton_",)),
    ("dense attention (cuDNN/flash)", ("cudnn", "flash", "fmha", "sm90_xmma", "attention")),
    ("gathers (token order, sampled rows)", ("index_elementwise", "gather", "index_select", "indexSelect")),
    ("matmuls", ("gemm", "nvjet", "cutlass", "sm90_", "xmma")),
    ("copies", ("direct_copy", "memcpy", "clone")),
)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy ")


def _group(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(key.lower() in lowered for key in keys):
            return group
    return "other (norms, elementwise)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(CASES))
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cdf", type=float, default=0.15)
    parser.add_argument("--fp8", action="store_true", help="the FP8 path (setting B)")
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--python", action="store_true", help="also profile one sparse step's Python (cProfile)")
    parser.add_argument("--attention-free", action="store_true",
                        help="profile bench e2e's attention-free step instead of a sparse one")
    args = parser.parse_args()
    case = CASES[args.family]
    model, inputs = _build(case, args.frames or case.frames)
    t0 = float(inputs["timestep"].max()) * 2
    timesteps = [torch.full_like(inputs["timestep"], t0 * (8 - i) / 8) for i in range(6)]
    if args.compile:
        if getattr(model, "_repeated_blocks", None):
            model.compile_repeated_blocks(fullgraph=True)
        else:
            model = torch.compile(model)
    handle = None if args.attention_free else sparsediff.apply(
        model, cdf_threshold=args.cdf, sim_threshold=0.0, dense_steps=1, token_order="tiles", fp8=args.fp8)

    def stand_in():  # a fresh context each time: a generator context manager is entered once
        return _attention_free(None) if args.attention_free else nullcontext()

    with torch.no_grad(), sdpa_kernel(_sdpa_priority(), set_priority=True), stand_in():
        for t in timesteps[:4]:  # one dense step, then sparse warm-up steps (or attention-free ones)
            model(**dict(inputs, timestep=t))
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            model(**dict(inputs, timestep=timesteps[4]))
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]
    busy = sum(e.device_time_total for e in kernels) / 1e6
    by_group: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_group[_group(e.key)] += e.device_time_total / 1e6
    waits = {e.key: e.count for e in events if any(e.key.startswith(w) for w in WAITS)}
    what = "attention-free step" if handle is None else \
        f"{'FP8 ' if args.fp8 else ''}sparse step (sparsity {handle.stats.mean_sparsity():.3f})"
    print(f"{args.family} {'compiled' if args.compile else 'eager'} {what}: wall {wall * 1e3:.1f} ms (profiled), "
          f"GPU busy {busy * 1e3:.1f} ms ({busy / wall:.0%}), device waits {waits or 'none'}")
    for group, seconds in sorted(by_group.items(), key=lambda item: -item[1]):
        print(f"  {seconds * 1e3:8.2f} ms  {seconds / busy:5.1%}  {group}")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:15]:
        print(f"      {e.device_time_total / 1e3:8.2f} ms  x{e.count:<4d} {e.key[:100]}")
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    for e in host[:12]:
        print(f"      host {e.self_cpu_time_total / 1e3:8.2f} ms  x{e.count:<5d} {e.key[:90]}")
    if args.python:
        with stand_in():
            _python_profile(model, dict(inputs, timestep=timesteps[5]))


def _python_profile(model, inputs: dict) -> None:
    """One sparse step under cProfile: host return vs GPU end, and the costliest Python per call."""
    profiler = cProfile.Profile()
    with torch.no_grad(), sdpa_kernel(_sdpa_priority(), set_priority=True):
        torch.cuda.synchronize()
        started = time.perf_counter()
        profiler.enable()
        model(**inputs)
        profiler.disable()
        returned = time.perf_counter() - started
        torch.cuda.synchronize()
        finished = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    attend_calls = next((v[1] for (path, _, name), v in stats.stats.items()
                         if name == "attend" and path.endswith("controller.py")), 0)
    print(f"python-profiled step: host returned after {returned * 1e3:.1f} ms, GPU done after {finished * 1e3:.1f} ms "
          f"(cProfile slows the host), {attend_calls} controller.attend calls")
    rows = [(v[2], v[3], v[1], f"{path.rsplit('site-packages/', 1)[-1].rsplit('/work/', 1)[-1]}:{line} {name}")
            for (path, line, name), v in stats.stats.items()
            if any(key in path for key in ("sparsediff", "triton", "torch/_ops", "torch/_library"))]
    per = max(attend_calls, 1)
    print("  tottime per call | cumtime per call | calls | function (sparsediff, Triton, torch op dispatch)")
    for tottime, cumtime, count, where in sorted(rows, key=lambda r: -r[1])[:30]:
        print(f"  {tottime / per * 1e6:8.1f} us | {cumtime / per * 1e6:8.1f} us | {count:6d} | {where}")


if __name__ == "__main__":
    main()
