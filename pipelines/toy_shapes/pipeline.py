"""ToyShapesPipeline: caption -> pixel-space video with a stock WanTransformer3DModel.

Patch transform (fixed, no VAE): RGB frames in [0, 1] are mapped to [-1, 1] and each frame is
pixel-unshuffled by ``PATCH`` = 4, giving ``3 * 16 = 48`` channels on an (H/4, W/4) grid; the
transformer sees (B, 48, F, H/4, W/4) with patch_size (1, 1, 1), so a 17-frame 64x64 clip (the
default) is 17 * 16 * 16 = 4352 video tokens. Sampling is rectified flow with diffusers'
FlowMatchEulerDiscreteScheduler; the transformer predicts the velocity ``noise - x0``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .config import DEFAULT_FRAMES, DEFAULT_GUIDANCE, DEFAULT_HEIGHT, DEFAULT_STEPS, DEFAULT_WIDTH, PATCH
from .files import json_writer, text_writer, write_files_atomically
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer

logger = logging.getLogger(__name__)

CHANNELS = 3 * PATCH * PATCH
# What save_folder writes and from_folder reads.
FOLDER_FILES = tuple(f"{name}/{file}" for name, file in (
    ("transformer", "config.json"), ("transformer", SAFETENSORS_WEIGHTS_NAME), ("text_encoder", "config.json"),
    ("text_encoder", SAFETENSORS_WEIGHTS_NAME), ("tokenizer", "vocab.json"), ("scheduler", "scheduler_config.json")))


def frames_to_latents(frames: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, H, W) in [0, 1] -> (B, 48, F, H/4, W/4) in [-1, 1]: the model's input space."""
    if frames.ndim != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be (B, F, 3, H, W), got {tuple(frames.shape)}")
    B, Fr, C, H, W = frames.shape
    if H % PATCH or W % PATCH:
        raise ValueError(f"frames: height and width must be multiples of {PATCH}, got {H}x{W}")
    x = F.pixel_unshuffle(frames.reshape(B * Fr, C, H, W) * 2.0 - 1.0, PATCH)
    return x.reshape(B, Fr, CHANNELS, H // PATCH, W // PATCH).transpose(1, 2).contiguous()


def latents_to_frames(latents: torch.Tensor) -> torch.Tensor:
    """Inverse of ``frames_to_latents``, clamped to [0, 1]: (B, 48, F, h, w) -> (B, F, 3, 4h, 4w)."""
    if latents.ndim != 5 or latents.shape[1] != CHANNELS:
        raise ValueError(f"latents must be (B, {CHANNELS}, F, h, w), got {tuple(latents.shape)}")
    B, _, Fr, h, w = latents.shape
    x = latents.transpose(1, 2).reshape(B * Fr, CHANNELS, h, w)
    x = F.pixel_shuffle(x, PATCH).reshape(B, Fr, 3, h * PATCH, w * PATCH)
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


def _captions(value: object) -> bool:
    """Whether ``value`` is a caption or a list/tuple of them."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


@dataclass
class ToyShapesPipelineOutput(BaseOutput):
    """``frames``: np.ndarray (B, F, H, W, 3) in [0, 1] for "np", torch (B, F, 3, H, W) for "pt",
    the raw (B, 48, F, H/4, W/4) sample for "latent"."""

    frames: np.ndarray | torch.Tensor


class ToyShapesPipeline(DiffusionPipeline):
    """Text-to-video for the toy shapes model; called like WanPipeline."""

    model_cpu_offload_seq = "text_encoder->transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: WanTransformer3DModel, text_encoder: ToyTextEncoder,
                 tokenizer: ToyTokenizer, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                    torch_dtype: torch.dtype = torch.float32) -> "ToyShapesPipeline":
        """Load a folder written by ``save_folder`` (transformer/, text_encoder/, tokenizer/, scheduler/)."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"no toy shapes weights: {root} is not a folder")
        # Checked here: diffusers' own error for a missing weights file names a .bin file the folder never had.
        missing = [name for name in FOLDER_FILES if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"no toy shapes weights in {root}: missing {', '.join(missing)}")
        transformer = WanTransformer3DModel.from_pretrained(root / "transformer", torch_dtype=torch_dtype)
        text_encoder = ToyTextEncoder.from_pretrained(root / "text_encoder", torch_dtype=torch_dtype)
        tokenizer = ToyTokenizer.load(root / "tokenizer" / "vocab.json")
        # Another vocabulary's ids would pick the wrong embeddings (unsaid) or fail inside nn.Embedding.
        te = text_encoder.config
        if (tokenizer.vocab_size, tokenizer.max_length) != (te.vocab_size, te.max_length):
            raise ValueError(f"{root}: tokenizer/vocab.json ({tokenizer.vocab_size} tokens, max_length "
                             f"{tokenizer.max_length}) does not fit text_encoder ({te.vocab_size}, {te.max_length})")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        return cls(transformer.eval(), text_encoder.eval(), tokenizer, scheduler).to(device)

    def save_folder(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                    extra: Mapping[str, Callable[[str], object]] | None = None) -> None:
        """Write the four components in diffusers' folder layout, weights as ``dtype`` safetensors, and the
        ``extra`` files (a file name in the folder -> a ``files`` writer: a training's config and log), all
        by one ``write_files_atomically``: a save stopped midway leaves the previous save's files, never new
        weights beside old ones, nor beside an earlier run's files that this save passes in ``extra``
        (files it does not write, it leaves as they are)."""
        root = Path(path)
        components = ("transformer", "text_encoder", "tokenizer", "scheduler")
        for name in extra or {}:
            if Path(name).name != name or name in (*components, ".."):
                raise ValueError(f"extra: {name!r} is not a plain file name beside the components {components}")
        writes: dict[Path, Callable[[str], object]] = {}
        for name in ("transformer", "text_encoder", "scheduler"):
            module = getattr(self, name)
            writes[root / name / module.config_name] = text_writer(module.to_json_string())
        for name in ("transformer", "text_encoder"):
            state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in getattr(self, name).state_dict().items()}
            writes[root / name / SAFETENSORS_WEIGHTS_NAME] = partial(save_file, state)
        writes[root / "tokenizer" / "vocab.json"] = json_writer(self.tokenizer.to_dict())
        writes.update({root / name: write for name, write in (extra or {}).items()})
        for file in writes:
            file.parent.mkdir(parents=True, exist_ok=True)
        write_files_atomically(writes)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """``save_folder`` in the weights' own dtype. DiffusionPipeline's saves only diffusers and
        transformers classes: it skipped the tokenizer (a logged warning), set it to (None, None) in
        this pipeline's config, and left a folder that from_pretrained refused."""
        self.save_folder(save_directory, dtype=self.transformer.dtype)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike,
                        torch_dtype: torch.dtype = torch.float32) -> "ToyShapesPipeline":
        """``from_folder`` of a local folder: DiffusionPipeline's cannot build the word-level tokenizer."""
        return cls.from_folder(pretrained_model_name_or_path, torch_dtype=torch_dtype)

    def encode_prompt(self, prompt: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Captions -> (B, L, text_dim) embeddings, zero past each caption's end."""
        # The tokenizer encodes any text; say where a caption is not what the model will read.
        for caption in dict.fromkeys(prompt):
            unknown, cut = self.tokenizer.unknown_and_cut(caption)
            if unknown:
                logger.warning(f"caption {caption!r}: words the model does not know, read as <unk>: "
                               f"{', '.join(dict.fromkeys(unknown))} (it knows: {' '.join(self.tokenizer.tokens[3:])})")
            if cut:
                logger.warning(f"caption {caption!r}: past the tokenizer's max_length of {self.tokenizer.max_length} "
                               f"tokens, dropped: {' '.join(cut).replace(' ,', ',')}")
        ids, mask = self.tokenizer(prompt)
        return self.text_encoder(ids.to(device), mask.to(device)).to(dtype)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = DEFAULT_HEIGHT,
        width: int = DEFAULT_WIDTH,
        num_frames: int = DEFAULT_FRAMES,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ToyShapesPipelineOutput | tuple:
        """Render one clip per caption. ``negative_prompt=None`` guides against the empty caption.

        ``callback_on_step_end(pipe, step, timestep, {"latents": ...})`` may return a dict whose
        "latents" replaces the current sample.
        """
        # Anything else failed on len() or deep in the tokenizer, whose error names no argument.
        if not _captions(prompt) or not prompt:
            raise ValueError(f"prompt must be a caption or a non-empty list of captions, got {prompt!r}")
        if negative_prompt is not None and not _captions(negative_prompt):
            raise ValueError(f"negative_prompt must be a caption or a list of captions, got {negative_prompt!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt: {len(negatives)} captions for {len(prompts)} prompts")
        for name, value in (("height", height), ("width", width), ("num_frames", num_frames),
                            ("num_inference_steps", num_inference_steps)):
            if not isinstance(value, numbers.Integral):  # a float failed inside torch.randn or numpy
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if height <= 0 or height % PATCH:
            raise ValueError(f"height must be a positive multiple of {PATCH}, got {height}")
        if width <= 0 or width % PATCH:
            raise ValueError(f"width must be a positive multiple of {PATCH}, got {width}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        # Wan's RoPE table has rope_max_seq_len positions an axis (patch_size is 1): past it a reshape failed inside.
        positions = self.transformer.config.rope_max_seq_len
        for name, value, limit in (("height", height, positions * PATCH), ("width", width, positions * PATCH),
                                   ("num_frames", num_frames, positions)):
            if value > limit:
                raise ValueError(f"{name} must be at most {limit} (the transformer's rope_max_seq_len is {positions}), "
                                 f"got {value}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not math.isfinite(guidance_scale):
            # NaN > 1 is False: a NaN scale rendered without guidance, unsaid.
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        if isinstance(generator, list) and len(generator) != len(prompts):
            # randn_tensor draws clip i from generator[i]: extra ones were ignored unsaid, too few failed deep inside.
            raise ValueError(f"generator: {len(generator)} generators for {len(prompts)} prompts "
                             "(give one, or one per prompt)")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if any(k not in self._callback_tensor_inputs for k in tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs must be within {self._callback_tensor_inputs}")

        device = self._execution_device
        dtype = self.transformer.dtype
        B = len(prompts)
        do_cfg = guidance_scale > 1.0
        # One forward per step: the conditional and unconditional halves ride in one batch.
        embeds = self.encode_prompt(prompts + negatives if do_cfg else prompts, device, dtype)

        shape = (B, CHANNELS, num_frames, height // PATCH, width // PATCH)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_in = torch.cat([latents, latents]) if do_cfg else latents
                velocity = self.transformer(
                    hidden_states=model_in.to(dtype),
                    timestep=t.expand(model_in.shape[0]),
                    encoder_hidden_states=embeds,
                    return_dict=False,
                )[0].float()
                if do_cfg:
                    cond, uncond = velocity.chunk(2)
                    velocity = uncond + guidance_scale * (cond - uncond)
                latents = self.scheduler.step(velocity, t, latents, return_dict=False)[0]
                if callback_on_step_end is not None:
                    state = {"latents": latents}
                    out = callback_on_step_end(self, i, t, {k: state[k] for k in tensor_inputs})
                    latents = out.pop("latents", latents)
                progress_bar.update()

        self.maybe_free_model_hooks()
        if output_type == "latent":
            frames = latents
        else:
            frames = latents_to_frames(latents)
            if output_type == "np":
                frames = frames.permute(0, 1, 3, 4, 2).cpu().numpy()
        if not return_dict:
            return (frames,)
        return ToyShapesPipelineOutput(frames=frames)
