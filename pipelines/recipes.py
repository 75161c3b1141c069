"""Model recipes: what `--model` names — hub id, family, pipeline class, defaults, memory options.

Three kinds of recipe:
- hub models by short name (`wan2.1-t2v-1.3b`, ..., `flux.1-schnell`), loaded with the
  pipeline class's `from_pretrained` (downloads on first use; never called in tests);
- offline tiny random pipelines `tiny-wan`, `tiny-hunyuanvideo`, `tiny-cogvideox`, `tiny-flux`
  (`pipelines/tiny.py`), built from configs;
- `toy-shapes`, the project's own trained model (`pipelines/toy_shapes/`), once that is installed.

A local folder holding a diffusers pipeline (`model_index.json`) is accepted wherever a recipe
name is: its family comes from `_class_name` in `model_index.json` (WanPipeline, HunyuanVideoPipeline,
CogVideoXPipeline, FluxPipeline) and its defaults from that family's reference hub recipe (Wan: a
folder with `transformer_2` takes Wan2.2-T2V-A14B's, one with `expand_timesteps` Wan2.2-TI2V-5B's,
else Wan2.1-T2V-1.3B's; HunyuanVideo; CogVideoX-5B; FLUX.1-dev).

`sparsediff models` prints the table of recipes.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

FAMILIES = ("wan", "hunyuanvideo", "cogvideox", "flux")
# The family names sparsediff.profile uses for the same families.
PROFILE_FAMILY = {"wan": "wan", "hunyuanvideo": "hunyuan_video", "cogvideox": "cogvideox", "flux": "flux"}
PIPELINE_FAMILY = {
    "WanPipeline": "wan",
    "HunyuanVideoPipeline": "hunyuanvideo",
    "CogVideoXPipeline": "cogvideox",
    "FluxPipeline": "flux",
}
VAE_CLASS = {
    "wan": "AutoencoderKLWan",
    "hunyuanvideo": "AutoencoderKLHunyuanVideo",
    "cogvideox": "AutoencoderKLCogVideoX",
    "flux": "AutoencoderKL",
}
# The negative prompt the Wan authors recommend (diffusers' WanPipeline example).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)


def _nearest(value: int, step: int, lowest: int, offset: int = 0) -> str:
    """The valid values beside `value` + `offset`, where valid ones are multiples of `step` >= `lowest`
    (plus `offset`): "e.g. 48 or 64", or "e.g. 16" below the lowest."""
    below = value - value % step
    if below < lowest:
        return f"e.g. {lowest + offset}"
    return f"e.g. {below + offset} or {below + step + offset}"


@dataclass(frozen=True)
class Recipe:
    """How to load one model and what to render with it by default.

    source: "hub" (from_pretrained of `hub_id`, a repo id or a local folder), "tiny" (built by
    pipelines.tiny from `seed`) or "toy-shapes" (sparsediff.pipelines.toy_shapes.load_pipeline).
    size_multiple: height and width must be multiples of it (VAE downsampling x patch size).
    frame_step: video frame counts must be k * frame_step + 1 (1: any count). The VAE's temporal
    compression (4), doubled for CogVideoX 1.0, whose VAE decodes only odd latent frame counts whole.
    scheduler_config / call_kwargs: (key, value) pairs applied to the scheduler at load and passed
    to every pipeline call.
    """

    name: str
    family: str
    pipeline_class: str
    source: str
    hub_id: str | None
    description: str
    dtype: str
    output: str  # "video" | "image"
    height: int
    width: int
    frames: int  # 1 for image models
    steps: int
    guidance_scale: float
    fps: int | None  # None for image models
    size_multiple: int = 16
    frame_step: int = 4
    negative_prompt: str | None = None
    cpu_offload: bool = False
    vae_tiling: bool = False
    vae_fp32: bool = False
    scheduler_config: tuple[tuple[str, Any], ...] = ()
    call_kwargs: tuple[tuple[str, Any], ...] = ()
    seed: int = 0  # weights seed of tiny recipes and of random-weight builds

    @property
    def is_video(self) -> bool:
        return self.output == "video"

    @property
    def model_ids(self) -> frozenset[str]:
        """Names a profile's `model_id` may carry for this model."""
        return frozenset(x for x in (self.name, self.hub_id) if x)

    def torch_dtype(self, device: str | torch.device = "cpu") -> torch.dtype:
        """The compute dtype on `device`. The fp32 recipes (the offline ones, fp32 for CPU speed)
        run in bf16 on a GPU: the sparse kernels take only fp16/bf16 there."""
        import torch

        dtype = getattr(torch, self.dtype)
        if dtype == torch.float32 and torch.device(device).type == "cuda":
            return torch.bfloat16
        return dtype

    def check_size(self, height: int, width: int, frames: int) -> None:
        """Raise ValueError naming the argument when a size does not suit this model."""
        m = self.size_multiple
        for arg, value in (("height", height), ("width", width)):
            if value < m or value % m:
                raise ValueError(f"{arg}: {self.name} needs a positive multiple of {m}, got {value} "
                                 f"({_nearest(value, m, m)})")
        if not self.is_video:
            if frames != 1:
                raise ValueError(f"frames: {self.name} makes images; frames must be 1, got {frames}")
            return
        tc = self.frame_step
        if frames < 1 or (frames - 1) % tc:
            raise ValueError(f"frames: {self.name} needs k*{tc}+1 frames, got {frames} "
                             f"({_nearest(frames - 1, tc, 0, offset=1)})")

    def shipped_profile(self) -> Path | None:
        """The calibrated profile shipped for this recipe (calibration/profiles/<name>.json), if any."""
        if self.source == "hub" and self.hub_id and Path(self.hub_id).is_dir():
            return None  # a local folder: no shipped profile can be known to fit it
        try:
            candidate = importlib.resources.files("sparsediff.calibration") / "profiles" / f"{self.name}.json"
        except ModuleNotFoundError:
            return None
        return Path(str(candidate)) if candidate.is_file() else None

    def load(self, device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None, *,
             random_weights: bool = False) -> DiffusionPipeline:
        """Build/download the pipeline, put it on `device`, apply the recipe's memory options.

        random_weights: build a hub recipe's full pipeline from its published configs with random
        weights drawn from `seed`, straight on `device`, instead of downloading it
        (`pipelines/random_weights.py`; ValueError for recipes it does not support).
        """
        import torch

        from sparsediff.pipelines.random_weights import build_random_pipeline, check_random_weights

        if random_weights:
            check_random_weights(self)
        device = torch.device(device)
        dtype = torch_dtype or self.torch_dtype(device)
        if random_weights:
            pipe = build_random_pipeline(self, device, dtype, seed=self.seed)
            if self.cpu_offload and device.type == "cuda":
                pipe.enable_model_cpu_offload(device=device)
        elif self.source == "tiny":
            from sparsediff.pipelines.tiny import build_tiny

            pipe = build_tiny(self.family, self.seed).to(device)
            if dtype != torch.float32:  # built in fp32; casting to fp32 again only draws diffusers warnings
                pipe.to(dtype=dtype)
        elif self.source == "toy-shapes":
            from sparsediff.pipelines import toy_shapes

            pipe = toy_shapes.load_pipeline(device=device, torch_dtype=dtype)
        else:
            import diffusers

            cls = getattr(diffusers, self.pipeline_class)
            kwargs: dict[str, Any] = {"torch_dtype": dtype}
            try:
                if self.vae_fp32:
                    # Wan's VAE loses detail in bf16; its authors decode in fp32.
                    vae_cls = getattr(diffusers, VAE_CLASS[self.family])
                    kwargs["vae"] = vae_cls.from_pretrained(self.hub_id, subfolder="vae", torch_dtype=torch.float32)
                pipe = cls.from_pretrained(self.hub_id, **kwargs)
            except Exception as e:
                if not _not_cached_and_offline(e):
                    raise
                raise ModelUnavailableError(self._unavailable_message()) from e
            if self.cpu_offload and device.type == "cuda":
                pipe.enable_model_cpu_offload(device=device)
            else:
                pipe.to(device)
        if self.scheduler_config:
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **dict(self.scheduler_config))
        if self.vae_tiling:
            pipe.vae.enable_tiling()
        return pipe

    def _unavailable_message(self) -> str:
        from huggingface_hub import constants

        why = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        return (f"model: {self.name}: {self.hub_id} is not (fully) in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and the hub cannot be reached{why}. Download it once where the hub is "
                f"reachable (`hf download {self.hub_id}`) and run again, or give --model a local folder holding the "
                "pipeline")


class ModelUnavailableError(OSError):
    """A hub recipe's model is not in the local Hugging Face cache and cannot be downloaded now."""


def _not_cached_and_offline(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is huggingface_hub's "not in the cache and
    the hub unreachable": diffusers rewords it (e.g. "does not appear to have a file named config.json").
    Not where the hub answered (a gated or missing repo: an HTTP error), whose own message says more."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    not_cached = False
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, HfHubHTTPError):
            return False
        not_cached |= isinstance(e, LocalEntryNotFoundError)
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return not_cached


def _hub(name: str, family: str, pipeline_class: str, hub_id: str, description: str, **kw: Any) -> Recipe:
    return Recipe(name=name, family=family, pipeline_class=pipeline_class, source="hub", hub_id=hub_id,
                  description=description, **kw)


_WAN_VIDEO = dict(output="video", dtype="bfloat16", vae_fp32=True, negative_prompt=WAN_NEGATIVE_PROMPT)
_TINY_TEXT = (("max_sequence_length", 64),)

_RECIPES: tuple[Recipe, ...] = (
    _hub("wan2.1-t2v-1.3b", "wan", "WanPipeline", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
         "Wan 2.1 text-to-video 1.3B, 480p", height=480, width=832, frames=81, steps=50, guidance_scale=5.0,
         fps=16, scheduler_config=(("flow_shift", 3.0),), **_WAN_VIDEO),
    _hub("wan2.1-t2v-14b", "wan", "WanPipeline", "Wan-AI/Wan2.1-T2V-14B-Diffusers",
         "Wan 2.1 text-to-video 14B, 720p", height=720, width=1280, frames=81, steps=50, guidance_scale=5.0,
         fps=16, scheduler_config=(("flow_shift", 5.0),), vae_tiling=True, **_WAN_VIDEO),
    _hub("wan2.2-t2v-a14b", "wan", "WanPipeline", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
         "Wan 2.2 text-to-video, two 14B experts (MoE), 720p", height=720, width=1280, frames=81, steps=40,
         guidance_scale=4.0, fps=16, call_kwargs=(("guidance_scale_2", 3.0),), cpu_offload=True,
         vae_tiling=True, **_WAN_VIDEO),
    _hub("wan2.2-ti2v-5b", "wan", "WanPipeline", "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
         "Wan 2.2 text/image-to-video 5B (text-to-video use), 720p 24 fps", height=704, width=1280, frames=121,
         steps=50, guidance_scale=5.0, fps=24, size_multiple=32, vae_tiling=True, **_WAN_VIDEO),
    _hub("hunyuanvideo", "hunyuanvideo", "HunyuanVideoPipeline", "hunyuanvideo-community/HunyuanVideo",
         "HunyuanVideo 13B text-to-video, 720p", output="video", dtype="bfloat16", height=720, width=1280,
         frames=129, steps=50, guidance_scale=6.0, fps=24, vae_tiling=True),
    _hub("cogvideox-2b", "cogvideox", "CogVideoXPipeline", "THUDM/CogVideoX-2b",
         "CogVideoX 2B text-to-video, 480x720 8 fps", output="video", dtype="float16", height=480, width=720,
         frames=49, steps=50, guidance_scale=6.0, fps=8, frame_step=8, vae_tiling=True),
    _hub("cogvideox-5b", "cogvideox", "CogVideoXPipeline", "THUDM/CogVideoX-5b",
         "CogVideoX 5B text-to-video, 480x720 8 fps", output="video", dtype="bfloat16", height=480, width=720,
         frames=49, steps=50, guidance_scale=6.0, fps=8, frame_step=8, vae_tiling=True),
    _hub("flux.1-dev", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-dev",
         "FLUX.1 [dev] text-to-image 12B (gated repo: accept its license first)", output="image",
         dtype="bfloat16", height=1024, width=1024, frames=1, steps=28, guidance_scale=3.5, fps=None,
         frame_step=1),
    _hub("flux.1-schnell", "flux", "FluxPipeline", "black-forest-labs/FLUX.1-schnell",
         "FLUX.1 [schnell] text-to-image 12B, 4-step distilled", output="image", dtype="bfloat16",
         height=1024, width=1024, frames=1, steps=4, guidance_scale=0.0, fps=None, frame_step=1,
         call_kwargs=(("max_sequence_length", 256),)),
    Recipe("tiny-wan", "wan", "WanPipeline", "tiny", None, "tiny random Wan 2.1 (offline, tests)",
           dtype="float32", output="video", height=256, width=256, frames=9, steps=4, guidance_scale=5.0,
           fps=8, call_kwargs=_TINY_TEXT),
    Recipe("tiny-hunyuanvideo", "hunyuanvideo", "HunyuanVideoPipeline", "tiny", None,
           "tiny random HunyuanVideo (offline, tests)", dtype="float32", output="video", height=256, width=256,
           frames=9, steps=4, guidance_scale=6.0, fps=8,
           # The stock chat template is hundreds of bytes: with a byte tokenizer it would crowd out the prompt.
           call_kwargs=(*_TINY_TEXT, ("prompt_template", {"template": "{}", "crop_start": 0}))),
    Recipe("tiny-cogvideox", "cogvideox", "CogVideoXPipeline", "tiny", None,
           "tiny random CogVideoX-5B layout (offline, tests)", dtype="float32", output="video", height=256,
           width=256, frames=9, steps=4, guidance_scale=6.0, fps=8, frame_step=8,
           call_kwargs=(("max_sequence_length", 32),)),
    Recipe("tiny-flux", "flux", "FluxPipeline", "tiny", None, "tiny random FLUX.1-dev layout (offline, tests)",
           dtype="float32", output="image", height=512, width=384, frames=1, steps=4, guidance_scale=3.5,
           fps=None, frame_step=1, call_kwargs=_TINY_TEXT),
)
RECIPES: dict[str, Recipe] = {r.name: r for r in _RECIPES}
TOY_SHAPES = "toy-shapes"


def toy_shapes_available() -> bool:
    """Whether the project's trained model (sparsediff.pipelines.toy_shapes) offers load_pipeline."""
    try:
        spec = importlib.util.find_spec("sparsediff.pipelines.toy_shapes")
    except ModuleNotFoundError:
        return False
    if spec is None:
        return False
    module = importlib.import_module("sparsediff.pipelines.toy_shapes")
    return callable(getattr(module, "load_pipeline", None))


def _toy_shapes_recipe() -> Recipe:
    from sparsediff.pipelines import toy_shapes as ts

    # No VAE: pixels are folded PATCH x PATCH into channels and every frame is a latent frame.
    return Recipe(
        TOY_SHAPES, "wan", "ToyShapesPipeline", "toy-shapes", None,
        "the project's trained toy-shapes Wan model (offline)", dtype="float32", output="video",
        height=ts.DEFAULT_HEIGHT, width=ts.DEFAULT_WIDTH, frames=ts.DEFAULT_FRAMES, steps=ts.DEFAULT_STEPS,
        guidance_scale=ts.DEFAULT_GUIDANCE, fps=ts.DEFAULT_FPS, size_multiple=ts.PATCH, frame_step=1,
    )


def available_recipes() -> dict[str, Recipe]:
    """Every recipe usable here, by name (toy-shapes only once its module exists)."""
    recipes = dict(RECIPES)
    if toy_shapes_available():
        recipes[TOY_SHAPES] = _toy_shapes_recipe()
    return recipes


def default_recipe_name() -> str:
    """The default `--model`: the trained toy-shapes model where available, else tiny-wan."""
    return TOY_SHAPES if toy_shapes_available() else "tiny-wan"


def recipe_from_folder(path: str | Path) -> Recipe:
    """A recipe for a local diffusers pipeline folder (see the module docstring for the family rules)."""
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ValueError(f"model: {path} is a folder without model_index.json, not a diffusers pipeline")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        class_name = index["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"model: {index_file} is not a valid model_index.json ({e!r})") from None
    family = PIPELINE_FAMILY.get(class_name)
    if family is None:
        raise ValueError(f"model: {path} holds a {class_name}; supported pipelines: {', '.join(PIPELINE_FAMILY)}")
    base_name = {"wan": "wan2.1-t2v-1.3b", "hunyuanvideo": "hunyuanvideo", "cogvideox": "cogvideox-5b",
                 "flux": "flux.1-dev"}[family]
    if family == "wan" and (index.get("transformer_2") or [None])[0]:
        base_name = "wan2.2-t2v-a14b"
    elif family == "wan" and index.get("expand_timesteps"):
        base_name = "wan2.2-ti2v-5b"
    # "./wan2.1-t2v-1.3b", not "wan2.1-t2v-1.3b": a folder's name must never be a recipe's (random weights,
    # profiles and earlier renders' settings go by the name); recipe names hold no path separator.
    where = f"./{path}" if len(path.parts) == 1 else str(path)
    return dataclasses.replace(RECIPES[base_name], name=where, hub_id=where, pipeline_class=class_name,
                               description=f"local {class_name} folder (defaults of {base_name})")


def get_recipe(name: str) -> Recipe:
    """The recipe called `name`, or one for a local diffusers pipeline folder; ValueError otherwise."""
    recipes = available_recipes()
    if name in recipes:
        return recipes[name]
    if Path(name).is_dir():
        return recipe_from_folder(name)
    raise ValueError(f"model: unknown recipe {name!r}; known: {', '.join(recipes)} "
                     f"(or a local folder holding a diffusers pipeline)")


def format_table(recipes: dict[str, Recipe]) -> str:
    """The recipes as an aligned text table."""
    header = ("name", "family", "output", "size", "frames", "steps", "guidance", "fps", "dtype", "profile", "source")
    rows = [header]
    for r in recipes.values():
        rows.append((
            r.name, r.family, r.output, f"{r.height}x{r.width}", str(r.frames), str(r.steps), f"{r.guidance_scale:g}",
            "-" if r.fps is None else str(r.fps), r.dtype, "yes" if r.shipped_profile() else "-",
            r.hub_id or r.source,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# --------------------------------------------------------------------------- `sparsediff models`

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the recipes as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    recipes = available_recipes()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in recipes.values()], indent=2))
    else:
        print(format_table(recipes))
        print(f"\ndefault --model: {default_recipe_name()}; a local diffusers pipeline folder also works")
    return 0
