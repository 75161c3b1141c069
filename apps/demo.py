"""`sparsediff demo`: a Gradio page that renders one prompt dense and sparse and compares the two.

One Generate renders the prompt with the model's stock attention, then applies sparsediff to the
same pipeline (the recipe's shipped profile, a `--profile` or uploaded one, or uniform thresholds
from the sliders), renders again with the same seed and removes it. The page shows both outputs
side by side with their amplified difference, the wall time of each and the speed-up, the
sparsity reached, PSNR/SSIM of sparse against dense, and heatmaps of sparsity per layer x head
and per layer x step. Requests run one at a time; bad input is refused with a message and the
app keeps serving. The page binds 127.0.0.1 unless --host says otherwise, and makes a public
link only with --share.

`DemoSession` holds the loaded model and does the rendering (usable without a browser);
`build_app` lays out the page around one session.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import gradio as gr
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    from matplotlib.figure import Figure

    from sparsediff.pipelines.recipes import Recipe
    from sparsediff.processors.api import SparseHandle
    from sparsediff.processors.controller import SparsityStats
    from sparsediff.profile import SparsityProfile

logger = logging.getLogger("sparsediff")

DIFF_GAIN = 8.0  # the difference view shows |dense - sparse| times this: small errors become visible
MAX_SEED = 2**32 - 1  # the seed box travels as a JavaScript double: far below 2**53, every seed stays exact
SIZE_HEADROOM = 1.5  # height and width may go this far above the recipe's default
PROFILE, THRESHOLDS = "profile", "thresholds"  # the two ways of choosing the sparse settings

# (step label, 1-based step, steps of one render): called after every denoising step.
StepCallback = Callable[[str, int, int], None]


class InputError(ValueError):
    """A request the page refuses with a message; the app keeps serving."""


@dataclass(frozen=True)
class Limits:
    """The ranges the page offers for one recipe (and `DemoSession` accepts)."""

    max_height: int
    max_width: int
    max_frames: int  # 1 for image models
    max_steps: int

    @classmethod
    def of(cls, recipe: Recipe) -> Limits:
        m = recipe.size_multiple

        def cap(default: int) -> int:
            return max(m, int(default * SIZE_HEADROOM) // m * m)

        # Longer clips than the model's default are outside what it was trained on, and memory grows
        # quadratically in attention; more steps than twice the default buy nothing visible.
        return cls(cap(recipe.height), cap(recipe.width), recipe.frames, 2 * recipe.steps)


@dataclass(frozen=True)
class Request:
    """One Generate: what to render and which sparse settings to use."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    height: int
    width: int
    frames: int
    source: str  # PROFILE or THRESHOLDS
    profile_file: str | None = None  # an uploaded profile (PROFILE); None: the session's default
    # THRESHOLDS only; None: the default of `sparsediff.apply` without a profile.
    cdf_threshold: float | None = None
    sim_threshold: float | None = None
    dense_steps: int | None = None
    fp8: bool = False  # sparse attention through the FP8 (e4m3) kernel path


@dataclass
class Comparison:
    """The result of one Generate."""

    dense: np.ndarray  # (F, H, W, 3) float in [0, 1]; F = 1 for image models
    sparse: np.ndarray
    dense_s: float  # wall seconds of the whole pipeline call
    sparse_s: float
    stats: SparsityStats  # of the sparse render only
    settings: str  # the sparse settings used, in words
    request: Request  # what was rendered (checked: whole numbers as ints, the prompt stripped)
    psnr_db: float  # inf when the outputs are identical
    ssim: float
    notes: list[str]

    @property
    def max_abs_diff(self) -> float:
        """The largest |dense - sparse| over all pixels and channels, in [0, 1]."""
        return float(abs(self.dense - self.sparse).max())

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else math.nan


def _whole(name: str, value: Any) -> int:
    """An integer from a form value (sliders and number boxes may send 4.0 for 4)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise InputError(f"{name}: expected a whole number, got {value!r}")
    return int(value)


def _in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InputError(f"{name}: must be between {low} and {high}, got {value}")
    return value


@contextlib.contextmanager
def _warnings_logged() -> Iterator[list[str]]:
    """The distinct warnings that the pipelines (sparsediff's recipes) and diffusers log meanwhile: a
    prompt's unknown or truncated words, say, which a page user would otherwise never see. Not those of
    the "sparsediff" logger itself: its dense fallbacks have their own row, counted per render."""
    warned: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name != "sparsediff" and (message := record.getMessage()) not in warned:
                warned.append(message)

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("sparsediff", "diffusers")]
    for log in loggers:
        log.addHandler(handler)
    try:
        yield warned
    finally:
        for log in loggers:
            log.removeHandler(handler)


class DemoSession:
    """One loaded pipeline, rendered dense and then sparse per request."""

    def __init__(self, recipe: Recipe, pipe: DiffusionPipeline, device: torch.device,
                 profile: SparsityProfile | None = None, profile_label: str | None = None) -> None:
        """`profile` (already checked to fit `pipe`) is what PROFILE requests use without an upload."""
        self.recipe = recipe
        self.pipe = pipe
        self.device = device
        self.profile = profile
        self.profile_label = profile_label
        self.limits = Limits.of(recipe)
        # (height, width, frames, fp8) rendered before: a new one pays one-time warm-up (kernel
        # compilation, CUDA-graph capture, allocation) inside its timings, and the page says so.
        self._warmed: set[tuple[int, int, int, bool]] = set()
        # The last sparse render's handle and its (profile, fp8): a request with the same ones
        # reapplies it, so its CUDA graphs are not captured again inside the sparse timing.
        self._handle: SparseHandle | None = None
        self._handle_key: tuple[SparsityProfile, bool] | None = None
        # The page's queue runs one request at a time, but a cancelled one (an API client's cancel) frees
        # its slot while its render thread goes on: this lock keeps renders of one pipeline apart anyway.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ validation

    def _check(self, request: Request) -> Request:
        """The request with whole-number fields as ints; InputError naming the first bad field."""
        lim = self.limits
        if not request.prompt or not request.prompt.strip():
            raise InputError("Prompt: enter a prompt to render.")
        seed = _in_range("Seed", _whole("Seed", request.seed), 0, MAX_SEED)
        steps = _in_range("Steps", _whole("Steps", request.steps), 1, lim.max_steps)
        height = _in_range("Height", _whole("Height", request.height), 1, lim.max_height)
        width = _in_range("Width", _whole("Width", request.width), 1, lim.max_width)
        frames = _in_range("Frames", _whole("Frames", request.frames), 1, lim.max_frames)
        try:
            self.recipe.check_size(height, width, frames)
        except ValueError as e:
            raise InputError(str(e)[:1].upper() + str(e)[1:]) from None  # "height: ..." -> "Height: ..."
        if request.source not in (PROFILE, THRESHOLDS):
            raise InputError(f"Sparse settings: expected {PROFILE!r} or {THRESHOLDS!r}, got {request.source!r}")
        negative = request.negative_prompt.strip() if request.negative_prompt else None
        if not isinstance(request.fp8, bool):
            raise InputError(f"FP8: expected on or off, got {request.fp8!r}")
        if request.fp8:
            from sparsediff.kernels.block_sparse_attn import fp8_unsupported

            if reason := fp8_unsupported(self.device):
                raise InputError(f"FP8: {reason}")
        return Request(
            prompt=request.prompt.strip(), negative_prompt=negative or None, seed=seed, steps=steps,
            height=height, width=width, frames=frames, source=request.source, profile_file=request.profile_file,
            cdf_threshold=request.cdf_threshold, sim_threshold=request.sim_threshold,
            dense_steps=None if request.dense_steps is None else _whole("Dense steps", request.dense_steps),
            fp8=request.fp8,
        )

    def sparse_profile(self, request: Request) -> tuple[SparsityProfile, str]:
        """The profile the sparse render uses and a description of it; InputError when unusable."""
        from sparsediff.pipelines.render import _load_profile
        from sparsediff.profile import SparsityProfile

        if request.source == THRESHOLDS:
            given = {"cdf_threshold": request.cdf_threshold, "sim_threshold": request.sim_threshold,
                     "dense_steps": request.dense_steps}
            try:
                profile = SparsityProfile.uniform(self.pipe, model_id=self.recipe.name,
                                                  **{k: v for k, v in given.items() if v is not None})
            except ValueError as e:  # the profile's own range checks name the bad value
                raise InputError(f"Thresholds: {e}") from None
            layer = next(iter(profile.layers.values()))  # every layer and head holds the same values
            label = (f"uniform thresholds: cdf {layer.cdf_threshold[0]:g}, sim {layer.sim_threshold[0]:g}, "
                     f"{profile.dense_steps} dense step(s)")
        elif request.profile_file:
            path = Path(request.profile_file)
            try:
                profile = _load_profile(path, self.recipe, "Uploaded profile")
                profile.check_fits(self.pipe)
            except ValueError as e:
                raise InputError(str(e)) from None
            label = f"uploaded profile {path.name}"
        elif self.profile is not None:
            profile, label = self.profile, self.profile_label or "the default profile"
        else:
            raise InputError(f"Profile: no profile is known for {self.recipe.name}; upload one or choose "
                             f"'{THRESHOLDS}'.")
        if profile.dense_steps >= request.steps:
            raise InputError(f"Steps: the sparse settings run the first {profile.dense_steps} step(s) dense; "
                             f"render more than {profile.dense_steps} steps to see sparse attention at work.")
        return profile, label

    # ------------------------------------------------------------------ rendering

    def _render(self, request: Request, label: str, on_step: StepCallback) -> tuple[np.ndarray, float]:
        """(frames (F, H, W, 3) float in [0, 1], wall seconds) of one pipeline call."""
        from sparsediff.pipelines.render import generate

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(label, step + 1, request.steps)
            return tensors

        frames, wall, _ = generate(
            self.pipe, self.recipe, self.device, prompt=request.prompt, negative_prompt=request.negative_prompt,
            seed=request.seed, height=request.height, width=request.width, frames=request.frames,
            steps=request.steps, guidance_scale=self.recipe.guidance_scale, callback_on_step_end=step_end)
        return frames, wall

    def _notes(self, first_at_setting: bool, new_sparse_settings: bool) -> list[str]:
        """What a reader of the timings must know."""
        from sparsediff._runtime import kernels_available, triton_interpreting

        notes = []
        if not kernels_available(self.device):
            notes.append("No GPU and TRITON_INTERPRET unset: the sparse layers fall back to dense attention here "
                         "(start the demo with TRITON_INTERPRET=1 to run the sparse kernels in Triton's interpreter).")
        elif self.device.type == "cpu" and triton_interpreting():
            notes.append("The sparse kernels run in the Triton interpreter on this CPU: the sparse time shows "
                         "that they run, not how fast they are.")
        if first_at_setting:
            notes.append("First Generate at this size, frame count and FP8 setting since start: both times include "
                         "one-time warm-up (kernel compilation, memory allocation).")
        elif new_sparse_settings and self.device.type == "cuda":
            notes.append("New sparse settings: the sparse time includes capturing their CUDA graphs once.")
        return notes

    def compare(self, request: Request, on_step: StepCallback = lambda label, step, total: None) -> Comparison:
        """Render `request` dense, then sparse with the same seed; InputError before rendering if invalid."""
        import sparsediff
        from sparsediff.metrics import video_psnr, video_ssim

        request = self._check(request)
        profile, settings = self.sparse_profile(request)
        if request.fp8:
            settings += "; FP8 (e4m3) attention"
        with self._lock, _warnings_logged() as warned:
            setting = (request.height, request.width, request.frames, request.fp8)
            dense, dense_s = self._render(request, "dense", on_step)
            new_sparse_settings = self._handle is None or self._handle_key != (profile, request.fp8)
            if not new_sparse_settings:
                self._handle.reapply()
                self._handle.reset()
            else:
                self._handle = sparsediff.apply(self.pipe, profile, fp8=request.fp8)  # the old one's graphs go with it
                self._handle_key = (profile, request.fp8)
            handle = self._handle
            try:
                sparse, sparse_s = self._render(request, "sparse", on_step)
            finally:
                handle.remove()  # a failed sparse render must leave the pipeline dense for the next request
            notes = (self._notes(setting not in self._warmed, new_sparse_settings)
                     + _calibration_notes(profile, request, self.recipe.guidance_scale)
                     + [f"Logged: {w}" for w in warned])
            self._warmed.add(setting)
            stats = copy.deepcopy(handle.stats)  # before another request resets them
        return Comparison(
            dense=dense, sparse=sparse, dense_s=dense_s, sparse_s=sparse_s, stats=stats,
            settings=settings, request=request, psnr_db=video_psnr(sparse, dense), ssim=video_ssim(sparse, dense),
            notes=notes,
        )


def _calibration_notes(profile: SparsityProfile, request: Request, guidance_scale: float) -> list[str]:
    """A note when the profile was calibrated at another size, step count or guidance than this render's."""
    differences = profile.calibration_differences(
        height=[request.height], width=[request.width], frames=[request.frames], steps=[request.steps],
        guidance_scale=[guidance_scale])
    if not differences:
        return []
    return [f"The profile was calibrated at other settings: {'; '.join(differences)}. It holds each head within "
            "its error budget at the calibrated ones; here the sparse render may stray further from the dense one "
            "(PSNR and SSIM above say how far)."]


# --------------------------------------------------------------------------- presentation


def difference(a: np.ndarray, b: np.ndarray, gain: float = DIFF_GAIN) -> np.ndarray:
    """|a - b| * gain, clipped to [0, 1]: the difference view."""
    import numpy as np

    return np.clip(np.abs(a - b) * gain, 0.0, 1.0)


def _percent(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f} %"


def stats_markdown(c: Comparison) -> str:
    """The numbers of a comparison as a Markdown table (plus notes)."""
    stats = c.stats
    dense_steps = stats.dense_steps
    sparse_steps = [s for s in stats.steps if s >= dense_steps]
    where = (f"steps {sparse_steps[0] + 1}–{sparse_steps[-1] + 1}" if len(sparse_steps) > 1
             else f"step {sparse_steps[0] + 1}" if sparse_steps else "no sparse step")
    psnr = "∞ (identical)" if math.isinf(c.psnr_db) else f"{c.psnr_db:.2f} dB"
    r = c.request
    frames = f", {r.frames} frames" if r.frames > 1 else ""
    rows = [
        ("rendered", f"{_escaped(r.prompt)} — seed {r.seed}, {r.width}×{r.height}{frames}, {r.steps} steps"),
        ("wall time, dense", f"**{c.dense_s:.2f} s**"),
        ("wall time, sparse", f"**{c.sparse_s:.2f} s**"),
        ("speed-up (dense / sparse)", f"**{c.speedup:.2f}×**"),
        ("sparsity (attention blocks skipped)",
         f"**{_percent(stats.mean_sparsity(after_dense_steps=True))}** in the sparse {where}; "
         f"{_percent(stats.mean_sparsity(after_dense_steps=False))} over all steps"),
        ("PSNR, sparse vs dense", psnr),
        ("SSIM, sparse vs dense", f"{c.ssim:.4f}"),
        ("largest pixel difference", f"{255 * c.max_abs_diff:.1f} / 255"),
        ("sparse settings", c.settings),
    ]
    if fallbacks := stats.fallback_summary():  # why a sparsity is lower than the settings would give
        rows.append(("ran dense instead of sparse",
                     "; ".join(f"{f['calls']} call(s): {f['reason']}" for f in fallbacks)))
    table = "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    return table + "".join(f"\n\n*{note}*" for note in c.notes)


def _escaped(text: str) -> str:
    """`text` as literal Markdown table cell content (a prompt may hold |, *, _ or a newline)."""
    text = " ".join(text.split())
    return "".join(f"\\{ch}" if ch in "\\`*_[]<>|~" else ch for ch in text)


def _short(layer: str) -> str:
    """`transformer.blocks.3.attn1.processor` -> `blocks.3.attn1` (other components, e.g. Wan 2.2's
    `transformer_2`, keep their prefix)."""
    name = layer.removesuffix(".processor")
    return name.removeprefix("transformer.")


def _heatmap(values: np.ndarray, title: str, xlabel: str, xticklabels: list[str], layers: list[str],
             split: float | None = None) -> Figure:
    """A layers x columns sparsity heatmap on a fixed 0..1 colour scale (grey: no value)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure

    n_rows, n_cols = values.shape
    fig = Figure(figsize=(6.0, min(10.0, 1.6 + 0.28 * n_rows)), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of blocks skipped")
    row_every = max(1, math.ceil(n_rows / 24))
    col_every = max(1, math.ceil(n_cols / 24))
    ax.set_yticks(range(0, n_rows, row_every), [layers[i] for i in range(0, n_rows, row_every)], fontsize=7)
    ax.set_xticks(range(0, n_cols, col_every), [xticklabels[i] for i in range(0, n_cols, col_every)], fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    if n_rows * n_cols <= 64:  # few cells (tiny models): print the values
        for (i, j), v in np.ndenumerate(values):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
    if split is not None:
        ax.axvline(split, color="red", linestyle="--", linewidth=1.2)
    return fig


def heatmaps(stats: SparsityStats) -> tuple[Figure, Figure]:
    """Sparsity per layer x head (sparse steps) and per layer x step, as matplotlib figures."""
    layers = [_short(n) for n in stats.layer_names]
    per_head = stats.per_layer_head(after_dense_steps=True).numpy()
    heads = _heatmap(per_head, "sparsity per layer × head (sparse steps)", "head",
                     [str(h) for h in range(per_head.shape[1])], layers)
    steps = stats.steps
    dense = stats.dense_steps
    # The dashed line separates the leading dense steps from the sparse ones.
    split = next((j - 0.5 for j, s in enumerate(steps) if s >= dense), None) if 0 < dense else None
    per_step = _heatmap(stats.per_layer_step().numpy(), "sparsity per layer × step (red line: dense | sparse)", "step",
                        [str(s + 1) for s in steps], layers, split=split)
    return heads, per_step


# --------------------------------------------------------------------------- the page


def _theme() -> gr.themes.Base:
    import gradio as gr

    # System fonts: the default theme fetches web fonts, which an offline browser waits for in vain.
    return gr.themes.Soft(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_app(session: DemoSession, out_dir: Path) -> gr.Blocks:
    """The page around `session`; rendered videos are written to `out_dir` (overwritten per Generate)."""
    import gradio as gr

    from sparsediff.io import to_uint8, write_video_mp4
    from sparsediff.profile import DEFAULT_CDF_THRESHOLD, DEFAULT_DENSE_STEPS, DEFAULT_SIM_THRESHOLD

    recipe, lim = session.recipe, session.limits
    m = recipe.size_multiple

    def media(label: str, elem_id: str) -> gr.Video | gr.Image:
        if recipe.is_video:
            # No autoplay: the three would play out of step, and a side-by-side view must show the same frame.
            return gr.Video(label=label, elem_id=elem_id, interactive=False, loop=True)
        return gr.Image(label=label, elem_id=elem_id, interactive=False, format="png")

    def show(frames: np.ndarray, name: str) -> str | np.ndarray:
        """A video file in `out_dir` (gradio copies it into its cache) or an image array."""
        if not recipe.is_video:
            return to_uint8(frames[0])
        path = out_dir / f"{name}.mp4"
        write_video_mp4(path, frames, fps=recipe.fps)
        return str(path)

    def generate(prompt: str, negative: str, seed: float, steps: float, height: float, width: float,
                 frames: float, source: str, upload: str | None, cdf: float, sim: float, dense_steps: float,
                 fp8: bool, progress: gr.Progress = gr.Progress()) -> list[Any]:
        request = Request(prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, height=height,
                          width=width, frames=frames, source=source, profile_file=upload, cdf_threshold=cdf,
                          sim_threshold=sim, dense_steps=dense_steps, fp8=fp8)

        def on_step(label: str, step: int, total: int) -> None:
            done = step + (total if label == "sparse" else 0)
            desc = f"{label}: step {step}/{total}" + (" — decoding" if step == total else "")
            progress((done, 2 * total), desc=desc, unit="steps")

        def refused(title: str, message: str) -> list[Any]:
            """The message stays in the page where the numbers go, and the last render's outputs are
            cleared: they do not belong to the inputs now on the page."""
            gr.Warning(message, title=title)
            return [None, None, None, f"**{title}:** {_escaped(message)}", None, None]

        progress(0.0, desc="dense: encoding the prompt")
        try:
            c = session.compare(request, on_step)
        except InputError as e:
            return refused("Invalid input", str(e))
        except Exception as e:  # a failed render is reported in the page; the next request starts clean
            logger.exception("sparsediff demo: render failed")
            return refused("Render failed", f"{type(e).__name__}: {e}")
        by_head, by_step = heatmaps(c.stats)
        return [show(c.dense, "dense"), show(c.sparse, "sparse"), show(difference(c.dense, c.sparse), "difference"),
                stats_markdown(c), by_head, by_step]

    default_source = PROFILE if session.profile is not None else THRESHOLDS
    profile_text = (f"Default profile: **{session.profile_label}**. Upload a JSON profile to use another."
                    if session.profile is not None else
                    f"No profile is known for {recipe.name}: upload a JSON profile, or use thresholds.")
    with gr.Blocks(title="sparsediff demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## sparsediff: dense vs sparse attention\n**{recipe.name}** — {recipe.description}, "
                    f"on `{session.device}`. Generate renders the prompt with the stock attention, then with "
                    f"block-sparse attention, with the same seed.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt",
                                    placeholder="e.g. a red circle moves right on a black background")
                # FLUX's guidance is distilled: its pipeline reads a negative prompt only with true CFG, which
                # the recipes leave off.
                negative = gr.Textbox(label="Negative prompt", value=recipe.negative_prompt or "", lines=2,
                                      visible=recipe.family != "flux", elem_id="negative-prompt")
                with gr.Row():
                    # No precision or bounds here: gradio would round 1.5 to 2 without a word, and refuse
                    # -1 in a message that does not name the field. The session's checks say both.
                    seed = gr.Number(label="Seed", value=0, elem_id="seed")
                    steps = gr.Slider(1, lim.max_steps, value=recipe.steps, step=1, label="Steps", elem_id="steps")
                with gr.Row():
                    height = gr.Slider(m, lim.max_height, value=recipe.height, step=m, label="Height", elem_id="height")
                    width = gr.Slider(m, lim.max_width, value=recipe.width, step=m, label="Width", elem_id="width")
                if recipe.is_video:
                    frames = gr.Slider(1, lim.max_frames, value=recipe.frames, step=recipe.frame_step,
                                       label="Frames", elem_id="frames")
                else:
                    frames = gr.State(1)  # image models: one frame, nothing to choose
                source = gr.Radio([PROFILE, THRESHOLDS], value=default_source, label="Sparse attention from",
                                  elem_id="source")
                with gr.Group(visible=default_source == PROFILE) as profile_group:
                    gr.Markdown(profile_text)
                    upload = gr.File(label="Profile JSON", file_types=[".json"], type="filepath",
                                     elem_id="profile-upload")
                with gr.Group(visible=default_source == THRESHOLDS) as threshold_group:
                    cdf = gr.Slider(0.5, 1.0, value=DEFAULT_CDF_THRESHOLD, step=0.01, label="cdf threshold",
                                    elem_id="cdf-threshold", info="per query block, keep the key blocks holding "
                                                                  "this share of the predicted attention")
                    sim = gr.Slider(0.0, 1.0, value=DEFAULT_SIM_THRESHOLD, step=0.05, label="sim threshold",
                                    elem_id="sim-threshold", info="blocks less self-similar than this are always kept")
                    dense_steps = gr.Slider(0, lim.max_steps - 1, value=min(DEFAULT_DENSE_STEPS, recipe.steps - 1),
                                            step=1, label="Dense steps", elem_id="dense-steps",
                                            info="leading steps run dense")
                fp8 = gr.Checkbox(value=False, label="FP8 attention", elem_id="fp8",
                                  info="Q·K and P·V in e4m3: faster on long sequences, a little less exact")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                with gr.Row():
                    out_dense = media("dense", "dense-output")
                    out_sparse = media("sparse", "sparse-output")
                    out_diff = media(f"|dense − sparse| × {DIFF_GAIN:g}", "difference-output")
                stats = gr.Markdown("Enter a prompt and press **Generate**.", elem_id="stats")
                with gr.Row():
                    # The figures carry their titles; a component label would be drawn over them.
                    plot_heads = gr.Plot(label="sparsity per layer × head", show_label=False, format="png",
                                         elem_id="heads-plot")
                    plot_steps = gr.Plot(label="sparsity per layer × step", show_label=False, format="png",
                                         elem_id="steps-plot")

        source.change(lambda s: (gr.Group(visible=s == PROFILE), gr.Group(visible=s == THRESHOLDS)),
                      inputs=source, outputs=[profile_group, threshold_group], queue=False)
        # The button is off while a render runs: a click then would otherwise be dropped without a word,
        # leaving that click's inputs on the page beside the earlier inputs' outputs.
        button.click(lambda: gr.Button(interactive=False), outputs=button, queue=False).then(
            generate,
            inputs=[prompt, negative, seed, steps, height, width, frames, source, upload, cdf, sim, dense_steps, fp8],
            outputs=[out_dense, out_sparse, out_diff, stats, plot_heads, plot_steps],
        ).then(lambda: gr.Button(interactive=True), outputs=button, queue=False)
    # One model instance: renders must not interleave (and timings must not share the device).
    app.queue(default_concurrency_limit=1)
    return app


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="recipe name (see `sparsediff models`) or a local diffusers pipeline folder "
                             "(default: toy-shapes where installed, else tiny-wan)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="sparsity profile JSON offered by default (default: the one shipped for the recipe)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also make a public gradio.live link (traffic goes through Gradio's share servers)")


def _serve_problem(host: str, port: int) -> str | None:
    """Why `host:port` cannot be served on, or None (gradio reports any failure as "Cannot find empty port")."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
            s.bind(address)
    except OSError as e:
        return f"cannot serve on {host}:{port}: {e.strerror or e}"
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from sparsediff.io import mp4_writer_problem
    from sparsediff.pipelines.recipes import default_recipe_name, get_recipe
    from sparsediff.pipelines.render import _load_profile

    def fail(message: str) -> int:
        print(f"sparsediff demo: error: {message}", file=sys.stderr)
        return 2

    if not 1 <= args.port <= 65535:
        return fail(f"--port: must be between 1 and 65535, got {args.port}")
    if problem := _serve_problem(args.host, args.port):  # now, not after a model load of minutes
        return fail(f"--host/--port: {problem}")
    try:
        recipe = get_recipe(args.model or default_recipe_name())
    except ValueError as e:
        return fail(str(e).replace("model:", "--model:", 1))
    if recipe.is_video and (problem := mp4_writer_problem()) is not None:  # each Generate would fail at its end
        return fail(problem)
    path = args.profile or recipe.shipped_profile()
    profile, label = None, None
    if path is not None:
        origin = "--profile" if args.profile else "shipped profile"
        try:
            profile = _load_profile(path, recipe, origin)
        except ValueError as e:
            return fail(str(e))
        label = f"{origin} {path.name}"

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"sparsediff demo: loading {recipe.name} on {device} ...", file=sys.stderr)
    try:
        pipe = recipe.load(device)
    except (OSError, ValueError) as e:  # missing weights, no network, a gated repo
        return fail(f"loading {recipe.name} failed: {type(e).__name__}: {e}")
    if profile is not None:
        try:
            profile.check_fits(pipe)
        except ValueError as e:
            return fail(f"{label}: {e}")
    pipe.set_progress_bar_config(disable=True)  # the page shows progress; keep the console quiet
    session = DemoSession(recipe, pipe, device, profile, label)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"sparsediff demo: serving on {args.host}: anyone who can reach this machine can use the GPU",
              file=sys.stderr)
    # SIGTERM (kill, a service manager) ends the server as Ctrl+C does, so the folder below is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="sparsediff-demo-") as out_dir:
        app = build_app(session, Path(out_dir))
        try:
            # ssr_mode off: server-side rendering would start a Node server beside this one.
            app.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                       theme=_theme())
        except KeyboardInterrupt:  # Ctrl+C or SIGTERM while Gradio starts, before its own wait catches them
            app.close()
    return 0
