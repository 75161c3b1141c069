"""The calibration run: plan (validated before any model loads), dense generations with the
calibration controller, resumable statistics, selection, profile + report, optional validation.

Files next to `--out PROFILE.json`:
- PROFILE.json: the SparsityProfile (atomic write);
- PROFILE.report.json: per-layer/head thresholds, errors and sparsity, per-step sensitivity,
  prompts, seeds, wall times, versions, validation;
- PROFILE.calib-state.json: the statistics after each finished prompt (atomic). A rerun with the
  same measurement settings continues after the last finished prompt; adding prompts to the end of
  the prompt file (or raising --max-prompts) extends it. The statistics do not depend on --budget,
  --dense-steps or --min-layer-sparsity: a rerun that changes only those re-selects without
  loading the model. Other settings changed: an error, unless --fresh discards the old statistics.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparsediff.calibration.measure import Candidate, default_lead_steps, measured_steps, step_weights
from sparsediff.io import writable_dir
from sparsediff.pipelines.prompts import MAX_SEED, PromptSpec, load_prompts, slugify
from sparsediff.pipelines.recipes import PROFILE_FAMILY, Recipe, get_recipe

if TYPE_CHECKING:
    from sparsediff.calibration.select import CalibrationStats, Selection
    from sparsediff.pipelines.render import Item, Renderer
    from sparsediff.profile import SparsityProfile

STATE_VERSION = 1
REPORT_VERSION = 1
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
# Validation times each dense and sparse render on a GPU again while its renders add up to less than
# this many seconds (at most VALIDATE_MAX_RENDERS renders) and takes the median: a single timing of a
# render of a fraction of a second (the toy model: 0.2 s) varied 0.57-1.25x between prompts of one
# profile (H200, 2026-12-02).
VALIDATE_MIN_TIMED_SECONDS = 1.0
VALIDATE_MAX_RENDERS = 5


class CalibrationError(ValueError):
    """Bad input to `calibrate`, found before any model is loaded."""


def bundled_prompts(recipe: Recipe, held_out: bool = False) -> Path:
    """The bundled prompt set for the recipe's kind: toy-shapes captions, video or image prompts."""
    kind = "toy-shapes" if recipe.name == "toy-shapes" else "video" if recipe.is_video else "image"
    return PROMPTS_DIR / f"{kind}{'.holdout' if held_out else ''}.txt"


def sidecar_paths(out: Path) -> tuple[Path, Path]:
    """(report, resume state) paths beside the profile `out`."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(f"{stem}.report.json"), out.with_name(f"{stem}.calib-state.json")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the calibration or validation set, with its seed."""

    text: str
    negative: str | None
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.text, "negative_prompt": self.negative, "seed": self.seed}


@dataclass
class CalibrationPlan:
    """Everything a calibration run does, validated before loading a model."""

    recipe: Recipe
    out: Path
    prompts_file: Path
    prompts: list[Prompt]
    validate_prompts: list[Prompt] | None
    steps: int
    height: int
    width: int
    frames: int
    guidance_scale: float
    budget: float
    dense_steps: int | None
    min_layer_sparsity: float
    candidates: list[Candidate]
    lead_steps: int
    step_stride: int
    row_fraction: float
    token_order: str
    method: str
    device: str
    fresh: bool = False
    state: dict[str, Any] | None = field(default=None, repr=False)  # a resumable earlier run's state

    @property
    def report_path(self) -> Path:
        return sidecar_paths(self.out)[0]

    @property
    def state_path(self) -> Path:
        return sidecar_paths(self.out)[1]

    @property
    def measured_steps(self) -> list[int]:
        return measured_steps(self.steps, self.lead_steps, self.step_stride)

    def fingerprint(self) -> dict[str, Any]:
        """The settings the statistics depend on (budget and selection options excluded)."""
        return {
            "model": self.recipe.name, "dtype": self.recipe.dtype, "steps": self.steps, "height": self.height,
            "width": self.width, "frames": self.frames, "guidance_scale": self.guidance_scale,
            "candidates": [c.as_dict() for c in self.candidates], "measured_steps": self.measured_steps,
            "row_fraction": self.row_fraction, "token_order": self.token_order, "method": self.method,
        }


# --------------------------------------------------------------------------- planning (no model loaded)


def _read_prompts(path: Path, seed: int, recipe: Recipe, what: str) -> list[Prompt]:
    specs: list[PromptSpec] = load_prompts(path)  # PromptFileError (a ValueError) names the file
    out = []
    for i, spec in enumerate(specs):
        fixed = [name for name in ("height", "width", "frames", "steps") if getattr(spec, name) is not None]
        if fixed:
            raise CalibrationError(f"{what}: {path}:{spec.line} sets {', '.join(fixed)}; calibration runs every "
                                   "prompt at one size and step count (use --height/--width/--frames/--steps)")
        negative = spec.negative_prompt if spec.negative_prompt is not None else recipe.negative_prompt
        if spec.seed is None and seed + i > MAX_SEED:  # manual_seed said only "Overflow when unpacking long long"
            raise CalibrationError(f"--seed: {what} {path}:{spec.line} would get seed {seed} + {i}, above {MAX_SEED} "
                                   "(64 bits)")
        out.append(Prompt(spec.prompt, negative, spec.seed if spec.seed is not None else seed + i))
    return out


def _check_writable(out: Path) -> None:
    if out.is_dir():
        raise CalibrationError(f"--out: {out} is a directory; give the profile's file name (e.g. {out / 'profile.json'})")
    if out.suffix != ".json":
        raise CalibrationError(f"--out: a profile is JSON; the name must end in .json, got {out.name!r}")
    try:
        writable_dir(out.parent)
    except ValueError as e:
        raise CalibrationError(str(e)) from None


def _parse_grid(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CalibrationError(f"{name}: expected a comma list of numbers, got {text!r}") from None


def make_plan(args: Any) -> CalibrationPlan:
    """Validate the command line (an argparse Namespace, see cli.py) into a plan; CalibrationError if wrong."""
    from sparsediff.calibration.measure import candidate_grid
    from sparsediff.pipelines.recipes import default_recipe_name

    try:
        recipe = get_recipe(args.model or default_recipe_name())
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    if not 0.0 < args.budget < 1.0:
        raise CalibrationError(f"--budget: the per-head relative L1 error budget must be in (0, 1), got {args.budget}")
    steps = recipe.steps if args.steps is None else args.steps
    if steps < 1:
        raise CalibrationError(f"--steps must be >= 1, got {steps}")
    if args.dense_steps is not None and not 0 <= args.dense_steps < steps:
        raise CalibrationError(f"--dense-steps must be in [0, {steps - 1}] (fewer than --steps {steps}), got {args.dense_steps}")
    if args.seed < 0:
        raise CalibrationError(f"--seed must be >= 0, got {args.seed}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise CalibrationError(f"--max-prompts must be >= 1, got {args.max_prompts}")
    if not 0.0 < args.row_fraction <= 1.0:
        raise CalibrationError(f"--row-fraction must be in (0, 1], got {args.row_fraction}")
    if args.step_stride < 1:
        raise CalibrationError(f"--step-stride must be >= 1, got {args.step_stride}")
    lead = default_lead_steps(steps) if args.lead_steps is None else args.lead_steps
    if not 0 <= lead <= steps:
        raise CalibrationError(f"--lead-steps must be in [0, {steps}], got {lead}")
    if not 0.0 <= args.min_layer_sparsity < 1.0:
        raise CalibrationError(f"--min-layer-sparsity must be in [0, 1), got {args.min_layer_sparsity}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise CalibrationError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    device = args.device or _default_device()
    _check_device(device)
    height = recipe.height if args.height is None else args.height
    width = recipe.width if args.width is None else args.width
    frames = recipe.frames if args.frames is None else args.frames
    try:
        recipe.check_size(height, width, frames)
        candidates = candidate_grid(_parse_grid(args.cdf_grid, "--cdf-grid"), _parse_grid(args.sim_grid, "--sim-grid"),
                                    _parse_grid(args.pv_grid, "--pv-grid"))
    except CalibrationError:
        raise
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    prompts_file = Path(args.prompts) if args.prompts is not None else bundled_prompts(recipe)
    prompts = _read_prompts(prompts_file, args.seed, recipe, "--prompts")
    if args.max_prompts is not None:
        prompts = prompts[: args.max_prompts]
    validate = None
    if args.validate:
        vfile = Path(args.validate_prompts) if args.validate_prompts is not None else bundled_prompts(recipe, True)
        validate = _read_prompts(vfile, args.seed, recipe, "--validate-prompts")
    elif args.validate_prompts is not None:
        raise CalibrationError("--validate-prompts needs --validate")
    out = Path(args.out)
    _check_writable(out)
    plan = CalibrationPlan(
        recipe=recipe, out=out, prompts_file=prompts_file, prompts=prompts, validate_prompts=validate, steps=steps,
        height=height, width=width, frames=frames,
        guidance_scale=recipe.guidance_scale if args.guidance_scale is None else args.guidance_scale,
        budget=args.budget, dense_steps=args.dense_steps, min_layer_sparsity=args.min_layer_sparsity,
        candidates=candidates, lead_steps=lead, step_stride=args.step_stride, row_fraction=args.row_fraction,
        token_order=args.token_order, method=args.method, device=device, fresh=args.fresh,
    )
    plan.state = _resumable_state(plan)
    return plan


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(name: str) -> None:
    """CalibrationError unless `name` is a torch device this machine has."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CalibrationError(f"--device: {e}") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise CalibrationError(f"--device {name}: no such CUDA device here ({torch.cuda.device_count()} found)")
    if device.type not in ("cpu", "cuda"):
        raise CalibrationError(f"--device {name}: sparsediff calibrates on cpu or cuda")


def _resumable_state(plan: CalibrationPlan) -> dict[str, Any] | None:
    """The earlier run's state if it can be continued; None for a fresh start; CalibrationError if it conflicts."""
    path = plan.state_path
    if plan.fresh or not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        version, fingerprint, done = state["state_version"], state["fingerprint"], state["prompts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibrationError(f"{path}: unreadable calibration state ({e}); pass --fresh to start over") from None
    if version != STATE_VERSION:
        raise CalibrationError(f"{path}: state version {version!r}, this sparsediff writes {STATE_VERSION}; "
                               "pass --fresh to start over")
    current = plan.fingerprint()
    if fingerprint != current:
        diff = ", ".join(f"{k}: {fingerprint.get(k)!r} then, {current[k]!r} now"
                         for k in current if fingerprint.get(k) != current[k])
        raise CalibrationError(f"{path} holds statistics measured with other settings ({diff}); pass --fresh to "
                               "discard them, or choose another --out")
    from sparsediff.calibration.select import CalibrationStats

    try:  # checked here, before a model loads: a hand-edited or damaged state fails now, by name
        CalibrationStats.from_dict(state["stats"])
        finished = [{k: p[k] for k in ("prompt", "negative_prompt", "seed")} for p in done]
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CalibrationError(f"{path}: unreadable calibration state ({type(e).__name__}: {e}); pass --fresh to "
                               "start over") from None
    wanted = [p.as_dict() for p in plan.prompts]
    if finished != wanted[: len(finished)]:
        if len(finished) > len(wanted):
            what = f"more than this run's {len(wanted)} (--prompts or --max-prompts)"
        else:
            i = next(i for i, (then, now) in enumerate(zip(finished, wanted)) if then != now)
            what = f"prompt {i + 1} differs: " + ", ".join(
                f"{k} {finished[i][k]!r} then, {wanted[i][k]!r} now" for k in wanted[i] if finished[i][k] != wanted[i][k])
        raise CalibrationError(f"{path} holds statistics of {len(finished)} prompt(s), {what}; pass --fresh to "
                               "discard them, or choose another --out")
    return state


# --------------------------------------------------------------------------- running


def _item(plan: CalibrationPlan, index: int, prompt: Prompt, steps: int | None = None) -> Item:
    from sparsediff.pipelines.render import Item

    return Item(index=index, prompt=prompt.text, negative_prompt=prompt.negative, seed=prompt.seed,
                height=plan.height, width=plan.width, frames=plan.frames, steps=steps or plan.steps,
                stem=f"{index:04d}-{slugify(prompt.text)}-s{prompt.seed}", source_line=0)


def _renderer(plan: CalibrationPlan) -> Renderer:
    """Load the pipeline through the render module's Renderer (same pipeline call as `sparsediff render`)."""
    import torch

    from sparsediff.pipelines.render import Plan, Renderer

    render_plan = Plan(recipe=plan.recipe, out_dir=plan.out.parent, items=[], mode="dense", profile_path=None,
                       profile_source=None, profile_sha256=None, cdf_threshold=None, sim_threshold=None,
                       dense_steps=None, guidance_scale=plan.guidance_scale, compare_dense=False)
    renderer = Renderer(render_plan, torch.device(plan.device))
    renderer.pipe.set_progress_bar_config(desc="steps", leave=False)
    return renderer


def _save_state(plan: CalibrationPlan, stats: CalibrationStats, prompts: list[dict[str, Any]],
                versions: dict[str, Any]) -> None:
    from sparsediff.io import atomic_write_json

    atomic_write_json(plan.state_path, {
        "state_version": STATE_VERSION, "fingerprint": plan.fingerprint(), "prompts": prompts,
        "versions": versions, "stats": stats.to_dict(),
    }, indent=0)


def measure(plan: CalibrationPlan, renderer: Renderer | None) -> tuple[CalibrationStats, list[dict[str, Any]], dict]:
    """Run the prompts not yet in the state; return (stats, per-prompt records, versions)."""
    from tqdm.auto import tqdm

    import sparsediff
    from sparsediff.calibration.measure import CalibrationController
    from sparsediff.calibration.select import CalibrationStats
    from sparsediff.io import remove_stale_temps
    from sparsediff.profile import SparsityProfile

    state = plan.state
    stats = CalibrationStats.from_dict(state["stats"]) if state else None
    done: list[dict[str, Any]] = [dict(p, resumed=True) for p in state["prompts"]] if state else []
    versions = state["versions"] if state else {}
    todo = list(enumerate(plan.prompts))[len(done):]
    if done:
        tqdm.write(f"calibrate: resuming after {len(done)} finished prompt(s) ({plan.state_path})")
    if not todo:
        return stats, done, versions
    assert renderer is not None
    remove_stale_temps(plan.state_path)
    base = SparsityProfile.uniform(renderer.pipe, model_id=plan.recipe.name, dense_steps=0,
                                   token_order=plan.token_order, method=plan.method)
    handle = sparsediff.apply(renderer.pipe, base, dense_steps=0, controller_cls=CalibrationController)
    try:
        controller: CalibrationController = handle.controller
        controller.configure(plan.candidates, plan.measured_steps, plan.row_fraction)
        if stats is None:
            names = list(base.layers)
            stats = CalibrationStats(names, [base.layers[n].heads for n in names], plan.candidates, plan.measured_steps)
        versions = renderer.versions
        for index, prompt in tqdm(todo, desc="calibrate", unit="prompt", initial=len(done), total=len(plan.prompts)):
            handle.reset()
            _, wall, peak = renderer._generate(_item(plan, index, prompt))
            stats.add(controller.drain())
            if not bool(stats.calls.any()):  # every call ran dense: there is nothing to select from
                causes = "; ".join(f["reason"] for f in handle.stats.fallback_summary()) or "dense steps only"
                r = plan.recipe

                def size(height: int, width: int, frames: int) -> str:
                    return f"{height}x{width}" + (f", {frames} frames" if r.is_video else "")

                raise CalibrationError(
                    f"no attention call could be measured at {size(plan.height, plan.width, plan.frames)}: every "
                    f"call ran dense ({causes}). Calibrate at the size the profile is for (the recipe's default: "
                    f"{size(r.height, r.width, r.frames)}).")
            done.append(dict(prompt.as_dict(), wall_time_s=wall, peak_gpu_memory_bytes=peak, resumed=False))
            _save_state(plan, stats, [{k: v for k, v in p.items() if k != "resumed"} for p in done], versions)
    finally:
        handle.remove()
    return stats, done, versions


def build_profile(plan: CalibrationPlan, stats: CalibrationStats, sel: Selection) -> SparsityProfile:
    from sparsediff.profile import CALIBRATED_SETTINGS, CalibrationInfo, LayerProfile, SparsityProfile

    layers = {}
    for i, name in enumerate(stats.layers):
        choice = sel.choice[i]
        pv = None if not any(c.pv for c in choice) else [c.pv or 0.0 for c in choice]
        layers[name] = LayerProfile(heads=stats.heads[i], cdf_threshold=[c.cdf for c in choice],
                                    sim_threshold=[c.sim for c in choice], pv_threshold=pv, dense=sel.dense_layers[i])
    def reached(i: int, values: list[float]) -> list[float]:  # a dense layer has no error and skips nothing
        return [0.0] * len(values) if sel.dense_layers[i] else values

    info = CalibrationInfo(
        budget=plan.budget,
        errors={name: reached(i, sel.head_error[i]) for i, name in enumerate(stats.layers)},
        sparsity={name: reached(i, sel.head_sparsity[i]) for i, name in enumerate(stats.layers)},
        # The render settings that SparsityProfile.calibration_differences compares, under their plan names.
        extra={"report": plan.report_path.name, "prompts": len(plan.prompts), "measured_steps": plan.measured_steps,
               **{key: getattr(plan, key) for key in CALIBRATED_SETTINGS},
               "error": "worst per-head relative L1 over the measured calls standing for steps >= dense_steps",
               "dense_steps_source": sel.dense_steps_source},
    )
    return SparsityProfile(model_id=plan.recipe.name, family=PROFILE_FAMILY[plan.recipe.family], layers=layers,
                           dense_steps=sel.dense_steps, token_order=plan.token_order, method=plan.method,
                           calibration=info)


def expected_sparsity(plan: CalibrationPlan, sel: Selection) -> float:
    """Share of all block pairs of a generation skipped: dense steps and dense layers skip nothing."""
    n = len(sel.dense_layers)
    return sum(sel.layer_sparsity(i) for i in range(n)) / n * (plan.steps - sel.dense_steps) / plan.steps


def build_report(plan: CalibrationPlan, stats: CalibrationStats, sel: Selection, prompts: list[dict[str, Any]],
                 versions: dict[str, Any]) -> dict[str, Any]:
    def finite(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else x

    layers = []
    for i, name in enumerate(stats.layers):
        # Dense layers too list what their chosen thresholds would give if they ran sparse.
        heads = [dict(c.as_dict(), error=sel.head_error[i][h], sparsity=sel.head_sparsity[i][h])
                 for h, c in enumerate(sel.choice[i])]
        layers.append({"name": name, "dense": sel.dense_layers[i], "measured": sel.measured[i],
                       "mean_sparsity": sel.layer_sparsity(i), "worst_error": max(sel.head_error[i]), "heads": heads})
    return {
        "report_version": REPORT_VERSION,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": plan.recipe.name, "family": plan.recipe.family, "hub_id": plan.recipe.hub_id},
        "profile": plan.out.name,
        "budget": plan.budget,
        "error_measure": "per-head relative L1 of the attention output vs dense SDPA, worst over measured calls",
        "settings": dict(plan.fingerprint(), device=plan.device, lead_steps=plan.lead_steps,
                         step_stride=plan.step_stride, min_layer_sparsity=plan.min_layer_sparsity,
                         prompts_file=str(plan.prompts_file)),
        "prompts": prompts,
        "wall_time_s": sum(p["wall_time_s"] for p in prompts),
        "dense_steps": {"value": sel.dense_steps, "source": sel.dense_steps_source,
                        "estimated_attention_cost": {str(d): c for d, c in sel.cost_by_dense_steps.items()}},
        "steps": [{"step": s, "weight": w, "dense": s + w <= sel.dense_steps, "worst_error": finite(e),
                   "mean_sparsity": finite(sp)}
                  for s, w, e, sp in zip(stats.steps, step_weights(stats.steps, plan.steps), sel.step_error,
                                         sel.step_sparsity)],
        "expected_mean_sparsity": expected_sparsity(plan, sel),
        "layers": layers,
        "versions": versions,
        "validation": None,
    }


def summary_table(report: dict[str, Any]) -> str:
    """A readable summary of the report: one row per layer, then the per-step sensitivity."""
    lines = [f"budget {report['budget']:g} (per-head relative L1)   dense steps {report['dense_steps']['value']} "
             f"({report['dense_steps']['source']})   expected sparsity {report['expected_mean_sparsity']:.3f}"]
    width = max(len(layer["name"]) for layer in report["layers"])
    lines.append(f"{'layer':<{width}}  {'run':<6} {'sparsity':>8} {'worst err':>9}  sparse heads  cdf per head")
    for layer in report["layers"]:
        cdfs = " ".join(f"{h['cdf']:g}" for h in layer["heads"][:12]) + (" ..." if len(layer["heads"]) > 12 else "")
        sparse_heads = 0 if layer["dense"] else sum(h["cdf"] < 1.0 for h in layer["heads"])
        run = "dense" if layer["dense"] else "sparse"
        lines.append(f"{layer['name']:<{width}}  {run:<6} {layer['mean_sparsity']:>8.3f} {layer['worst_error']:>9.4f}  "
                     f"{sparse_heads:>5}/{len(layer['heads']):<6}  {cdfs}")
    lines.append(f"{'step':>5} {'weight':>6}  {'worst err at choice':>19} {'sparsity':>8}")
    for s in report["steps"]:
        err = "-" if s["worst_error"] is None else f"{s['worst_error']:.4f}"
        sp = "-" if s["mean_sparsity"] is None else f"{s['mean_sparsity']:.3f}"
        lines.append(f"{s['step']:>5} {s['weight']:>6}  {err:>19} {sp:>8}" + ("  dense" if s["dense"] else ""))
    return "\n".join(lines)


def validate(plan: CalibrationPlan, renderer: Renderer, profile: SparsityProfile) -> dict[str, Any]:
    """Render the held-out prompts dense and with `profile` (same seeds): PSNR, SSIM, speed-up per video;
    then once more with the profile, measuring every sparse head's attention error against dense
    (worst over calls and prompts), to check the calibration budget on prompts it never saw."""
    import torch
    from tqdm.auto import tqdm

    import sparsediff
    from sparsediff._runtime import kernels_available, triton_interpreting
    from sparsediff.calibration.measure import HeadErrorController
    from sparsediff.metrics import video_psnr, video_ssim

    device = torch.device(plan.device)
    note = None
    if not kernels_available(device):
        note = ("CPU without TRITON_INTERPRET=1: the sparse render fell back to dense attention, so PSNR, SSIM and "
                "speed-up say nothing about the profile (the per-head errors are measured all the same, through the "
                "torch references); validate on a GPU")
    elif device.type == "cpu" and triton_interpreting():
        note = "CPU under the Triton interpreter: PSNR/SSIM are meaningful, the speed-up is not"
    if note:
        tqdm.write(f"calibrate: validation: {note}")
    if device.type == "cuda":  # compile the kernels before timing: one sparse step of the first prompt
        handle = sparsediff.apply(renderer.pipe, profile, dense_steps=0)
        renderer._generate(_item(plan, 0, plan.validate_prompts[0], steps=1))
        handle.remove()
    videos = []
    handle = None  # one handle for every prompt: its CUDA graphs are captured once, not per prompt
    for index, prompt in enumerate(tqdm(plan.validate_prompts, desc="validate", unit="prompt")):
        item = _item(plan, index, prompt)
        dense, dense_s, dense_renders = _timed_render(renderer, item)
        if handle is None:
            handle = sparsediff.apply(renderer.pipe, profile)
        else:
            handle.reapply()
            handle.reset()
        try:
            # Repeated renders of one item add the same counts to the stats: their ratios are one render's.
            sparse, sparse_s, sparse_renders = _timed_render(renderer, item)
            sparsity = handle.stats.mean_sparsity(after_dense_steps=False)
            after_dense = handle.stats.mean_sparsity()
        finally:
            handle.remove()
        psnr = video_psnr(sparse, dense)
        videos.append(dict(prompt.as_dict(), psnr_db=None if math.isinf(psnr) else psnr, identical=math.isinf(psnr),
                           ssim=video_ssim(sparse, dense), dense_s=dense_s, sparse_s=sparse_s,
                           timed_renders=[dense_renders, sparse_renders], speedup=dense_s / sparse_s,
                           sparsity=None if math.isnan(sparsity) else sparsity,
                           sparsity_after_dense_steps=None if math.isnan(after_dense) else after_dense))
    handle = sparsediff.apply(renderer.pipe, profile, controller_cls=HeadErrorController)
    try:
        for index, prompt in enumerate(tqdm(plan.validate_prompts, desc="validate errors", unit="prompt")):
            renderer._generate(_item(plan, index, prompt))
    finally:
        handle.remove()
    head_errors = {name: [float(x) for x in err.cpu()] for name, err in handle.controller.worst.items()}
    worst = max((x for errs in head_errors.values() for x in errs), default=0.0)
    finite_psnr = [v["psnr_db"] for v in videos if v["psnr_db"] is not None]
    return {
        "head_errors": head_errors,  # sparse layers (after the dense steps) -> worst error per head
        "max_head_error": worst,
        "heads_over_budget": sum(x > plan.budget for errs in head_errors.values() for x in errs),
        "budget": plan.budget,
        "videos": videos,
        "mean_psnr_db": sum(finite_psnr) / len(finite_psnr) if finite_psnr else None,
        "mean_ssim": sum(v["ssim"] for v in videos) / len(videos),
        "speedup": sum(v["dense_s"] for v in videos) / sum(v["sparse_s"] for v in videos),
        "meaningful": note is None,
        "note": note,
    }


def _timed_render(renderer: Renderer, item: Item) -> tuple[Any, float, int]:
    """(frames, median wall seconds, renders timed): one render, then on a GPU more of the same item
    while they add up to less than VALIDATE_MIN_TIMED_SECONDS (VALIDATE_MAX_RENDERS at most)."""
    frames, wall, _ = renderer._generate(item)
    walls = [wall]
    while (renderer.device.type == "cuda" and sum(walls) < VALIDATE_MIN_TIMED_SECONDS
           and len(walls) < VALIDATE_MAX_RENDERS):
        walls.append(renderer._generate(item)[1])
    return frames, statistics.median(walls), len(walls)


def select_for(plan: CalibrationPlan, stats: CalibrationStats) -> Selection:
    """The thresholds `plan`'s budget and options select from `stats`."""
    from sparsediff.calibration.select import select

    return select(stats, plan.budget, total_steps=plan.steps, lead_steps=plan.lead_steps,
                  dense_steps=plan.dense_steps, min_layer_sparsity=plan.min_layer_sparsity)


def calibrate(plan: CalibrationPlan) -> dict[str, Any]:
    """Run the plan: measure (resuming), select, write profile and report, validate; return the report."""
    from sparsediff.io import atomic_write_json

    needs_model = plan.validate_prompts is not None or plan.state is None or len(plan.state["prompts"]) < len(plan.prompts)
    renderer = _renderer(plan) if needs_model else None
    stats, prompts, versions = measure(plan, renderer)
    sel = select_for(plan, stats)
    profile = build_profile(plan, stats, sel)
    report = build_report(plan, stats, sel, prompts, versions)
    profile.save(plan.out)
    atomic_write_json(plan.report_path, report)
    print(summary_table(report))
    if plan.validate_prompts is not None:
        started = time.perf_counter()
        report["validation"] = dict(validate(plan, renderer, profile), wall_time_s=time.perf_counter() - started)
        atomic_write_json(plan.report_path, report)
        print(validation_table(report["validation"]))
    print(f"wrote {plan.out} and {plan.report_path}")
    return report


def validation_table(validation: dict[str, Any]) -> str:
    lines = [f"{'validation prompt':<40} {'PSNR dB':>8} {'SSIM':>6} {'speed-up':>8} {'sparsity':>8}"]
    for v in validation["videos"]:
        psnr = "inf" if v["identical"] else f"{v['psnr_db']:.2f}"
        sp = "-" if v["sparsity"] is None else f"{v['sparsity']:.3f}"
        lines.append(f"{v['prompt'][:40]:<40} {psnr:>8} {v['ssim']:>6.4f} {v['speedup']:>7.2f}x {sp:>8}")
    n_heads = sum(len(errs) for errs in validation["head_errors"].values())
    lines.append(f"held-out per-head attention error: worst {validation['max_head_error']:.4f} over {n_heads} sparse "
                 f"heads; {validation['heads_over_budget']} over the budget {validation['budget']:g}")
    if validation["note"]:
        lines.append(f"note: {validation['note']}")
    return "\n".join(lines)
