"""`sparsediff render`: batch-render a prompt file with a recipe, sparse or dense, resumably.

For each prompt: one output (H.264 MP4 for video models, PNG for FLUX) named
`<index>-<prompt slug>-s<seed>.<ext>` and a JSON sidecar beside it (`.json`) with the prompt,
settings, profile (path + sha256), wall time, sparsity reached, peak GPU memory, versions and,
with --compare-dense, the dense render (`<name>.dense.<ext>`) with PSNR/SSIM against it.
With --random-weights a hub recipe's full-size pipeline is built from its published configs with
random weights instead of downloaded (`pipelines/random_weights.py`: for time and memory only, the
outputs are noise); its sidecars record `"random_weights": true` under "model" and "settings".
`summary.csv` lists the batch. Every file is written atomically; an item whose sidecar is
complete (and whose settings match) is skipped, so an interrupted run resumes where it stopped.
A failing prompt is logged with its traceback to `render-errors.log` and the batch goes on;
the exit code is 1 if any prompt failed.

Several processes (one device each) split the prompts by index striding:
`accelerate launch -m sparsediff render ...`, `torchrun --nproc_per_node N -m sparsediff render ...`
or `--num-processes N` (relaunches itself as N workers with torchrun's environment and supervises
them: Ctrl-C or SIGTERM stops them, a rerun renders the items they were on, and one failing stops
the others; gloo on CPU). Seeds are
drawn from CPU generators, so a prompt renders the same whichever process renders it.

With --context-parallel N the N processes instead render every prompt together: the transformer runs
under diffusers' Ulysses context parallelism (each process holds 1/N of the sequence between the
attention calls; sparse attention runs per head on the whole sequence, see
sparsediff/processors/context_parallel.py) and process 0 writes the files. Wan and FLUX recipes
only (their diffusers transformers have a context-parallel plan).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsediff.pipelines.prompts import MAX_SEED, PromptFileError, PromptSpec, load_prompts, slugify
from sparsediff.pipelines.random_weights import RANDOM_WEIGHT_RECIPES, check_random_weights
from sparsediff.pipelines.recipes import PROFILE_FAMILY, Recipe, default_recipe_name, get_recipe

logger = logging.getLogger("sparsediff")

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

SUMMARY = "summary.csv"
_EXT = {True: ".mp4", False: ".png"}  # output file type by recipe.is_video
ERROR_LOG = "render-errors.log"
SIDECAR_VERSION = 1
SUMMARY_FIELDS = (
    "index", "status", "prompt", "seed", "height", "width", "frames", "steps", "mode", "output",
    "wall_time_s", "sparsity", "psnr_db", "ssim", "peak_gpu_memory_bytes", "error",
)
# Keys a sidecar must hold for its item to count as done.
SIDECAR_KEYS = frozenset({
    "sidecar_version", "status", "index", "prompt", "negative_prompt", "seed", "settings", "model", "profile",
    "output", "dense_output", "wall_time_s", "sparsity", "peak_gpu_memory_bytes", "compare_dense", "versions",
})


class RenderError(ValueError):
    """Bad input to `render`, found before any model is loaded."""


@dataclass(frozen=True)
class Item:
    """One prompt of the batch with every setting resolved."""

    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    height: int
    width: int
    frames: int
    steps: int
    stem: str
    source_line: int

    def settings(self, plan: Plan) -> dict[str, Any]:
        """What decides the output: a sidecar with other settings is stale."""
        return {
            "model": plan.recipe.name, "mode": plan.mode, "profile_sha256": plan.profile_sha256,
            "cdf_threshold": plan.cdf_threshold, "sim_threshold": plan.sim_threshold,
            "dense_steps": plan.dense_steps, "height": self.height, "width": self.width, "frames": self.frames,
            "steps": self.steps, "guidance_scale": plan.guidance_scale, "compare_dense": plan.compare_dense,
            "dtype": plan.recipe.dtype, "fps": plan.recipe.fps,
            # Only when set, so sidecars written before the flags existed still match.
            **({"random_weights": True} if plan.random_weights else {}),
            **({"fp8": True} if plan.fp8 else {}),
        }


@dataclass
class Plan:
    """Everything `render` will do, validated before loading a model."""

    recipe: Recipe
    out_dir: Path
    items: list[Item]
    mode: str  # "sparse" | "dense"
    profile_path: Path | None
    profile_source: str | None  # "argument" | "shipped" | None (apply() defaults, or dense)
    profile_sha256: str | None
    cdf_threshold: float | None
    sim_threshold: float | None
    dense_steps: int | None
    guidance_scale: float
    compare_dense: bool
    profile: Any = field(default=None, repr=False)  # SparsityProfile
    random_weights: bool = False  # build the pipeline from configs with random weights (Recipe.load)
    context_parallel: int = 1  # processes rendering each prompt together (Ulysses degree); 1: off
    fp8: bool = False  # sparse attention through the FP8 (e4m3) kernel path
    cuda_graphs: bool = True  # apply(cuda_graphs=): replay sparse calls as CUDA graphs (same output)

    @property
    def ext(self) -> str:
        return _EXT[self.recipe.is_video]

    def _output(self, item: Item, ext: str, dense: bool) -> Path:
        return self.out_dir / f"{item.stem}{'.dense' if dense else ''}{ext}"

    def output(self, item: Item) -> Path:
        return self._output(item, self.ext, dense=False)

    def dense_output(self, item: Item) -> Path:
        return self._output(item, self.ext, dense=True)

    def sidecar(self, item: Item) -> Path:
        return self.out_dir / f"{item.stem}.json"

    def files(self, item: Item) -> list[Path]:
        """Every file `item` may have, the sidecar first (it is what marks the item done): its outputs
        under either output type, since an earlier run of the same item with a video model left .mp4
        files where an image model writes .png (and the other way round)."""
        return [self.sidecar(item), *(self._output(item, ext, dense) for ext in _EXT.values() for dense in (False, True))]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="recipe name (see `sparsediff models`) or a local diffusers pipeline folder "
                             "(default: toy-shapes where installed, else tiny-wan)")
    parser.add_argument("--prompts", required=True, type=Path,
                        help="prompt file: .txt (one per line, # comments), .jsonl or .csv with fields prompt, "
                             "negative_prompt, seed, height, width, frames, steps")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; reruns resume in it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--profile", type=Path, default=None,
                      help="sparsity profile JSON (default: the one shipped for the recipe, else apply() defaults)")
    mode.add_argument("--dense", action="store_true", help="render with the stock dense attention")
    parser.add_argument("--compare-dense", action="store_true",
                        help="also render dense with the same seed; record PSNR/SSIM in the sidecar")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts that set none (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the recipe's)")
    parser.add_argument("--height", type=int, default=None, help="height in pixels (default: the recipe's)")
    parser.add_argument("--width", type=int, default=None, help="width in pixels (default: the recipe's)")
    parser.add_argument("--frames", type=int, default=None, help="frames of video models (default: the recipe's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the recipe's)")
    parser.add_argument("--negative-prompt", default=None,
                        help="negative prompt of prompts that set none (default: the recipe's, if any)")
    parser.add_argument("--cdf-threshold", type=float, default=None, help="override every head's cdf threshold")
    parser.add_argument("--sim-threshold", type=float, default=None, help="override every head's sim threshold")
    parser.add_argument("--dense-steps", type=int, default=None, help="override the leading dense steps")
    parser.add_argument("--fp8", action="store_true",
                        help="sparse attention in e4m3 (Q·K and P·V; CUDA sm89+): faster on long sequences, "
                             "about 2 points more attention error (README)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="launch the sparse kernels at every attention call instead of replaying each call "
                             "shape's CUDA graph: the same output, slower where launches dominate (FLUX), and "
                             "about 4x one call's q of GPU memory less per call shape")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the recipe's full-size pipeline from its published configs with random "
                             "weights on the device instead of downloading it (time/memory runs; outputs are "
                             "noise; prompts are byte-tokenized). Supported: "
                             + ", ".join(RANDOM_WEIGHT_RECIPES))
    parser.add_argument("--num-processes", type=int, default=1,
                        help="split the prompts over N processes (one GPU each; gloo on CPU) by relaunching "
                             "itself as N workers")
    parser.add_argument("--context-parallel", type=int, default=1, metavar="N",
                        help="render each prompt with N processes together (one GPU each; gloo on CPU): "
                             "Ulysses context parallelism, sparse attention per head over the whole sequence; "
                             "N must divide the attention heads. Launch N processes with torchrun/accelerate, "
                             "or let it relaunch itself. Wan and FLUX recipes only")


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except (RenderError, PromptFileError) as e:
        print(f"sparsediff render: error: {e}", file=sys.stderr)
        return 2
    processes = _processes_asked(args)
    relaunch = processes > 1 and _launched_processes() == 1
    try:
        with INTERRUPTS.installed():
            return _relaunch(args, processes) if relaunch else render_plan(plan)
    except KeyboardInterrupt:
        print("\nsparsediff render: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


class InterruptLatch:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt, as Python's own handler does, and is remembered.

    Python drops a KeyboardInterrupt raised where it cannot propagate (a finalizer, an at-fork hook)
    after printing it as "Exception ignored". imageio-ffmpeg starts ffmpeg with a `preexec_fn`, so each
    MP4 write runs logging's at-fork `_releaseLock`; a SIGINT landing there was dropped, and the worker
    rendered on into the final barrier, which its stopped peers had left, and died there with gloo's
    traceback (tests/test_render.py's Ctrl-C test, 1 run in 3 on a 2-core CPU). While installed, that
    dropped interrupt prints nothing and `check()`, at the item boundaries, raises it again."""

    def __init__(self) -> None:
        self.requested = False
        self._hook = sys.unraisablehook

    def on_signal(self, signum: int, frame: object) -> None:
        """The handler: SIGINT while installed, and the launcher's SIGTERM (a scheduler's stop, taken as Ctrl-C)."""
        self.requested = True
        raise KeyboardInterrupt

    def _unraisable(self, unraisable: Any) -> None:
        if not (self.requested and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            self._hook(unraisable)

    def check(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C received since `installed()`."""
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """Handle SIGINT here while the block runs (in the main thread only: elsewhere signals are not ours)."""
        self.requested = False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous, self._hook = signal.signal(signal.SIGINT, self.on_signal), sys.unraisablehook
        sys.unraisablehook = self._unraisable
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            sys.unraisablehook = self._hook


INTERRUPTS = InterruptLatch()


# --------------------------------------------------------------------------- planning (no model loaded)


def _processes_asked(args: argparse.Namespace) -> int:
    """The process count the command line asks for (--num-processes, or --context-parallel's degree)."""
    return max(args.num_processes, args.context_parallel)


def _launched_processes() -> int:
    """How many processes a launcher (accelerate launch, torchrun, our own relaunch) started: WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_profile(path: Path, recipe: Recipe, origin: str) -> Any:
    """Read a profile and refuse it when it names another family or model (full check after load)."""
    from sparsediff.io import input_file_problem
    from sparsediff.profile import SparsityProfile

    problem = input_file_problem(path, "sparsity profile")
    if problem is not None:
        raise RenderError(f"{origin}: {problem}")
    try:
        profile = SparsityProfile.load(path)
    except (ValueError, OSError) as e:
        raise RenderError(f"{origin}: {path} is not a valid sparsity profile ({e})") from None
    if profile.family != PROFILE_FAMILY[recipe.family]:
        raise RenderError(f"{origin}: {path} is a profile for the {profile.family} family, "
                          f"but {recipe.name} is {recipe.family}")
    # A local folder may hold any checkpoint of its family: only the layer check after loading applies.
    local = recipe.source == "hub" and recipe.hub_id and Path(recipe.hub_id).is_dir()
    if profile.model_id and not local and profile.model_id not in recipe.model_ids:
        raise RenderError(f"{origin}: {path} is a profile for {profile.model_id!r}, not for {recipe.name}")
    return profile


def _warn_if_calibrated_at_other_settings(profile: Any, path: Path, items: list[Item], guidance_scale: float) -> None:
    """A profile keeps each head's error within its budget at the settings it was calibrated at: at others
    frames may stray further from dense. Said once, not refused (the render is still what was asked)."""
    differences = profile.calibration_differences(
        guidance_scale=[guidance_scale], **{key: [getattr(item, key) for item in items]
                                            for key in ("height", "width", "frames", "steps")})
    if differences:
        logger.warning("%s was calibrated at other settings than this render's: %s. Its thresholds hold each head "
                       "within the error budget at the calibrated settings, and frames may stray further from dense "
                       "at others (`sparsediff calibrate` with this render's settings fits them)",
                       path, "; ".join(differences))


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate every input and resolve every setting; raise RenderError/PromptFileError on bad input."""
    from sparsediff.io import mp4_writer_problem, writable_dir
    from sparsediff.profile import check_overrides

    if args.num_processes < 1:
        raise RenderError(f"--num-processes: must be >= 1, got {args.num_processes}")
    if args.context_parallel < 1:
        raise RenderError(f"--context-parallel: must be >= 1, got {args.context_parallel}")
    launched, asked = _launched_processes(), _processes_asked(args)
    if launched > 1 and asked not in (1, launched):
        # Under a launcher the processes exist already: the flag would be ignored without a word.
        raise RenderError(f"--num-processes {args.num_processes} / --context-parallel {args.context_parallel}: this "
                          f"command already runs as one of {launched} launched processes (WORLD_SIZE); give "
                          f"{launched} or leave the process count to the launcher")
    if args.context_parallel > 1 and args.num_processes not in (1, args.context_parallel):
        raise RenderError(f"--num-processes {args.num_processes} and --context-parallel {args.context_parallel}: "
                          f"under context parallelism all processes render each prompt together; give one of them")
    if launched == 1 and asked > 1:
        import torch

        gpus = torch.cuda.device_count()  # 0: CPU processes (gloo), as many as asked
        if 0 < gpus < asked:
            # Each worker takes the GPU of its rank: the surplus ones failed, each with its own traceback.
            raise RenderError(f"--num-processes {args.num_processes} / --context-parallel {args.context_parallel}: "
                              f"one GPU a process, and {gpus} GPU(s) are visible here")
    if args.dense and args.profile is not None:
        raise RenderError("--profile and --dense exclude each other")
    if args.dense and (args.fp8 or not args.cuda_graphs or args.compare_dense
                       or any(v is not None for v in (args.cdf_threshold, args.sim_threshold, args.dense_steps))):
        raise RenderError("--cdf-threshold/--sim-threshold/--dense-steps/--fp8/--no-cuda-graphs/--compare-dense "
                          "have no effect with --dense")
    for name in ("steps", "height", "width", "frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise RenderError(f"--{name}: must be >= 1, got {value}")
    if not 0 <= args.seed <= MAX_SEED:
        raise RenderError(f"--seed: must be in [0, {MAX_SEED}] (64 bits), got {args.seed}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise RenderError(f"--guidance-scale: must be a finite number, got {args.guidance_scale}")
    for flag, override in (("--cdf-threshold", dict(cdf_threshold=args.cdf_threshold)),
                           ("--sim-threshold", dict(sim_threshold=args.sim_threshold)),
                           ("--dense-steps", dict(dense_steps=args.dense_steps))):
        try:
            check_overrides(**override)
        except ValueError as e:
            raise RenderError(f"{flag}: {e}") from None
    try:
        recipe = get_recipe(args.model or default_recipe_name())
    except ValueError as e:
        raise RenderError(str(e).replace("model:", "--model:", 1)) from None
    if args.context_parallel > 1:
        _check_context_parallel(recipe)
    if args.random_weights:
        try:
            check_random_weights(recipe)
        except ValueError as e:
            raise RenderError(str(e).replace("random_weights:", "--random-weights:", 1)) from None
    try:  # the command line's sizes first, so their errors name the flag
        recipe.check_size(args.height or recipe.height, args.width or recipe.width, args.frames or recipe.frames)
    except ValueError as e:
        raise RenderError(f"--{e}") from None
    if recipe.is_video and (problem := mp4_writer_problem()) is not None:
        # Found here, not after the first item's render (each item failed at its end, the batch rendered for nothing).
        raise RenderError(problem)
    specs = load_prompts(args.prompts)
    items = [_item(i, spec, args, recipe) for i, spec in enumerate(specs)]
    mode = "dense" if args.dense else "sparse"
    profile_path, profile_source, profile = None, None, None
    if args.profile is not None:
        profile_path, profile_source = args.profile, "argument"
        profile = _load_profile(args.profile, recipe, "--profile")
    elif mode == "sparse" and recipe.shipped_profile() is not None:
        profile_path, profile_source = recipe.shipped_profile(), "shipped"
        profile = _load_profile(profile_path, recipe, "shipped profile")
    guidance_scale = recipe.guidance_scale if args.guidance_scale is None else args.guidance_scale
    if profile is not None and os.environ.get("RANK", "0") == "0":  # once, not again from each launched worker
        _warn_if_calibrated_at_other_settings(profile, profile_path, items, guidance_scale)
    try:  # last: a command refused for another reason leaves no new empty folder
        writable_dir(args.out)
    except ValueError as e:
        raise RenderError(str(e)) from None
    return Plan(
        recipe=recipe, out_dir=args.out, items=items, mode=mode, profile_path=profile_path,
        profile_source=profile_source, profile_sha256=_file_sha256(profile_path) if profile_path else None,
        cdf_threshold=args.cdf_threshold, sim_threshold=args.sim_threshold, dense_steps=args.dense_steps,
        guidance_scale=guidance_scale,
        compare_dense=args.compare_dense, profile=profile, random_weights=args.random_weights,
        context_parallel=args.context_parallel, fp8=args.fp8, cuda_graphs=args.cuda_graphs,
    )


def _check_context_parallel(recipe: Recipe) -> None:
    from sparsediff.processors.context_parallel import CONTEXT_PARALLEL_FAMILIES  # imports diffusers

    if PROFILE_FAMILY[recipe.family] not in CONTEXT_PARALLEL_FAMILIES:
        raise RenderError(f"--context-parallel: {recipe.name} is a {recipe.family} model, whose diffusers "
                          f"transformer has no context-parallel plan; supported families: "
                          f"{', '.join(CONTEXT_PARALLEL_FAMILIES)}")


def _item(index: int, spec: PromptSpec, args: argparse.Namespace, recipe: Recipe) -> Item:
    """Per-prompt values win over the command line, which wins over the recipe."""
    def pick(own: int | None, flag: int | None, default: int) -> int:
        return own if own is not None else flag if flag is not None else default

    seed = pick(spec.seed, args.seed, 0)
    height, width = pick(spec.height, args.height, recipe.height), pick(spec.width, args.width, recipe.width)
    frames = pick(spec.frames, args.frames, recipe.frames)
    try:
        recipe.check_size(height, width, frames)
    except ValueError as e:
        raise RenderError(f"{args.prompts}:{spec.line}: {e}") from None
    negative = spec.negative_prompt if spec.negative_prompt is not None else (
        args.negative_prompt if args.negative_prompt is not None else recipe.negative_prompt)
    return Item(
        index=index, prompt=spec.prompt, negative_prompt=negative, seed=seed, height=height, width=width,
        frames=frames, steps=pick(spec.steps, args.steps, recipe.steps),
        stem=f"{index:04d}-{slugify(spec.prompt)}-s{seed}", source_line=spec.line,
    )


# --------------------------------------------------------------------------- multi-process


def _forward_argv(args: argparse.Namespace) -> list[str]:
    """The command line of `args` without --num-processes (for the relaunched workers)."""
    # `--flag=value`: a value starting with "-" (a negative prompt, a path) would be read as an option.
    argv = ["render", f"--prompts={args.prompts}", f"--out={args.out}", f"--seed={args.seed}",
            f"--context-parallel={args.context_parallel}"]
    if args.model is not None:
        argv += [f"--model={args.model}"]
    for flag, value in (("--profile", args.profile), ("--steps", args.steps), ("--height", args.height),
                        ("--width", args.width), ("--frames", args.frames),
                        ("--guidance-scale", args.guidance_scale), ("--negative-prompt", args.negative_prompt),
                        ("--cdf-threshold", args.cdf_threshold), ("--sim-threshold", args.sim_threshold),
                        ("--dense-steps", args.dense_steps)):
        if value is not None:
            argv += [f"{flag}={value}"]
    argv += ["--dense"] * args.dense + ["--compare-dense"] * args.compare_dense
    argv += ["--random-weights"] * args.random_weights + ["--fp8"] * args.fp8
    argv += ["--no-cuda-graphs"] * (not args.cuda_graphs)
    return argv


STOP_GRACE_S = 30.0  # how long stopped workers get to save their summary parts before they are killed


def _relaunch(args: argparse.Namespace, processes: int) -> int:
    """Run this render in `processes` worker processes of this machine, each given the environment
    torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...), and supervise them."""
    with socket.socket() as probe:  # a free port for the workers' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes),
           "LOCAL_WORLD_SIZE": str(processes)}
    # Not torchrun's one thread a process, which leaves a CPU render most of the machine idle.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    cmd = [sys.executable, "-m", "sparsediff", *_forward_argv(args)]
    # In their own session, Ctrl-C in a terminal reaches this process alone, which passes it on once:
    # a worker hit twice would be stopped while it saves its summary part.
    workers = [subprocess.Popen(cmd, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, start_new_session=True)
               for rank in range(processes)]
    previous = signal.signal(signal.SIGTERM, INTERRUPTS.on_signal)  # a scheduler's stop is taken as Ctrl-C
    try:
        return _supervise(workers)
    except KeyboardInterrupt:
        _stop(workers)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _supervise(workers: list[subprocess.Popen]) -> int:
    """Wait for every worker; 0 when all succeed, else 1. Once one fails the others are stopped: they
    would wait for it at the final barrier (a worker's failed items end it with 1 only after that
    barrier, so its peers are exiting too: they get a few seconds first)."""
    while True:
        INTERRUPTS.check()
        codes = [w.poll() for w in workers]
        if None not in codes:
            return 0 if not any(codes) else 1
        if any(codes):
            _stop(workers, after_s=5.0)
            return 1
        time.sleep(0.1)


def _stop(workers: list[subprocess.Popen], after_s: float = 0.0) -> None:
    """Stop the running workers, after waiting `after_s` for them to exit on their own: a SIGINT each
    (it saves its summary part and exits), then a kill for any still running after STOP_GRACE_S (a
    worker blocked in the final barrier never sees the SIGINT)."""
    deadline = time.monotonic() + after_s
    while time.monotonic() < deadline and any(w.poll() is None for w in workers):
        time.sleep(0.1)
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    for w in workers:
        try:
            w.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()


# --------------------------------------------------------------------------- rendering


def _versions(device: torch.device) -> dict[str, str | None]:
    import importlib.metadata

    import torch

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("sparsediff", "triton", "diffusers", "transformers", "accelerate"):
        out[dist] = version(dist)
    out["torch"] = torch.__version__  # with its build tag (+cu130, +cpu), which the dist metadata may omit
    out["cuda"] = torch.version.cuda
    out["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return out


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _earlier_sidecar(plan: Plan, item: Item) -> dict[str, Any] | None:
    """The complete sidecar an earlier run wrote for `item`'s file name, whatever its settings, else None."""
    try:
        data = json.loads(plan.sidecar(item).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not SIDECAR_KEYS <= data.keys() or data["status"] != "ok" \
            or not isinstance(data["settings"], dict):
        return None
    return data


def _changes(plan: Plan, item: Item, earlier: dict[str, Any]) -> list[str]:
    """What differs between an earlier sidecar and `item` as this run renders it (empty: the same)."""
    def what(prompt: Any, negative: Any, seed: Any, settings: dict[str, Any]) -> dict[str, Any]:
        return {"prompt": prompt, "negative_prompt": negative, "seed": seed, **settings}

    now = what(item.prompt, item.negative_prompt, item.seed, item.settings(plan))
    before = what(earlier["prompt"], earlier["negative_prompt"], earlier["seed"], earlier["settings"])
    return sorted(key for key in now.keys() | before.keys() if now.get(key) != before.get(key))


def _outputs_present(plan: Plan, item: Item) -> bool:
    return plan.output(item).is_file() and (not plan.compare_dense or plan.dense_output(item).is_file())


def generate(
    pipe: DiffusionPipeline, recipe: Recipe, device: torch.device, *, prompt: str, negative_prompt: str | None,
    seed: int, height: int, width: int, frames: int, steps: int, guidance_scale: float,
    callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
) -> tuple[np.ndarray, float, int | None]:
    """One pipeline call as every sparsediff front end makes it (render, calibrate, demo).

    Returns (frames (F, H, W, 3) float in [0, 1], wall seconds, peak GPU bytes or None on CPU).
    """
    import torch

    kwargs: dict[str, Any] = dict(
        prompt=prompt, height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance_scale, output_type="np",
        # CPU generator: the same noise on every device and in every process.
        generator=torch.Generator(device="cpu").manual_seed(seed),
        **dict(recipe.call_kwargs),
    )
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if recipe.is_video:
        kwargs["num_frames"] = frames
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = pipe(**kwargs)
    if cuda:
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    video = result.frames[0] if recipe.is_video else result.images[0][None]
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    return video, wall, peak


class Renderer:
    """Holds the loaded pipeline of one process and renders items with it."""

    def __init__(self, plan: Plan, device: torch.device, writes: bool = True) -> None:
        """writes: this process writes the outputs and sidecars (under context parallelism only process 0)."""
        self.plan = plan
        self.device = device
        self.writes = writes
        if plan.fp8:
            from sparsediff.kernels.block_sparse_attn import fp8_unsupported

            if reason := fp8_unsupported(device):  # apply() would run those calls dense: say so instead
                raise RenderError(f"--fp8: {reason}")
        self.pipe: DiffusionPipeline = plan.recipe.load(device, random_weights=plan.random_weights)
        if plan.profile is not None:  # once, here: a profile naming no model could only be checked now
            try:
                plan.profile.check_fits(self.pipe)
            except ValueError as e:
                origin = "--profile" if plan.profile_source == "argument" else "shipped profile"
                raise RenderError(f"{origin}: {plan.profile_path}: {e}") from None
        if plan.context_parallel > 1:
            from sparsediff.processors.context_parallel import enable_context_parallel

            # Once, before any apply(): apply()/remove() hand the parallel config on to the processors
            # they set, so --compare-dense can switch between sparse and stock per item.
            try:
                enable_context_parallel(self.pipe, plan.context_parallel)
            except ValueError as e:
                raise RenderError(f"--context-parallel: {e}") from None
        self.handle = None  # the sparse attention's handle, from the first sparse render on
        self.sparse_on = False
        self.versions = _versions(device)

    def _sparse(self, on: bool) -> None:
        """Switch the pipeline's attention to sparse or stock. The first switch applies sparsediff;
        later ones remove and reapply the same handle, so its CUDA graphs are not captured again."""
        import sparsediff

        if on and not self.sparse_on:
            if self.handle is None:
                self.handle = sparsediff.apply(
                    self.pipe, self.plan.profile, cdf_threshold=self.plan.cdf_threshold,
                    sim_threshold=self.plan.sim_threshold, dense_steps=self.plan.dense_steps, fp8=self.plan.fp8,
                    cuda_graphs=self.plan.cuda_graphs)
            else:
                self.handle.reapply()
        elif not on and self.sparse_on:
            self.handle.remove()
        self.sparse_on = on

    def _generate(self, item: Item) -> tuple[np.ndarray, float, int | None]:
        """(frames (F, H, W, 3) float in [0, 1], wall seconds, peak GPU bytes or None)."""
        return generate(self.pipe, self.plan.recipe, self.device, prompt=item.prompt,
                        negative_prompt=item.negative_prompt, seed=item.seed, height=item.height,
                        width=item.width, frames=item.frames, steps=item.steps,
                        guidance_scale=self.plan.guidance_scale)

    def _write(self, path: Path, frames: np.ndarray) -> None:
        from sparsediff.io import write_png, write_video_mp4

        if not self.writes:
            return
        if self.plan.recipe.is_video:
            write_video_mp4(path, frames, fps=self.plan.recipe.fps)
        else:
            write_png(path, frames[0])

    def render(self, item: Item, rank: int, world: int) -> dict[str, Any]:
        """Render `item`, write its output(s) and then its sidecar; return the sidecar."""
        import torch

        from sparsediff.io import atomic_write_json, remove_stale_temps
        from sparsediff.metrics import relative_l1, video_psnr, video_ssim

        plan = self.plan
        for path in plan.files(item) if self.writes else ():
            # An earlier run's files go first, the sidecar before its outputs: a run killed after writing
            # a new output must not leave it under the old sidecar, which would pass it as done.
            path.unlink(missing_ok=True)
            remove_stale_temps(path)  # left by a killed earlier run; this process owns the item now
        self._sparse(plan.mode == "sparse")
        handle = self.handle if self.sparse_on else None
        if handle is not None:
            handle.reset()
        frames, wall, peak = self._generate(item)
        sparsity = _finite(handle.stats.mean_sparsity(after_dense_steps=True)) if handle else None
        per_step = [_finite(x) for x in handle.stats.per_step().tolist()] if handle else None
        fallbacks = handle.stats.fallback_summary() if handle else None
        dense_steps = handle.profile.dense_steps if handle else None
        if handle is not None and item.steps <= dense_steps:
            from sparsediff._runtime import warn_once

            warn_once(f"render:all-dense:{item.steps}:{dense_steps}",
                      f"sparsediff: {item.steps} step(s) lie within the profile's {dense_steps} dense step(s): the "
                      f"render runs dense throughout (sparsity null); render more than {dense_steps} steps")
        self._write(plan.output(item), frames)

        comparison, dense_wall = None, None
        if plan.compare_dense:
            self._sparse(False)
            dense_frames, dense_wall, dense_peak = self._generate(item)
            self._write(plan.dense_output(item), dense_frames)
            psnr = video_psnr(frames, dense_frames)
            comparison = {
                "psnr_db": _finite(psnr),
                "frames_identical": math.isinf(psnr),
                "ssim": video_ssim(frames, dense_frames),
                "relative_l1": float(relative_l1(torch.from_numpy(frames), torch.from_numpy(dense_frames))),
                "dense_wall_time_s": dense_wall,
                "dense_peak_gpu_memory_bytes": dense_peak,
                "speedup": dense_wall / wall if wall > 0 else None,
            }

        sidecar = {
            "sidecar_version": SIDECAR_VERSION,
            "status": "ok",
            "index": item.index,
            "prompt": item.prompt,
            "negative_prompt": item.negative_prompt,
            "seed": item.seed,
            "source_line": item.source_line,
            "settings": item.settings(plan),
            "model": {"name": plan.recipe.name, "family": plan.recipe.family, "hub_id": plan.recipe.hub_id,
                      "pipeline_class": plan.recipe.pipeline_class, "random_weights": plan.random_weights},
            "profile": {"path": str(plan.profile_path) if plan.profile_path else None,
                        "sha256": plan.profile_sha256, "source": plan.profile_source,
                        "effective_dense_steps": dense_steps},
            "output": plan.output(item).name,
            "dense_output": plan.dense_output(item).name if plan.compare_dense else None,
            "frames": int(frames.shape[0]),
            "fps": plan.recipe.fps,
            "wall_time_s": wall,
            "sparsity": sparsity,
            "sparsity_per_step": per_step,
            "dense_fallbacks": fallbacks,
            "peak_gpu_memory_bytes": peak,
            "compare_dense": comparison,
            "device": str(self.device),
            "process": {"rank": rank, "world_size": world, "context_parallel": plan.context_parallel},
            "versions": self.versions,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.writes:
            atomic_write_json(plan.sidecar(item), sidecar)
        return sidecar


def _row(item: Item, plan: Plan, status: str, sidecar: dict[str, Any] | None, error: str = "") -> dict[str, Any]:
    row = {"index": item.index, "status": status, "prompt": item.prompt, "seed": item.seed,
           "height": item.height, "width": item.width, "frames": item.frames, "steps": item.steps,
           "mode": plan.mode, "output": plan.output(item).name if sidecar else "", "error": error}
    if sidecar:
        comparison = sidecar.get("compare_dense") or {}
        row.update(wall_time_s=sidecar["wall_time_s"], sparsity=sidecar["sparsity"],
                   # identical frames: "inf" (the sidecar's psnr_db is null, JSON has no infinity), not a blank
                   psnr_db="inf" if comparison.get("frames_identical") else comparison.get("psnr_db"),
                   ssim=comparison.get("ssim"),
                   peak_gpu_memory_bytes=sidecar["peak_gpu_memory_bytes"])
    return row


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    from sparsediff.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, restval="", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: int(r["index"])):
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in SUMMARY_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _log_failure(plan: Plan, item: Item, rank: int) -> str:
    """Append the current exception's traceback to the error log; return its one-line summary."""
    exc_type, exc, _ = sys.exc_info()
    summary = f"{exc_type.__name__}: {exc}"
    with open(plan.out_dir / ERROR_LOG, "a", encoding="utf-8") as f:
        f.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} rank {rank} item {item.index} "
                f"({item.stem}; line {item.source_line}) ===\n{traceback.format_exc()}\n")
    return summary


def render_plan(plan: Plan) -> int:
    """Render this process's share of `plan`; 0 when every item succeeded, else 1."""
    import torch
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from sparsediff.io import remove_stale_temps

    # The only collective is the final barrier, reached by ranks whose shares may finish hours
    # apart: the process group's default timeout (minutes) would abort the merge.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(days=7))
    rank, world = state.process_index, state.num_processes
    if plan.context_parallel > 1 and world != plan.context_parallel:
        print(f"sparsediff render: error: --context-parallel {plan.context_parallel} needs exactly that many "
              f"processes, got {world}", file=sys.stderr)
        return 2
    # Under context parallelism every process renders every item, and process 0 writes the files.
    sharded = plan.context_parallel == 1
    writes = sharded or rank == 0
    mine = plan.items[rank::world] if sharded else plan.items  # index striding: deterministic and balanced
    part = plan.out_dir / (SUMMARY if world == 1 or not sharded else _summary_part(rank, world))
    if writes:
        remove_stale_temps(part)
        if rank == 0:  # an interrupted run's parts of another layout: their items' sidecars say what they did
            ours = {_summary_part(r, world) for r in range(world)} if sharded and world > 1 else set()
            for stale in plan.out_dir.glob(_summary_part("*", "*")):
                if stale.name not in ours:
                    stale.unlink(missing_ok=True)
    rows: list[dict[str, Any]] = []

    def save_rows() -> None:
        if writes:
            _write_summary(part, rows)

    todo, changed = [], []
    for item in mine:
        earlier = _earlier_sidecar(plan, item)
        keys = [] if earlier is None else _changes(plan, item, earlier)
        if earlier is not None and not keys and _outputs_present(plan, item):
            rows.append(_row(item, plan, "skipped", earlier))
            for path in plan.files(item) if writes else ():
                remove_stale_temps(path)  # a killed rerun's (of other settings), which no later run would reach
            continue
        todo.append(item)
        if keys:
            changed.append((item, keys))
    save_rows()  # also when empty: this rank's part replaces any an interrupted run left
    if rows:
        tqdm.write(f"[rank {rank}] {len(rows)} of {len(mine)} item(s) already done, skipped")
    if changed:
        item, keys = changed[0]
        tqdm.write(f"[rank {rank}] {len(changed)} item(s) in {plan.out_dir} were rendered with other settings "
                   f"(first: {item.stem}, {', '.join(keys)}); rendering them again, replacing their files")

    failed = 0
    renderer: Renderer | None = None
    if todo:
        try:
            renderer = Renderer(plan, state.device, writes)
            renderer.pipe.set_progress_bar_config(desc="denoise", leave=False, position=world + rank)
        except Exception:  # a model that does not load fails every item of this process, once
            summary = _log_failure(plan, todo[0], rank)
            tqdm.write(f"[rank {rank}] loading {plan.recipe.name} failed: {summary} "
                       f"(traceback in {plan.out_dir / ERROR_LOG})")
            rows.extend(_row(item, plan, "failed", None, f"model load: {summary}") for item in todo)
            failed, todo = len(todo), []
            save_rows()
    bar = tqdm(todo, desc=f"render[{rank}/{world}]" if world > 1 else "render", unit="item", position=rank)
    for done, item in enumerate(bar):
        bar.set_postfix_str(item.stem[:40])
        try:
            INTERRUPTS.check()
            rows.append(_row(item, plan, "ok", renderer.render(item, rank, world)))
        except KeyboardInterrupt:  # the summary lists what is left, so it does not read as a finished batch
            rows.extend(_row(rest, plan, "interrupted", None, "not rendered: interrupted") for rest in todo[done:])
            save_rows()
            raise
        except Exception:  # one failing prompt must not stop the batch
            summary = _log_failure(plan, item, rank)
            failed += 1
            tqdm.write(f"[rank {rank}] item {item.index} ({item.stem}) failed: {summary} "
                       f"(traceback in {plan.out_dir / ERROR_LOG})")
            rows.append(_row(item, plan, "failed", None, summary))
        save_rows()
    bar.close()

    if world > 1:
        INTERRUPTS.check()  # not into the barrier after a Ctrl-C: the stopped peers never reach it
        state.wait_for_everyone()
        if sharded and state.is_main_process:
            failed_anywhere = _merge_summaries(plan.out_dir, world)
            return 1 if failed_anywhere else 0
    return 1 if failed else 0


def _summary_part(rank: int | str, world: int | str) -> str:
    """The name of one process's part of the summary (a glob with "*")."""
    return f"summary.rank{rank}-of-{world}.csv"


def _merge_summaries(out_dir: Path, world: int) -> bool:
    """Merge the per-process summaries into summary.csv (then delete them); True if any item failed."""
    from sparsediff.io import remove_stale_temps

    remove_stale_temps(out_dir / SUMMARY)
    rows: list[dict[str, Any]] = []
    parts = [out_dir / _summary_part(r, world) for r in range(world)]
    for part in parts:
        if part.is_file():
            with open(part, newline="", encoding="utf-8") as f:
                rows.extend(csv.DictReader(f))
    _write_summary(out_dir / SUMMARY, rows)
    for part in parts:
        part.unlink(missing_ok=True)
    return any(row["status"] == "failed" for row in rows)
