"""`sparsediff bench e2e`: one transformer forward, dense vs sparse, at the real published configs.

Each family's transformer is built straight on the GPU in bf16 with random weights from its
published config (`sparsediff.pipelines.configs`, checked against the hub config.json files and
diffusers 0.42.1 defaults), fed random inputs at the real resolution and frame count, and timed for
one forward:

- dense: the stock processors, SDPA with cuDNN first in priority (then Flash, efficient, math);
- sparse: `sparsediff.apply(transformer, cdf_threshold=CDF, sim_threshold=SIM, dense_steps=0)`
  under the same SDPA priority (Wan's cross-attention and HunyuanVideo's token refiner stay stock).

Reference setting (fixed so runs compare): cdf_threshold 0.9, sim_threshold 0.0, every head of
every layer, the predictor's default method, token order "tiles", no dense steps, no pv
threshold. Random weights make the
attention maps unlike a trained model's: read the sparsity reached with the time, not as the
sparsity a calibrated profile would reach.

Reported per family: median forward time of each (CUDA events, after warm-up), speedup
dense/sparse, the block sparsity reached, and the relative L1 error of the output against dense.
A table on stdout and a JSON file under --out.

With `--steps S`: a whole denoising loop instead of one forward (S forwards at decreasing
timesteps, one video's transformer work without CFG), eager and/or (`--modes`) compiled by
`compile_repeated_blocks(fullgraph=True)` where the family has repeated blocks, else `torch.compile`:
- dense: the stock processors as above;
- attention-free: the same, with every self-attention SDPA call (query and key of equal length)
  returning a copy of its query, so 1 - time / dense time is the share of a dense step spent in
  attention. The copy is made by a custom op that takes key and value too, opaque to torch.compile:
  a plain `return query` left key and value unused, and Inductor dropped their projections as dead
  code, so the compiled runs' attention shares and bounds before 2026-12-03 are too high;
- setting A: sparse with `dense_steps` = 20% of S and cdf `--setting-a-cdf` on every head (random
  weights attend almost uniformly: 0.15 keeps ~12-15% of the blocks on Wan and CogVideoX, the
  reference setting's "85% sparsity"; FLUX needs a lower one; the sparsity actually reached is
  reported and used below);
- setting B: the FP8 path (`apply(..., fp8=True)`) with `dense_steps` = 10% of S and cdf
  `--setting-b-cdf` (aiming at 90% sparsity; the sparsity reached is reported and used below).
Both settings run with `apply(cuda_graphs=True)`, the default: each call shape's sparse computation
is captured as a CUDA graph at its second call (inside the warm-up step) and replayed; with
`--cuda-graphs on,off` each setting is also timed with cuda_graphs=False ("A no graphs": every
kernel launched from Python at every call).
The attainable bound of a setting is the speed-up if only attention changed and its time scaled
with the kept blocks at the kernel's measured speed: per sparse step, attention-free time +
dense attention time x (kernel time at the measured keep fraction / cuDNN dense time), the kernel
timed in the same run on the family's self-attention shape with a random mask of that keep
fraction (setting B: the FP8 path, quantisation included), CUDA-graphed on a lookup table built
beforehand (GPU time: no index building, no launches), against cuDNN's dense call graphed too;
dense steps cost a dense step.
Achieved / bound says what prediction, token reordering, index building and launches cost. The
ceiling is the same loop with the sparse steps' attention taking no time at all: no attention
kernel, however sparse or fast, can make the loop faster than that, since everything outside
attention and the dense steps stay. Beside the JSON, `plot_steps` draws each setting's speed-up
with its bound and ceiling (PNG); `scripts/plot_e2e.py` draws several saved reports in one plot.
"""
from __future__ import annotations

import argparse
import functools
import gc
import math
import platform
import statistics
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from sparsediff.bench.values import as_text, recorded_rel_l1
from sparsediff.pipelines import configs

SDPA_PRIORITY_NAMES = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # dense: cuDNN first
REFERENCE_CDF = 0.9
REFERENCE_SIM = 0.0
SETTING_A_CDF = 0.15
SETTING_A_DENSE_FRACTION = 0.2
SETTING_B_CDF = 0.1
SETTING_B_DENSE_FRACTION = 0.1
MODES = ("eager", "compiled")
SETTINGS = ("A", "B")
CUDA_GRAPHS = ("on", "off")


@dataclass(frozen=True)
class E2ECase:
    """One family at its published config and real generation size."""

    family: str
    model_id: str
    transformer_class: str
    config: dict[str, Any]
    height: int
    width: int
    frames: int  # pixel frames; 1 for images
    make_inputs: Callable[["E2ECase", int, Any], dict[str, Any]]  # (case, frames, device) -> kwargs


def _video_latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1  # all four video VAEs compress time 4x, keeping the first frame


def _wan_inputs(case: E2ECase, frames: int, device) -> dict[str, Any]:
    import torch

    f, h, w = _video_latent_frames(frames), case.height // 8, case.width // 8
    return {
        "hidden_states": torch.randn(1, 16, f, h, w, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device),
        "return_dict": False,
    }


def _hunyuan_inputs(case: E2ECase, frames: int, device) -> dict[str, Any]:
    import torch

    f, h, w = _video_latent_frames(frames), case.height // 8, case.width // 8
    text_mask = torch.zeros(1, 256, dtype=torch.long, device=device)
    text_mask[:, :100] = 1  # a 100-token prompt, right-padded to the pipeline's 256
    return {
        "hidden_states": torch.randn(1, 16, f, h, w, device=device),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, 256, 4096, device=device),
        "encoder_attention_mask": text_mask,
        "pooled_projections": torch.randn(1, 768, device=device),
        "guidance": torch.tensor([6000.0], device=device),  # guidance 6.0 x 1000, as the pipeline passes it
        "return_dict": False,
    }


def _cogvideox_inputs(case: E2ECase, frames: int, device) -> dict[str, Any]:
    import torch
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    f, h, w = _video_latent_frames(frames), case.height // 8, case.width // 8
    p = case.config["patch_size"]
    grid_h, grid_w = h // p, w // p
    # As CogVideoXPipeline._prepare_rotary_positional_embeddings (CogVideoX 1.0).
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), case.config["sample_width"] // p,
                                            case.config["sample_height"] // p)
    rope = get_3d_rotary_pos_embed(embed_dim=case.config["attention_head_dim"], crops_coords=crops,
                                   grid_size=(grid_h, grid_w), temporal_size=f, device=device)
    return {
        "hidden_states": torch.randn(1, f, 16, h, w, device=device),
        "encoder_hidden_states": torch.randn(1, 226, 4096, device=device),
        "timestep": torch.tensor([500], device=device),
        "image_rotary_emb": rope,
        "return_dict": False,
    }


def _flux_inputs(case: E2ECase, frames: int, device) -> dict[str, Any]:
    import torch

    h, w = case.height // 16, case.width // 16  # 8x VAE, then 2x2 packing
    img_ids = torch.zeros(h, w, 3, device=device)
    img_ids[..., 1] = torch.arange(h, device=device)[:, None]
    img_ids[..., 2] = torch.arange(w, device=device)[None, :]
    return {
        "hidden_states": torch.randn(1, h * w, 64, device=device),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device),
        "pooled_projections": torch.randn(1, 768, device=device),
        "timestep": torch.tensor([0.5], device=device),
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(512, 3, device=device),
        "guidance": torch.tensor([3.5], device=device),
        "return_dict": False,
    }


# transformer/config.json of each hub model: sparsediff.pipelines.configs.
CASES: dict[str, E2ECase] = {c.family: c for c in (
    E2ECase("wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "WanTransformer3DModel", configs.WAN21_T2V_1_3B_TRANSFORMER,
            480, 832, 81, _wan_inputs),
    E2ECase("hunyuan_video", "hunyuanvideo-community/HunyuanVideo", "HunyuanVideoTransformer3DModel",
            configs.HUNYUANVIDEO_TRANSFORMER, 720, 1280, 129, _hunyuan_inputs),
    E2ECase("cogvideox", "THUDM/CogVideoX-5b", "CogVideoXTransformer3DModel", configs.COGVIDEOX_5B_TRANSFORMER,
            480, 720, 49, _cogvideox_inputs),
    E2ECase("flux", "black-forest-labs/FLUX.1-dev", "FluxTransformer2DModel", configs.FLUX1_DEV_TRANSFORMER,
            1024, 1024, 1, _flux_inputs),
)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--frames", action="append", default=[], metavar="FAMILY=N",
                        help="pixel frames for a video family, e.g. hunyuan_video=33 (4k+1; default: the real count)")
    parser.add_argument("--cdf", type=float, default=REFERENCE_CDF, help="cdf_threshold on every head")
    parser.add_argument("--sim", type=float, default=REFERENCE_SIM, help="sim_threshold on every head")
    parser.add_argument("--token-order", choices=("tiles", "raster"), default="tiles")
    parser.add_argument("--reps", type=int, default=3, help="timed forwards of each kind (median reported)")
    parser.add_argument("--steps", type=int, default=None,
                        help="time a whole denoising loop of this many steps (dense, attention-free, settings A and B)")
    parser.add_argument("--modes", default="eager",
                        help="with --steps: comma list of eager, compiled (the transformer under torch.compile)")
    parser.add_argument("--setting-a-cdf", type=float, default=SETTING_A_CDF,
                        help=f"with --steps: setting A's cdf_threshold (default {SETTING_A_CDF}: ~85%% sparsity on "
                             "random-weight Wan and CogVideoX; FLUX needs less to get there)")
    parser.add_argument("--setting-b-cdf", type=float, default=SETTING_B_CDF,
                        help=f"with --steps: setting B's (FP8 path) cdf_threshold (default {SETTING_B_CDF}, aiming at "
                             "90%% sparsity)")
    parser.add_argument("--settings", default="A,B",
                        help="with --steps: comma list of the sparse settings to time, A and B (B, the FP8 path, "
                             "needs compute capability 8.9+)")
    parser.add_argument("--cuda-graphs", default="on",
                        help="with --steps: comma list of on, off: the sparse settings with apply(cuda_graphs=True / "
                             "False); 'on,off' times each setting both ways")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON")


def _parse(args: argparse.Namespace) -> tuple[list[str], dict[str, int]]:
    from sparsediff.attention import is_threshold_number, threshold_range

    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in CASES]
    if not families or unknown:
        raise ValueError(f"--families must be a comma list of {', '.join(CASES)}, got {args.families!r}")
    frames = {}
    for item in args.frames:
        family, _, n = item.partition("=")
        if family not in CASES or CASES[family].frames == 1 or not n.isdigit() or int(n) < 1 or (int(n) - 1) % 4:
            raise ValueError(f"--frames must be VIDEO_FAMILY=N with N = 4k+1, got {item!r}")
        frames[family] = int(n)
    if args.reps < 1:
        raise ValueError(f"--reps must be >= 1, got {args.reps}")
    if args.steps is not None and args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    for name, allowed in (("modes", MODES), ("settings", SETTINGS), ("cuda_graphs", CUDA_GRAPHS)):
        given = _items(getattr(args, name))
        if not given or any(item not in allowed for item in given):
            raise ValueError(f"--{name.replace('_', '-')} must be a comma list of {', '.join(allowed)}, "
                             f"got {getattr(args, name)!r}")
    if args.steps is None and (_items(args.modes) != ["eager"] or _items(args.cuda_graphs) != ["on"]):
        raise ValueError("--modes and --cuda-graphs need --steps")
    # Checked here, not by apply() after the model is built and its dense forward timed.
    for name, key in (("cdf", "cdf_threshold"), ("sim", "sim_threshold"),
                      ("setting_a_cdf", "cdf_threshold"), ("setting_b_cdf", "cdf_threshold")):
        if not is_threshold_number(getattr(args, name), key):
            raise ValueError(f"--{name.replace('_', '-')} must be in {threshold_range(key)}, got {getattr(args, name)}")
    return families, frames


def _time_forward(model, inputs: dict[str, Any], reps: int) -> tuple[float, Any]:
    """Median seconds of `reps` forwards after one warm-up, and the last output."""
    import torch

    with torch.no_grad():
        out = model(**inputs)[0]  # warm-up: Triton compilation, cuDNN plans, allocator
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(**inputs)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), out


def _sdpa_priority() -> list:
    from torch.nn.attention import SDPBackend

    return [getattr(SDPBackend, name) for name in SDPA_PRIORITY_NAMES]


def _build(case: E2ECase, frames: int) -> tuple[Any, dict[str, Any]]:
    """The family's transformer with seeded random bf16 weights, and its inputs, built on the GPU."""
    import diffusers
    import torch

    device = torch.device("cuda")
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = getattr(diffusers, case.transformer_class)(**case.config).eval()
            inputs = case.make_inputs(case, frames, device)
    finally:
        torch.set_default_dtype(previous_dtype)
    return model, inputs


def bench_case(case: E2ECase, frames: int, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.nn.attention import sdpa_kernel

    import sparsediff

    model, inputs = _build(case, frames)
    with sdpa_kernel(_sdpa_priority(), set_priority=True):
        dense_s, dense_out = _time_forward(model, inputs, args.reps)
        handle = sparsediff.apply(model, cdf_threshold=args.cdf, sim_threshold=args.sim, dense_steps=0,
                                  token_order=args.token_order)
        sparse_s, sparse_out = _time_forward(model, inputs, args.reps)
    sparsediff.remove(model)
    dense_f, sparse_f = dense_out.float(), sparse_out.float()
    result = {
        "family": case.family,
        "model_id": case.model_id,
        "height": case.height,
        "width": case.width,
        "frames": frames,
        "attention": _attention_summary(handle),
        "dense_s": dense_s,
        "sparse_s": sparse_s,
        "speedup": dense_s / sparse_s,
        "sparsity": handle.stats.mean_sparsity(after_dense_steps=False),
        "rel_l1": recorded_rel_l1(sparse_f, dense_f),  # "nan" for a non-finite output: strict JSON
        "finite": bool(torch.isfinite(sparse_f).all()),
        "config": case.config,
    }
    del model, inputs, dense_out, sparse_out, dense_f, sparse_f, handle
    gc.collect()
    torch.cuda.empty_cache()
    return result


@functools.cache
def _query_copy_op() -> Callable[..., Any]:
    """A custom op (query, key, value) -> a copy of query. Opaque to torch.compile, so that key and
    value, and what computes them, stay in the graph as they do before a real attention call."""
    import torch

    # The schema spelled out: this module's annotations are strings (`from __future__ import
    # annotations`) naming a torch imported here only.
    @torch.library.custom_op("sparsediff_bench::query_copy", mutates_args=(),
                             schema="(Tensor query, Tensor key, Tensor value) -> Tensor")
    def query_copy(query, key, value):
        return query.clone()

    @query_copy.register_fake
    def _(query, key, value):
        return torch.empty_like(query)

    return query_copy


@contextmanager
def _attention_free(shapes: list[tuple[int, ...]] | None) -> Iterator[None]:
    """Every self-attention SDPA call (query and key of equal length) returns a copy of its query at
    once (`_query_copy_op`); their (B, H, N, D) shapes are appended to `shapes` unless it is None.
    The timed loops pass None: under torch.compile a growing list read by traced code would be
    guarded on, and recompile at every call; one eager forward beforehand records the shapes."""
    import torch.nn.functional as F

    sdpa = F.scaled_dot_product_attention
    query_copy = _query_copy_op()

    def query_only(query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:
            if shapes is not None:
                shapes.append(tuple(query.shape))
            return query_copy(query, key, value)
        return sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = query_only
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def _time_loop(model, inputs: dict[str, Any], timesteps: list[Any], warmup_steps: int) -> float:
    """Seconds of one denoising loop (one forward per timestep), after `warmup_steps` forwards at
    the leading timesteps (compilation, the dense-to-sparse switch). The loop starts a new generation."""
    import torch

    with torch.no_grad():
        for t in timesteps[:warmup_steps]:
            model(**dict(inputs, timestep=t))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for t in timesteps:
            model(**dict(inputs, timestep=t))
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def _kernel_ratio(heads: int, tokens: int, head_dim: int, keep: float, fp8: bool = False) -> float:
    """GPU time of our kernel (its FP8 path with `fp8`, quantisation included) at a random mask
    keeping `keep` of the blocks over cuDNN's dense time, at one self-attention shape: what attention
    time scales by in the attainable bound. The lookup table is built beforehand and the call is
    CUDA-graphed, so that neither index building nor the host's launches count: at FLUX's short
    sequence the FP8 call's launches took longer than its GPU work, and timed as eager calls they
    put setting B's bound below what the loop achieved. cuDNN's call is graphed too: the ratio is of
    GPU times alone, as bench kernel and bench predict take graphed times against cuDNN's graphed call."""
    import torch
    import triton

    from sparsediff.attention import BLOCK_M, BLOCK_N
    from sparsediff.bench.timing import cuda_graphed, cudnn_dense
    from sparsediff.kernels.block_sparse_attn import attention_from_lut, build_block_lut
    from sparsediff.kernels.quantize_fp8 import quantize_fp8

    q, k, v = (torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    mask = torch.rand(1, heads, -(-tokens // BLOCK_M), -(-tokens // BLOCK_N), device="cuda") < keep
    lut = build_block_lut(mask, tokens)

    def sparse_call():
        quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N) if fp8 else None
        return attention_from_lut(q, k, v, lut, head_dim**-0.5, quantized=quantized)

    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)))
    sparse = triton.testing.do_bench(cuda_graphed(sparse_call))
    return sparse / dense


def attainable_speedup(dense_s: float, attention_free_s: float, steps: int, dense_steps: int,
                       attention_time_ratio: float) -> float:
    """Speed-up of a loop of `steps` steps, timed dense (dense_s) and attention-free, whose first
    `dense_steps` steps stay dense and whose other steps take their attention time times
    `attention_time_ratio`, all else unchanged: the attainable bound at the kernel's measured time
    ratio, the ceiling at 0 (the sparse steps' attention free)."""
    step_dense = dense_s / steps
    step_sparse = attention_free_s / steps + (step_dense - attention_free_s / steps) * attention_time_ratio
    return dense_s / (dense_steps * step_dense + (steps - dense_steps) * step_sparse)


def bench_steps(case: E2ECase, frames: int, args: argparse.Namespace) -> dict[str, Any]:
    """The denoising-loop benchmark of one family (module docstring), eager and optionally compiled."""
    import torch
    from torch.nn.attention import sdpa_kernel

    import sparsediff

    model, inputs = _build(case, frames)
    steps = args.steps
    settings = _settings(args)
    t0 = float(inputs["timestep"].max()) * 2  # decreasing timesteps: the hook counts them as steps
    timesteps = [torch.full_like(inputs["timestep"], t0 * (steps - i) / steps) for i in range(steps)]
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad(), _attention_free(shapes):  # one eager forward finds the self-attention shapes
        model(**dict(inputs, timestep=timesteps[0]))
    runs: dict[str, dict[str, Any]] = {}
    modes = [(mode, mode == "compiled") for mode in MODES if mode in _items(args.modes)]
    with sdpa_kernel(_sdpa_priority(), set_priority=True):
        for mode, compiled in modes:
            if compiled:
                if getattr(model, "_repeated_blocks", None):
                    model.compile_repeated_blocks(fullgraph=True)
                    how = "compile_repeated_blocks(fullgraph=True)"
                else:
                    model = torch.compile(model)
                    how = "torch.compile(transformer)"
            row: dict[str, Any] = {"compile": how if compiled else None}
            torch.compiler.reset()
            row["dense_s"] = _time_loop(model, inputs, timesteps, warmup_steps=1)
            torch.compiler.reset()
            with _attention_free(None):
                row["attention_free_s"] = _time_loop(model, inputs, timesteps, warmup_steps=1)
            for name, setting in settings.items():
                torch.compiler.reset()
                handle = sparsediff.apply(model, cdf_threshold=setting["cdf_threshold"], sim_threshold=0.0,
                                          dense_steps=setting["dense_steps"], token_order=args.token_order,
                                          fp8=setting["fp8"], cuda_graphs=setting["cuda_graphs"])
                row[f"{name}_s"] = _time_loop(model, inputs, timesteps, warmup_steps=setting["dense_steps"] + 1)
                sparsity = handle.stats.mean_sparsity()  # after the dense steps, warm-up and timed loop
                row[f"{name}_sparsity"] = None if math.isnan(sparsity) else sparsity  # NaN: every call fell back
                sparsediff.remove(model)
            row["attention_share"] = 1.0 - row["attention_free_s"] / row["dense_s"]
            runs[mode] = row
            print(f"{case.family} {mode}: {row}", flush=True)
    _, heads, tokens, head_dim = max(shapes, key=lambda shape: shape[2])  # the long (video) self-attention
    for row in runs.values():
        for name, setting in settings.items():
            ratio = _kernel_ratio(heads, tokens, head_dim, 1.0 - (row[f"{name}_sparsity"] or 0.0), fp8=setting["fp8"])
            loop = (row["dense_s"], row["attention_free_s"], steps, setting["dense_steps"])
            speedup, bound = row["dense_s"] / row[f"{name}_s"], attainable_speedup(*loop, ratio)
            row.update({f"{name}_kernel_time_ratio": ratio, f"{name}_bound_speedup": bound, f"{name}_speedup": speedup,
                        f"{name}_fraction_of_bound": speedup / bound,
                        f"{name}_ceiling_speedup": attainable_speedup(*loop, 0.0)})
    result = {"family": case.family, "model_id": case.model_id, "height": case.height, "width": case.width,
              "frames": frames, "steps": steps, "attention_shape": [1, heads, tokens, head_dim], **settings,
              "runs": runs}
    del model, inputs
    gc.collect()
    torch.cuda.empty_cache()
    return result


def _items(comma_list: str) -> list[str]:
    return [item.strip() for item in comma_list.split(",") if item.strip()]


def _settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The sparse settings of the denoising-loop benchmark, by result-key prefix (module docstring):
    "setting_a", "setting_b", and "setting_a_no_graphs"... for the runs with cuda_graphs=False."""
    settings = {"A": (args.setting_a_cdf, SETTING_A_DENSE_FRACTION, False),
                "B": (args.setting_b_cdf, SETTING_B_DENSE_FRACTION, True)}
    return {f"setting_{letter.lower()}" + ("" if on == "on" else "_no_graphs"):
            {"label": letter + ("" if on == "on" else " no graphs"), "cdf_threshold": cdf, "sim_threshold": 0.0,
             "dense_fraction": fraction, "dense_steps": max(1, round(fraction * args.steps)), "fp8": fp8,
             "cuda_graphs": on == "on"}
            for letter, (cdf, fraction, fp8) in settings.items() if letter in _items(args.settings)
            for on in _items(args.cuda_graphs)}


def _attention_summary(handle) -> dict[str, Any]:
    profile = handle.profile
    return {"layers": len(profile.layers), "heads": next(iter(profile.layers.values())).heads,
            "token_order": profile.token_order}


def _size(case: E2ECase, frames: int) -> str:
    return f"{case.height}x{case.width}" + (f"x{frames}f" if case.frames > 1 else "")


def _run_forward(families: list[str], frames: dict[str, int], args: argparse.Namespace) -> tuple[dict, list]:
    print(f"reference setting: cdf {args.cdf}, sim {args.sim}, order {args.token_order}, dense_steps 0")
    print(f"{'family':<14} {'size':>16} {'dense s':>8} {'sparse s':>9} {'speedup':>8} {'sparsity':>9} {'rel L1':>8}")
    results = []
    for family in families:
        case = CASES[family]
        n_frames = frames.get(family, case.frames)
        r = bench_case(case, n_frames, args)
        results.append(r)
        print(f"{family:<14} {_size(case, n_frames):>16} {r['dense_s']:>8.3f} {r['sparse_s']:>9.3f} {r['speedup']:>7.2f}x "
              f"{r['sparsity']:>9.3f} {as_text(r['rel_l1'], '.4f'):>8}" + ("" if r["finite"] else "  NON-FINITE"), flush=True)
    setting = {"cdf_threshold": args.cdf, "sim_threshold": args.sim, "dense_steps": 0, "reps": args.reps}
    return setting, results


def _run_steps(families: list[str], frames: dict[str, int], args: argparse.Namespace) -> tuple[dict, list]:
    settings = _settings(args)
    print(f"denoising loop of {args.steps} steps, order {args.token_order}; " + "; ".join(
        f"setting {s['label']}: cdf {s['cdf_threshold']}, sim 0, {s['dense_fraction']:.0%} dense steps"
        + (", FP8" if s["fp8"] else "") for s in settings.values()))
    print(f"{'family':<14} {'size':>16} {'mode':>9} {'setting':>12} {'dense s':>8} {'attn share':>10} {'sparse s':>8} "
          f"{'sparsity':>8} {'speedup':>8} {'bound':>7} {'of bound':>8} {'ceiling':>7}")
    results = []
    for family in families:
        case = CASES[family]
        n_frames = frames.get(family, case.frames)
        r = bench_steps(case, n_frames, args)
        results.append(r)
        for mode, row in r["runs"].items():
            for name in settings:
                sparsity = "fallback" if row[f"{name}_sparsity"] is None else f"{row[f'{name}_sparsity']:.3f}"
                print(f"{family:<14} {_size(case, n_frames):>16} {mode:>9} {settings[name]['label']:>12} {row['dense_s']:>8.2f} "
                      f"{row['attention_share']:>10.2f} {row[f'{name}_s']:>8.2f} {sparsity:>8} "
                      f"{row[f'{name}_speedup']:>7.2f}x {row[f'{name}_bound_speedup']:>6.2f}x "
                      f"{row[f'{name}_fraction_of_bound']:>8.2f} {row[f'{name}_ceiling_speedup']:>6.2f}x", flush=True)
    return {"steps": args.steps, **settings, "modes": _items(args.modes)}, results


def plot_steps(reports: list[dict], path: Path, settings: Collection[str] | None = None) -> None:
    """One bar per (family, mode, sparse setting) of `--steps` reports: the speed-up achieved, the
    attainable bound drawn around it, the ceiling (the sparse steps' attention free) dashed above it,
    and the fraction of the bound above them. Where several reports hold the same bar, the latest one
    (by its "time") is drawn. settings: draw only these (by label: "A", "B", "A no graphs", ...); None
    draws all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsediff.io import atomic_output

    bars: dict[tuple[str, str], dict[str, tuple[float, float, float]]] = {}
    for report in sorted(reports, key=lambda r: r["time"]):
        if report["bench"] != "e2e-steps":
            raise ValueError(f"plot_steps takes `bench e2e --steps` reports, got a {report['bench']!r} report")
        for result in report["results"]:
            # Reports before 2026-12-02 name their settings by key alone ("setting_a": A).
            named = {name: (value.get("label", name.removeprefix("setting_").upper()), value["fp8"])
                     for name, value in result.items() if name.startswith("setting_") and isinstance(value, dict)}
            labels = {name: label + (" (FP8)" if fp8 else "") for name, (label, fp8) in named.items()
                      if settings is None or label in settings}
            size = f"{result['frames']}f, " if result["frames"] > 1 else ""
            for mode, row in result["runs"].items():
                group = bars.setdefault((result["family"], f"{size}{mode}, {result['steps']} steps"), {})
                for name, label in labels.items():
                    if f"{name}_speedup" in row:
                        # The ceiling from the row (reports before 2026-12-07 lack it); reports before
                        # 2026-12-02 give one count of dense steps for all settings.
                        dense_steps = result[name].get("dense_steps", result.get("dense_steps"))
                        ceiling = attainable_speedup(row["dense_s"], row["attention_free_s"], result["steps"],
                                                     dense_steps, 0.0)
                        group[label] = (row[f"{name}_speedup"], row[f"{name}_bound_speedup"], ceiling)
    if not bars:
        raise ValueError("no `bench e2e --steps` results to plot")
    colours = {label: f"C{j}" for j, label in enumerate(sorted({label for group in bars.values() for label in group}))}
    width = 0.8 / max(len(group) for group in bars.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(bars)), 4.4))
    for i, group in enumerate(bars.values()):
        for j, (label, (achieved, bound, ceiling)) in enumerate(sorted(group.items())):
            x = i + (j + 0.5 - len(group) / 2) * width
            ax.bar(x, achieved, width * 0.9, color=colours[label], label=label)
            ax.bar(x, bound, width * 0.9, fill=False, edgecolor="black", linewidth=0.8)
            ax.hlines(ceiling, x - width * 0.45, x + width * 0.45, colors="black", linestyles="dashed", linewidth=0.8)
            ax.text(x, max(achieved, bound, ceiling) + 0.03, f"{achieved / bound:.2f}", ha="center", va="bottom",
                    fontsize=7)
    handles, names = ax.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(bars)), [f"{family}\n{how}" for family, how in bars], fontsize=7)
    ax.set_ylabel("speed-up over dense\n(outline: attainable bound; dashed: ceiling)", fontsize=8)
    ax.set_title("whole denoising loop, sparse vs dense; number: achieved / bound", fontsize=9)
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    # One line however many reports: each setup once, with the dates of its runs.
    dates: dict[str, set[str]] = {}
    for r in reports:
        setup = f"{r['device']} · torch {r['versions']['torch']} · triton {r['versions']['triton']}"
        dates.setdefault(setup, set()).add(r["time"][:10])
    fig.suptitle(" | ".join(f"{setup} · {', '.join(sorted(days))}" for setup, days in sorted(dates.items())), fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    import diffusers
    import torch
    import triton

    from sparsediff.attention import DEFAULT_METHOD
    from sparsediff.io import atomic_write_json, writable_dir

    families, frames = _parse(args)
    if not torch.cuda.is_available():
        raise SystemExit("sparsediff bench e2e needs a CUDA GPU (real-size models in bf16)")
    writable_dir(args.out)
    setting, results = (_run_steps if args.steps else _run_forward)(families, frames, args)
    report = {
        "bench": "e2e-steps" if args.steps else "e2e",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "setting": {**setting, "token_order": args.token_order, "method": DEFAULT_METHOD, "dtype": "bfloat16",
                    "dense_sdpa_priority": [name.lower() for name in SDPA_PRIORITY_NAMES]},
        "results": results,
    }
    stem = "e2e-steps" if args.steps else "e2e"
    path = args.out / f"{stem}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_json(path, report)
    print(f"wrote {path}")
    if args.steps:
        plot_steps([report], path.with_suffix(".png"))
        print(f"wrote {path.with_suffix('.png')}")
    return 0
