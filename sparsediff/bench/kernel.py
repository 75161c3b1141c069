"""`sparsediff bench kernel`: block_sparse_attention against cuDNN SDPA, FA2 SDPA and FlexAttention.

For each shape and keep fraction, two masks: `random` (the same number of kept key blocks in every
query-block row) and `local` (per query block, the key blocks nearest on the model's latent grid in
space-time, plus the text tail kept densely). Throughput is dense-equivalent:
4*B*H*N^2*D*keep / time, keep being the mask's kept fraction. Timings are medians of
triton.testing.do_bench on CUDA; on CPU (interpreter or reference) medians of a few wall-clock runs.

With --fp8, each mask also gets an FP8 row (impl "ours-fp8"): its time includes the LUT and the
quantisation of q, k, v (also timed alone: quant_ms), and its relative L1 error is measured
against dense SDPA (keep 1) and against the bf16 kernel at the same mask (quantisation alone).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from sparsediff.bench.values import as_text, finite, recorded_rel_l1


@dataclass(frozen=True)
class BenchShape:
    name: str
    batch: int
    heads: int
    tokens: int
    head_dim: int
    grid: tuple[int, int, int]  # latent (frames, height, width) of the video/image tokens, first
    text_tokens: int  # tokens after the grid (processors place text last), attended densely

    @property
    def pairs(self) -> int:
        """Query-key pairs of one dense call: B * H * N * N."""
        return self.batch * self.heads * self.tokens**2


# Latent grids: Wan 81f 480x832 -> 21x30x52; CogVideoX 49f 480x720 -> 13x30x45 + 226 text;
# HunyuanVideo 129f 720x1280 -> 33x45x80 + 256 text; FLUX 1024px -> 64x64 + 512 text.
SHAPES: dict[str, BenchShape] = {
    s.name: s
    for s in (
        BenchShape("flux", 1, 24, 4608, 128, (1, 64, 64), 512),
        BenchShape("cogvideox", 1, 48, 17776, 64, (13, 30, 45), 226),
        BenchShape("wan", 1, 12, 32760, 128, (21, 30, 52), 0),
        BenchShape("hunyuan", 1, 24, 119056, 128, (33, 45, 80), 256),
        BenchShape("small", 1, 2, 512, 64, (2, 16, 16), 0),
    )
}
GPU_SHAPES = ("flux", "cogvideox", "wan", "hunyuan")
MASK_KINDS = ("random", "local")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (interpreter if TRITON_INTERPRET=1, else reference)")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of {', '.join(SHAPES)} (default: the four models on cuda, small on cpu)")
    parser.add_argument("--keeps", default="1,0.5,0.25,0.1", help="comma list of kept fractions in (0, 1]")
    parser.add_argument("--masks", default=",".join(MASK_KINDS), help="comma list of random, local")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--fp8", action="store_true",
                        help="also bench the kernel's FP8 path (q, k, v quantised to e4m3 from --dtype; sm89+)")
    parser.add_argument("--tune", action="store_true",
                        help="cuda: time candidate tile configs per head dim first, and bench with the fastest")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG")


def _parse_list(text: str, name: str, convert, allowed=None) -> list:
    try:
        values = [convert(x) for x in text.split(",") if x.strip()]
    except ValueError as error:
        raise ValueError(f"--{name}: {error}") from None
    if not values or (allowed is not None and any(v not in allowed for v in values)):
        choices = ", ".join(allowed) if allowed is not None else "values"
        raise ValueError(f"--{name} must be a comma list of {choices}, got {text!r}")
    return values


def random_mask(shape: BenchShape, keep: float, device):
    """Bool block mask with round(keep * KB) (at least 1) kept key blocks in every query-block row."""
    import torch

    from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N

    qb, kb = math.ceil(shape.tokens / BLOCK_M), math.ceil(shape.tokens / BLOCK_N)
    n_keep = max(1, round(keep * kb))
    order = torch.rand(shape.batch, shape.heads, qb, kb, device=device).argsort(dim=-1)
    return order < n_keep


def _block_centres(shape: BenchShape, block: int, device):
    """(n_blocks, 3) mean latent (t, y, x) of each block's grid tokens, and whether a block holds text."""
    import torch

    t, h, w = shape.grid
    n_grid = t * h * w
    idx = torch.arange(shape.tokens, device=device)
    coords = torch.stack((idx // (h * w), idx // w % h, idx % w), dim=1).float()
    n_blocks = math.ceil(shape.tokens / block)
    pad = n_blocks * block - shape.tokens
    is_grid = torch.nn.functional.pad(idx < n_grid, (0, pad)).view(n_blocks, block)
    coords = torch.nn.functional.pad(coords, (0, 0, 0, pad)).view(n_blocks, block, 3)
    weight = is_grid.float().unsqueeze(-1)
    centres = (coords * weight).sum(1) / weight.sum(1).clamp_min(1)
    return centres, ~is_grid.all(dim=1)


def local_mask(shape: BenchShape, keep: float, device):
    """Per query block the round(keep * KB) key blocks nearest in latent space-time; text kept densely."""
    import torch

    from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N

    q_centres, q_text = _block_centres(shape, BLOCK_M, device)
    k_centres, k_text = _block_centres(shape, BLOCK_N, device)
    n_keep = max(1, round(keep * k_centres.shape[0]))
    dist = torch.cdist(q_centres, k_centres)
    nearest = dist.argsort(dim=1)[:, :n_keep]
    mask = torch.zeros(dist.shape, dtype=torch.bool, device=device)
    mask.scatter_(1, nearest, True)
    mask |= q_text[:, None] | k_text[None, :]
    return mask.expand(shape.batch, shape.heads, *mask.shape)


class _Timer:
    """Median time in ms: triton.testing.do_bench on CUDA, wall clock on CPU."""

    def __init__(self, device: str, warmup_ms: float, rep_ms: float):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            import triton

            return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def _tflops(shape: BenchShape, keep: float, ms: float) -> float:
    return 4 * shape.pairs * shape.head_dim * keep / (ms * 1e-3) / 1e12


def _make_qkv(shape: BenchShape, dtype, device):
    import torch

    # Laid out as diffusers hands them, (B, N, H, D), viewed as (B, H, N, D).
    return [
        torch.randn(shape.batch, shape.tokens, shape.heads, shape.head_dim, dtype=dtype, device=device).transpose(1, 2)
        for _ in range(3)
    ]


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}


def _dense(q, k, v, backend):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


# ((B, H, Nq, Nk, D), dtype, options) checked on the device against the torch reference: ragged
# lengths, padded head dim, cross lengths, kv_lens, the P·V-skip variant with a tiny threshold.
CHECK_CASES = (
    ((2, 3, 1000, 1000, 128), "bf16", {}),
    ((2, 3, 1000, 1000, 128), "fp16", {"kv_lens": True}),
    ((1, 4, 777, 777, 64), "bf16", {"kv_lens": True}),
    ((1, 4, 777, 777, 64), "fp16", {"pv_threshold": 1e-30}),
    ((1, 2, 300, 517, 96), "bf16", {}),
    ((1, 2, 4608, 4608, 128), "bf16", {"pv_threshold": 1e-30}),
)
# Max abs error against the fp32 reference; FP8 against the reference's FP8 arithmetic by relative
# L1 instead (as tests/test_fp8.py): the kernel smooths K by a mean summed in another order than
# torch's, which can move single e4m3 roundings of K, and one moved key weighs much in a row of few
# valid keys (kv_lens).
# The reference quantises P against the running maximum after each key block; where the declared
# FP8 config takes two blocks a step (D=64), the kernel's maxima differ, and the check allows what
# tests/test_fp8.py allows there (the unseeded check had reached 1.03e-2 against 1e-2, H200, 2026-12-02).
CHECK_TOLERANCE = {"bf16": 3e-2, "fp16": 5e-3}
CHECK_FP8_REL_L1 = 1e-2  # one key block a step
CHECK_FP8_STEPS_REL_L1 = 3e-2  # several


def check_kernel(device: str, log, fp8: bool = False) -> bool:
    """Kernel vs the fp32 torch reference on random masks with an empty query block; with fp8 also
    the FP8 path vs the reference's FP8 arithmetic."""
    import torch

    from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N, block_sparse_attention, tile_config
    from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
    from sparsediff.metrics import relative_l1

    torch.manual_seed(0)  # the same inputs every run
    ok = True
    for (B, H, n_q, n_k, D), name, options in CHECK_CASES:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        q = torch.randn(B, H, n_q, D, device=device, dtype=dtype)
        k, v = (torch.randn(B, H, n_k, D, device=device, dtype=dtype) for _ in range(2))
        mask = torch.rand(B, H, math.ceil(n_q / BLOCK_M), math.ceil(n_k / BLOCK_N), device=device) < 0.5
        mask[0, 0, 0] = False
        kv_lens = torch.randint(1, n_k + 1, (B,), device=device) if options.get("kv_lens") else None
        for quantized in (False, True) if fp8 else (False,):
            ref = block_sparse_attention_reference(q, k, v, mask, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=kv_lens,
                                                   fp8=quantized)
            out = block_sparse_attention(q, k, v, mask, kv_lens=kv_lens, pv_threshold=options.get("pv_threshold"),
                                         fp8=quantized)
            if quantized:
                err, measure = float(relative_l1(out, ref)), "rel L1 vs FP8 reference"
                one_block = tile_config(D, torch.float8_e4m3fn, q.device, B * H * n_q * n_k).step_blocks == 1
                good = err <= (CHECK_FP8_REL_L1 if one_block else CHECK_FP8_STEPS_REL_L1)  # False for NaN
            else:
                err, measure = (out - ref).abs().max().item(), "max abs err"
                good = err <= CHECK_TOLERANCE[name]
            ok &= good
            log(f"check {(B, H, n_q, n_k, D)} {name}{' fp8' if quantized else ''} {options}: {measure} {err:.2e} "
                f"{'ok' if good else 'FAIL'}")
    return ok


# (step_blocks, num_warps, num_stages, warp_specialize, fixed_max). On the H100 at D=128, (2, 8, 4) and
# (4, 8, 2) ran out of shared memory and warp_specialize changed nothing (2026-11-23): with pointer
# loads, or with 8 warps, Triton's Hopper pass leaves the loop alone. K/V tiles loaded through TMA
# tensor descriptors were slower on the H200 (2026-12-01: D=128 best 473 vs 481 TFLOP/s score, D=64
# 415 vs 421), so the kernel keeps pointer loads. With q, k, v through TMA descriptors made on the
# device (2-D, one per (b, h) slice), 4 warps and warp_specialize, Triton 3.6 does split a program
# into a TMA producer and two 64-row consumer warp groups (12 warps, setmaxnreg 232/40; the pass
# wants every dot in one branch-free loop: no peeled last step, keys masked at every step). Tried on
# the H200 on 2026-12-03 and dropped (commit cf1fc09, scripts/tune_tma.py there;
# bench-results/h200-2026-12-03/tma-ws-session9.log): its outputs were wrong on the GPU (NaN, or max
# abs err 1.0 with kv_lens, bf16 and FP8) where the interpreter matched the reference, and even so it
# gained little: Wan 0.867/0.846 of cuDNN at keep 1/0.25 against the declared config's 0.860/0.825 in
# the same run, CogVideoX 0.833/0.771 against 1.025/0.969, Wan FP8 1.024/0.975 against 1.047/1.014.
# With host-side 4-D descriptors the pass split the query tile along the batch dimension and the
# kernel hung the GPU. Programs of 64 query rows (4 warps, two programs per 128-row mask block, so
# that two share an SM) matched but did not beat the 128-row programs (H200, 2026-12-01: Wan
# 485/468 vs 481/473 TFLOP/s at keep 1/0.25; CogVideoX 404/391 vs 424/404), so programs keep one
# mask block. Computing half of the softmax exponentials by a cubic polynomial on the FMA units
# (FlashAttention-4's trick, to offload the special-function unit) was slower in Triton (H200,
# 2026-12-01: Wan 426 vs 495 TFLOP/s at keep 1, CogVideoX 346 vs 435), so the kernel keeps exp2.
# Tried on the H200 on 2026-12-02 and dropped (bench-results/h200-2026-12-02/
# kernel-tune-prefetch-scores*.log, kernel-tune-program-rows-occupancy.log): issuing each step's Q·K before the previous step's softmax (the loop rotated by hand, so that the
# tensor cores could work during the softmax) lost at D=128 (best 469/446 vs 486/467 TFLOP/s at keep
# 1/0.25) and at D=64 (350/330 vs 426/404), and its FP8 build faulted; programs of 64 query rows with
# 2 stages (80 KB of shared memory, 180 registers: two programs share an SM) reached 383/411 against
# the 128-row programs' 484/465 (128 KB, 177 registers, one a SM), and 32-row programs at most 219.
# The FP8 path's exponentials of P in fp16, two per special-function instruction (ex2.approx.f16x2 by
# inline assembly, then fp16 -> e4m3), lost on the H200 (2026-12-02, kernel-fp8-half-exp-session8.log,
# the half_exp=True rows): Wan 537/523 vs 582/564 TFLOP/s at keep 1/0.25, CogVideoX 436/417 vs
# 490/466, at the same error; the conversions cost more than the halved exponentials saved.
# Lazy rescaling (FlashAttention-4's: the running maximum moves, and the accumulator is rescaled,
# only when some row's maximum grows by more than 2**8; one branch per step on the whole tile) lost
# on the H200 (2026-12-03, bench-results/h200-2026-12-03/lazy-rescale-tune-predict-session10.log):
# Wan 374/366 TFLOP/s at keep 1/0.25 against 486/465 for (1, 8, 4), CogVideoX 410/393 against
# 424/401 for (2, 4, 3); the tile-wide maximum is a reduction across warps through shared memory
# and a barrier at every step, which costs more than the skipped rescales save. Tuned at FLUX's
# short sequence (same day, kernel-tune-flux-session10.log), (2, 8, 3) led with 461/359 against
# (1, 8, 3)'s 438/355, where at Wan's it loses 9%: too little for a config per sequence length;
# 4 warps with 2-4 stages reached 295-371 there. Capping the registers at 128 so that two 8-warp
# programs share an SM (max_registers; 2026-12-04) won 6-12% at D=128: TILE_CONFIGS' notes.
# TileConfig keyword arguments (the fields not given keep their defaults; bench/kernel.py imports
# the kernels only when it runs):
TUNE_CANDIDATES = tuple(
    dict(step_blocks=blocks, num_warps=warps, num_stages=stages, **options)
    for blocks, warps, stages, options in (
        (1, 8, 3, {}), (1, 8, 3, {"fixed_max": False}), (1, 8, 4, {}), (1, 8, 4, {"fixed_max": False}),
        (1, 8, 2, {}), (2, 8, 3, {}), (2, 8, 2, {}), (1, 4, 3, {}), (2, 4, 3, {}), (2, 4, 3, {"fixed_max": False}),
        (2, 4, 4, {}), (2, 4, 4, {"fixed_max": False}),
        (1, 8, 2, {"max_registers": 128}), (1, 8, 2, {"max_registers": 128, "fixed_max": False}),
        (1, 8, 3, {"max_registers": 128}), (1, 8, 4, {"max_registers": 128}), (2, 8, 2, {"max_registers": 128}),
        (2, 8, 3, {"max_registers": 128}), (1, 8, 2, {"max_registers": 128, "tma": True}), (1, 8, 3, {"tma": True}),
    )
)


# The FP8 path's quantisation error alone is ~5% relative L1 on random inputs: its candidates are
# judged on that instead of the max abs error.
FP8_TUNE_MAX_REL_L1 = 0.1


def _tune(shape: BenchShape, dtype, timer: _Timer, log, fp8: bool = False) -> tuple[object, list[dict]]:
    """Time the candidate tile configs at keep 1 and 0.25 (random masks); return the fastest."""
    import torch

    from sparsediff.kernels.block_sparse_attn import (
        BLOCK_M,
        BLOCK_N,
        TileConfig,
        attention_from_lut,
        build_block_lut,
        uses_fixed_max,
        uses_tma,
    )
    from sparsediff.kernels.quantize_fp8 import quantize_fp8

    q, k, v = _make_qkv(shape, dtype, "cuda")
    scale = shape.head_dim**-0.5
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    luts = {keep: build_block_lut(random_mask(shape, keep, "cuda"), shape.tokens) for keep in (1.0, 0.25)}
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N) if fp8 else None
    # Keys growing along the sequence: the rows' maxima rise step after step, which random keys
    # hardly do after a row's first steps, so that every candidate's rescaling is checked too.
    k_rising = (k.float() * torch.linspace(0.5, 4.0, shape.tokens, device="cuda")[:, None]).to(dtype)
    dense_rising = torch.nn.functional.scaled_dot_product_attention(q, k_rising, v)
    quantized_rising = quantize_fp8(q, k_rising, v, block_m=BLOCK_M, block_n=BLOCK_N) if fp8 else None
    rows, best = [], None
    # The FP8 path always keeps the running maximum: its candidates differ in the tiles alone.
    configs = (TileConfig(**c) for c in TUNE_CANDIDATES)
    candidates = dict.fromkeys(replace(c, fixed_max=uses_fixed_max(c, fp8, None), tma=uses_tma(c, fp8)) for c in configs)
    for config in candidates:
        row = {"shape": shape.name, "fp8": fp8, "config": asdict(config)}
        try:
            out = attention_from_lut(q, k, v, luts[1.0], scale, config=config, quantized=quantized)
            err = (out - dense).abs().max().item()
            row["max_abs_err"], row["rel_l1"] = finite(err), recorded_rel_l1(out, dense)
            if not (row["rel_l1"] <= FP8_TUNE_MAX_REL_L1 if fp8 else err <= 2e-2):
                raise RuntimeError(f"wrong result, max abs err {err}, rel L1 {row['rel_l1']}")
            rising = attention_from_lut(q, k_rising, v, luts[1.0], scale, config=config, quantized=quantized_rising)
            row["rel_l1_rising_keys"] = recorded_rel_l1(rising, dense_rising)
            if not row["rel_l1_rising_keys"] <= (FP8_TUNE_MAX_REL_L1 if fp8 else 1e-2):
                raise RuntimeError(f"wrong result on rising keys, rel L1 {row['rel_l1_rising_keys']}")
            for keep, lut in luts.items():
                ms = timer(lambda: attention_from_lut(q, k, v, lut, scale, config=config, quantized=quantized))
                row[f"tflops_keep{keep}"] = _tflops(shape, keep, ms)
            row["score"] = math.sqrt(row["tflops_keep1.0"] * row["tflops_keep0.25"])
            if best is None or row["score"] > best[1]:
                best = (config, row["score"])
        except Exception as error:  # a candidate that fails to compile or run is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        log(f"tune {shape.name}{' fp8' if fp8 else ''} {config}: " + ", ".join(
            f"{key}={val:.3g}" if isinstance(val, float) else f"{key}={val}"
            for key, val in row.items() if key not in ("shape", "fp8", "config")))
        rows.append(row)
    del q, k, v, dense, quantized, k_rising, dense_rising, quantized_rising
    torch.cuda.empty_cache()
    if best is None:
        raise RuntimeError(f"no tile config ran correctly on {shape.name}")
    return best[0], rows


def _flex_runner():
    """FlexAttention, compiled once: (BlockMask from a bool block mask, call on q, k, v, BlockMask)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N

    compiled = torch.compile(flex_attention, dynamic=False)

    def block_mask_of(mask, n_tokens: int):
        # Every kept block is a full block: no mask_mod is evaluated, as in our kernel.
        counts = mask.sum(dim=-1, dtype=torch.int32)
        indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts), torch.zeros_like(indices), counts, indices,
            BLOCK_SIZE=(BLOCK_M, BLOCK_N), seq_lengths=(n_tokens, n_tokens),
        )

    def run(q, k, v, block_mask):
        return compiled(q, k, v, block_mask=block_mask, kernel_options={"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N})

    return block_mask_of, run


def _bench_shape(shape, keeps, mask_kinds, dtype, device, timer, flex, config, log, fp8_config=None) -> list[dict]:
    """Rows of one shape; fp8_config (the FP8 path's tile config) adds the FP8 rows."""
    import torch
    import torch.nn.functional as F

    from sparsediff._runtime import kernels_available
    from sparsediff.bench.timing import cuda_graphed
    from sparsediff.kernels.block_sparse_attn import (
        BLOCK_M,
        BLOCK_N,
        attention_from_lut,
        block_sparse_attention,
        build_block_lut,
        uses_hopper_kernel,
    )
    from sparsediff.kernels.quantize_fp8 import quantize_fp8

    q, k, v = _make_qkv(shape, dtype, device)
    scale = shape.head_dim**-0.5
    with_kernels = kernels_available(torch.device(device))
    rows: list[dict] = []
    base = {"shape": shape.name, "B": shape.batch, "H": shape.heads, "N": shape.tokens, "D": shape.head_dim}
    # On CUDA every call is also timed as a CUDA-graph replay (`graph_ms`): the GPU's time alone, as
    # in a graphed or compiled pipeline, where the host's launches cost nothing. At FLUX's length the
    # host takes longer than the GPU work, so the plain call times measure Python, not kernels.
    graph_ms: dict[str, float] = {}
    if device == "cuda":
        dense_ms = {}
        for name, backend in _sdpa_backends().items():
            try:
                dense_ms[name] = timer(lambda b=backend: _dense(q, k, v, b))
                graph_ms[name] = timer(cuda_graphed(lambda b=backend: _dense(q, k, v, b)))
            except RuntimeError as error:  # a backend that does not take this shape is reported
                log(f"{shape.name} {name} dense: unavailable ({str(error)[:200]})")
        try:
            reference = _dense(q, k, v, _sdpa_backends()["cudnn"])
        except RuntimeError:
            reference = F.scaled_dot_product_attention(q, k, v)
    else:
        dense_ms = {"sdpa": timer(lambda: F.scaled_dot_product_attention(q, k, v))}
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
    for name, ms in dense_ms.items():
        rows.append({**base, "impl": name, "mask": "dense", "keep": 1.0, "ms": ms, "tflops": _tflops(shape, 1.0, ms),
                     **({"graph_ms": graph_ms[name]} if name in graph_ms else {})})
        log(f"{shape.name} {name} dense: {ms:.3f} ms" + (f" (graphed {graph_ms[name]:.3f})" if name in graph_ms else "")
            + f", {rows[-1]['tflops']:.3g} TFLOP/s")
    all_kept = torch.ones(shape.batch, shape.heads, math.ceil(shape.tokens / BLOCK_M), math.ceil(shape.tokens / BLOCK_N),
                          dtype=torch.bool, device=device)
    dense_err = (block_sparse_attention(q, k, v, all_kept) - reference).abs().max().item()
    log(f"{shape.name} all kept vs {'cuDNN' if device == 'cuda' else 'fp32'} SDPA: max abs err {dense_err:.2e}")
    baseline = dense_ms.get("cudnn", next(iter(dense_ms.values())))
    graphed_baseline = graph_ms.get("cudnn")

    def time_graphed(row: dict, call) -> None:
        # The whole call (mask to table, quantisation, launches) as a CUDA-graph replay, against cuDNN's.
        if graphed_baseline is not None:
            row["graph_ms"] = timer(cuda_graphed(call))
            row["vs_dense_graphed"] = graphed_baseline * row["keep"] / row["graph_ms"]
    for kind in mask_kinds:
        for keep in keeps:
            mask = (random_mask if kind == "random" else local_mask)(shape, keep, device)
            kept = mask.float().mean().item()
            ours_ms = timer(lambda: block_sparse_attention(q, k, v, mask))
            ours_out = block_sparse_attention(q, k, v, mask)
            row = {**base, "impl": "ours", "mask": kind, "keep_target": keep, "keep": kept, "ms": ours_ms,
                   "tflops": _tflops(shape, kept, ours_ms), "vs_dense_baseline": baseline * kept / ours_ms,
                   "rel_l1_vs_dense": recorded_rel_l1(ours_out, reference)}
            lut = build_block_lut(mask, shape.tokens) if with_kernels else None
            if with_kernels:  # else block_sparse_attention ran the torch reference: no LUT, no kernel
                row["lut_ms"] = timer(lambda: build_block_lut(mask, shape.tokens))
                kernels = {"kernel": config}
                if uses_hopper_kernel(config, q, k, v, q, False, None):  # the Triton kernel beside the Gluon one
                    kernels["triton_kernel"] = replace(config, hopper=False)
                    row["triton_rel_l1_vs_dense"] = recorded_rel_l1(
                        attention_from_lut(q, k, v, lut, scale, config=kernels["triton_kernel"]), reference)
                for key, kernel_config in kernels.items():  # the kernel alone, its LUT built
                    call = functools.partial(attention_from_lut, q, k, v, lut, scale, config=kernel_config)
                    row[f"{key}_ms"] = timer(call)
                    if graphed_baseline is not None:
                        row[f"{key}_graph_ms"] = timer(cuda_graphed(call))
                        row[f"{key}_vs_dense_graphed"] = graphed_baseline * kept / row[f"{key}_graph_ms"]
                time_graphed(row, lambda: block_sparse_attention(q, k, v, mask))
            if keep == 1.0:
                row["max_abs_err_vs_dense"] = finite(dense_err)
            if flex is not None:
                try:
                    block_mask = flex[0](mask, shape.tokens)
                    row["max_abs_err_vs_flex"] = finite((flex[1](q, k, v, block_mask) - ours_out).abs().max().item())
                    flex_ms = timer(lambda: flex[1](q, k, v, block_mask))
                    row.update(flex_ms=flex_ms, flex_tflops=_tflops(shape, kept, flex_ms), vs_flex=flex_ms / ours_ms)
                    if "graph_ms" in row:
                        row["flex_graph_ms"] = timer(cuda_graphed(lambda: flex[1](q, k, v, block_mask)))
                        row["vs_flex_graphed"] = row["flex_graph_ms"] / row["graph_ms"]
                except Exception as error:  # FlexAttention failing is a finding, not the end of the run
                    row["flex_error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    log(f"{shape.name} flex failed: {row['flex_error']}")
            rows.append(row)
            log(f"{shape.name} {kind} keep {kept:.3f}: ours {ours_ms:.3f} ms (kernel {row.get('kernel_ms', 0):.3f}, "
                f"lut {row.get('lut_ms', 0):.3f}) {row['tflops']:.3g} TFLOP/s, x{row['vs_dense_baseline']:.2f} dense"
                + (f", x{row['vs_flex']:.2f} flex (err {row['max_abs_err_vs_flex']})" if "vs_flex" in row else "")
                + (f"; graphed {row['graph_ms']:.3f} ms, x{row['vs_dense_graphed']:.2f} dense" if "graph_ms" in row else "")
                + (f", x{row['vs_flex_graphed']:.2f} flex" if "vs_flex_graphed" in row else "")
                + "".join(f"; {key.replace('_', ' ')} graphed x{row[f'{key}_vs_dense_graphed']:.3f} dense"
                          for key in ("kernel", "triton_kernel") if f"{key}_vs_dense_graphed" in row))
            if fp8_config is not None:
                fp8_ms = timer(lambda: block_sparse_attention(q, k, v, mask, fp8=True))
                fp8_out = block_sparse_attention(q, k, v, mask, fp8=True)
                row = {**base, "impl": "ours-fp8", "mask": kind, "keep_target": keep, "keep": kept, "ms": fp8_ms,
                       "tflops": _tflops(shape, kept, fp8_ms), "vs_dense_baseline": baseline * kept / fp8_ms,
                       "rel_l1_vs_dense": recorded_rel_l1(fp8_out, reference), "rel_l1_vs_bf16_same_mask": recorded_rel_l1(fp8_out, ours_out)}
                if with_kernels:
                    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N)
                    row["quant_ms"] = timer(lambda: quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N))
                    row["kernel_ms"] = timer(
                        lambda: attention_from_lut(q, k, v, lut, scale, config=fp8_config, quantized=quantized))
                    del quantized
                    time_graphed(row, lambda: block_sparse_attention(q, k, v, mask, fp8=True))
                rows.append(row)
                log(f"{shape.name} {kind} keep {kept:.3f} fp8: {fp8_ms:.3f} ms (kernel {row.get('kernel_ms', 0):.3f}, "
                    f"quant {row.get('quant_ms', 0):.3f}) {row['tflops']:.3g} TFLOP/s, x{row['vs_dense_baseline']:.2f} "
                    + (f"dense (graphed {row['graph_ms']:.3f} ms, x{row['vs_dense_graphed']:.2f}), " if "graph_ms" in row
                       else "dense, ") + f"rel L1 {row['rel_l1_vs_dense']} vs dense, {row['rel_l1_vs_bf16_same_mask']} vs bf16")
                del fp8_out
            del mask, ours_out
    del q, k, v, reference
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'shape':<10} {'impl':<8} {'mask':<7} {'keep':>5} {'ms':>9} {'lut ms':>7} {'quant ms':>8} {'TFLOP/s':>8} "
            f"{'xdense':>7} {'relL1':>7} {'xflex':>6} {'flexTF':>7} {'graph ms':>9} {'xdense g':>8} {'xflex g':>7}")
    lines = [head, "-" * len(head)]

    def cell(r: dict, key: str, width: int, spec: str) -> str:
        return f"{r[key]:>{width}{spec}}" if key in r else f"{'-':>{width}}"

    for r in rows:
        graphed = f"{cell(r, 'graph_ms', 9, '.3f')} {cell(r, 'vs_dense_graphed', 8, '.2f')} {cell(r, 'vs_flex_graphed', 7, '.2f')}"
        if r["mask"] == "dense":
            lines.append(f"{r['shape']:<10} {r['impl']:<8} {'dense':<7} {1.0:>5.2f} {r['ms']:>9.3f} {'':>7} {'':>8} "
                         f"{r['tflops']:>8.3g} {'':>7} {'':>7} {'':>6} {'':>7} {cell(r, 'graph_ms', 9, '.3f')}")
            continue
        flex = f"{cell(r, 'vs_flex', 6, '.2f')} {cell(r, 'flex_tflops', 7, '.0f')}"
        err = r["rel_l1_vs_dense"]
        lines.append(f"{r['shape']:<10} {r['impl']:<8} {r['mask']:<7} {r['keep']:>5.2f} {r['ms']:>9.3f} "
                     f"{cell(r, 'lut_ms', 7, '.3f')} {cell(r, 'quant_ms', 8, '.3f')} "
                     f"{r['tflops']:>8.3g} {r['vs_dense_baseline']:>7.2f} "
                     f"{as_text(err, '.4f'):>7} {flex} {graphed}")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsediff.io import atomic_output

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, name in zip(axes[0], shapes):
        mine = [r for r in rows if r["shape"] == name]
        for r in mine:
            if r["mask"] == "dense":  # graphed where timed so, as the ratios are
                graphed = "graph_ms" in r
                ax.axhline(r["tflops"] * r["ms"] / r["graph_ms"] if graphed else r["tflops"], linestyle="--",
                           color="gray" if r["impl"] != "cudnn" else "black",
                           label=f"{r['impl']} dense{', graphed' if graphed else ''}")
        for kind in MASK_KINDS:
            ours = sorted((r for r in mine if r["impl"] == "ours" and r["mask"] == kind), key=lambda r: r["keep"])
            fp8 = sorted((r for r in mine if r["impl"] == "ours-fp8" and r["mask"] == kind), key=lambda r: r["keep"])
            for rows_, marker, label in ((fp8, "s", f"ours fp8 {kind}"), (ours, "o", f"ours {kind}")):
                if not rows_:
                    continue
                keeps = [r["keep"] for r in rows_]
                # The kernel on a lookup table (and FP8 operands) built beforehand, where timed; the
                # whole call (mask to table, quantisation, launches) thin, and dashed as a CUDA-graph
                # replay: at short sequences the host's launches can take longer than the GPU work.
                line, = ax.plot(keeps, [r["tflops"] for r in rows_], marker + ":", linewidth=0.8, markersize=3,
                                label=f"{label}, whole call")
                for key, style, what in (("kernel_ms", "-", "kernel"), ("graph_ms", "--", "whole call graphed")):
                    if key in rows_[0]:
                        ax.plot(keeps, [r["tflops"] * r["ms"] / r[key] for r in rows_], marker + style,
                                color=line.get_color(), label=f"{label}, {what}")
            if ours and "flex_tflops" in ours[0]:
                graphed = "flex_graph_ms" in ours[0]
                ax.plot([r["keep"] for r in ours],
                        [r["flex_tflops"] * r["flex_ms"] / r["flex_graph_ms"] if graphed else r["flex_tflops"] for r in ours],
                        "x--", label=f"flex {kind}{', graphed' if graphed else ''}")
        ax.set_title(f"{name} {mine[0]['B']}x{mine[0]['H']}x{mine[0]['N']}x{mine[0]['D']}")
        ax.set_xlabel("kept fraction")
        ax.set_ylabel("dense-equivalent TFLOP/s")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import torch
    import triton

    from sparsediff._runtime import triton_interpreting
    from sparsediff.io import atomic_write_json, writable_dir
    from sparsediff.kernels import block_sparse_attn, padded_head_dim

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    names = _parse_list(args.shapes or (",".join(GPU_SHAPES) if device == "cuda" else "small"), "shapes", str, SHAPES)
    keeps = _parse_list(args.keeps, "keeps", float)
    if any(not 0.0 < keep <= 1.0 for keep in keeps):
        raise ValueError(f"--keeps must lie in (0, 1], got {args.keeps!r}")
    mask_kinds = _parse_list(args.masks, "masks", str, MASK_KINDS)
    # do_bench runs at least once whatever these are: a rep of 0 would time a single call unsaid.
    if not (math.isfinite(args.warmup_ms) and args.warmup_ms >= 0):
        raise ValueError(f"--warmup-ms must be a finite number >= 0, got {args.warmup_ms}")
    if not (math.isfinite(args.rep_ms) and args.rep_ms > 0):
        raise ValueError(f"--rep-ms must be a finite number > 0, got {args.rep_ms}")
    writable_dir(args.out)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    flex = _flex_runner() if device == "cuda" and not args.no_flex else None
    timer = _Timer(device, args.warmup_ms, args.rep_ms)

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else
        ("cpu, Triton interpreter" if triton_interpreting() else "cpu, torch reference"),
        "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
        "block": [block_sparse_attn.BLOCK_M, block_sparse_attn.BLOCK_N],
    }
    log(json.dumps(env))
    if device == "cuda" and not check_kernel(device, log, fp8=args.fp8):
        log("kernel check failed: not benchmarking")
        return 1
    tuning: list[dict] = []
    # The kernel's operand dtypes benched: --dtype, and e4m3 for the FP8 path.
    kernel_dtypes = [dtype] + ([torch.float8_e4m3fn] if args.fp8 else [])
    chosen: dict[tuple[int, torch.dtype], object] = {}
    if args.tune and device == "cuda":
        for head_dim in dict.fromkeys(SHAPES[n].head_dim for n in names):
            # The longest shape that still tunes quickly: long sequences are where the time goes.
            tune_shape = max((SHAPES[n] for n in names if SHAPES[n].head_dim == head_dim),
                             key=lambda s: (s.tokens <= 40_000, s.tokens))
            for kernel_dtype in kernel_dtypes:
                fp8 = kernel_dtype == torch.float8_e4m3fn
                best, tune_rows = _tune(tune_shape, dtype, timer, log, fp8=fp8)
                # The search covers the Triton kernel's tiles; the calls the Gluon kernel takes stay its.
                declared = block_sparse_attn.tile_config(head_dim, kernel_dtype, torch.device(device), tune_shape.pairs)
                chosen[head_dim, kernel_dtype] = replace(best, hopper=declared.hopper)
                tuning += tune_rows
                log(f"best tile config at D={head_dim}{' fp8' if fp8 else ''}: {chosen[head_dim, kernel_dtype]}")
    rows: list[dict] = []
    for name in names:
        shape = SHAPES[name]
        configs = []
        for kernel_dtype in kernel_dtypes:
            config = chosen.get((shape.head_dim, kernel_dtype)) or block_sparse_attn.tile_config(
                shape.head_dim, kernel_dtype, torch.device(device), shape.pairs)
            if device == "cuda" and chosen:
                # block_sparse_attention reads the declared table: declare the tuned config for this run.
                block_sparse_attn.TILE_CONFIGS[(block_sparse_attn.gpu_arch(torch.device("cuda")),
                                                padded_head_dim(shape.head_dim), kernel_dtype)] = config
            configs.append(config)
        log(f"{name}: tile config {configs[0]}" + (f", fp8 {configs[1]}" if args.fp8 else ""))
        rows += _bench_shape(shape, keeps, mask_kinds, dtype, device, timer, flex, configs[0], log,
                             fp8_config=configs[1] if args.fp8 else None)
    table = _table(rows)
    print(table)
    result = {"env": env, "tile_configs": {f"{d} {str(t).removeprefix('torch.')}": asdict(c) for (d, t), c in chosen.items()},
              "tuning": tuning, "rows": rows}
    stem = f"kernel-{device}-{args.dtype}" + ("-fp8" if args.fp8 else "")
    atomic_write_json(args.out / f"{stem}.json", result, indent=1)
    _plot(rows, args.out / f"{stem}.png", f"{env['device']} · torch {env['torch']} · triton {env['triton']} · {env['date']}")
    log(f"wrote {args.out / (stem + '.json')} and {args.out / (stem + '.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sparsediff.bench.kernel ARGS` is `sparsediff bench kernel ARGS`."""
    from sparsediff.cli import main as cli_main

    return cli_main(["bench", "kernel", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
