"""Defaults of the shipped toy shapes model and the training configuration (a JSON-able dataclass)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields

DEFAULT_HEIGHT = 64
DEFAULT_WIDTH = 64
DEFAULT_FRAMES = 17
DEFAULT_STEPS = 16
# 3, not 4: on the H100 the shipped weights draw as many or more named colours and motions at 3 (seeds 0-2,
# both evaluation splits), and a sparse render strays 1.5-2.2 dB less from the dense one (guidance
# multiplies the sparse error of the conditional half; pipelines/toy_shapes/README.md).
DEFAULT_GUIDANCE = 3.0
DEFAULT_FPS = 8
FLOW_SHIFT = 3.0  # timestep shift of training's t distribution and of the sampling schedule
MIN_SIZE = 32  # px: the smallest clip height and width the data generator draws (objects must fit with margins)
OPTIMIZERS = ("adamw", "muon")
PATCH = 4  # each frame is pixel-unshuffled by this: 3 * PATCH**2 channels on an (H / PATCH, W / PATCH) grid


@dataclass
class TrainConfig:
    # run
    seed: int = 0
    minutes: float = 7.0  # wall-clock budget; the step count is fixed from early throughput
    steps: int | None = None  # fixes the step count instead (reproducible runs)
    max_minutes: float | None = None  # with `steps`: stop (and save) early at this wall-clock time
    init_from: str | None = None  # a weights folder (save_folder layout) to fine-tune instead of a fresh init
    bf16: bool = True  # bf16 autocast (also on CPUs with avx512_bf16 / AMX, where it is ~1.6-2x faster)
    compile: bool = False  # torch.compile the transformer's training forward (fuses Wan's many small ops)
    batch_size: int = 32
    log_every: int = 50
    # optimisation: "adamw" for every parameter, or "muon": Muon (orthogonalised momentum, its update
    # RMS matched to AdamW's so that lr and weight_decay mean the same) for the transformer blocks'
    # weight matrices and AdamW for the rest
    optimizer: str = "adamw"
    lr: float = 4e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    # Loss weight of the tokens an object covers is 1 + this: objects are a few % of the pixels, and
    # unweighted training left clips on plain black or white backgrounds without any object
    foreground_weight: float = 0.0
    # rectified flow: t = shift(sigmoid(N(mean, std)))
    t_mean: float = 0.0
    t_std: float = 1.0
    flow_shift: float = FLOW_SHIFT
    # data
    height: int = DEFAULT_HEIGHT
    width: int = DEFAULT_WIDTH
    num_frames: int = DEFAULT_FRAMES
    max_objects: int = 3
    # curriculum: the first `single_object_fraction` of the steps train on one-object clips, where a
    # caption's motion words can belong to one object only (binding them comes before telling objects apart)
    single_object_fraction: float = 0.0
    # curriculum for slow hardware: the first `window_fraction` of the steps train on random
    # `window_frames`-frame windows of the clips (same motion per frame, far fewer tokens)
    window_frames: int | None = None
    window_fraction: float = 0.0
    # curriculum: the first `start_size_fraction` of the steps train on `start_size` x `start_size` clips
    # (the shipped weights began with a run at 48x48: 2,448 tokens a clip against 4,352 at 64x64)
    start_size: int | None = None
    start_size_fraction: float = 0.0
    # transformer (WanTransformer3DModel)
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    # text encoder
    text_dim: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_ffn_dim: int = 512
    max_length: int = 32

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "num_layers", "num_heads", "ffn_dim", "text_dim",
                     "text_layers", "text_heads", "text_ffn_dim", "max_length", "num_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim not in (64, 128):
            raise ValueError(f"head_dim must be 64 or 128 (the sparse kernel's head dims), got {self.head_dim}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.steps is None and self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.window_frames is not None and not 2 <= self.window_frames <= self.num_frames:
            raise ValueError(f"window_frames must be in [2, num_frames], got {self.window_frames}")
        if self.start_size is not None and (self.start_size % PATCH
                                            or not MIN_SIZE <= self.start_size <= min(self.height, self.width)):
            raise ValueError(f"start_size must be a multiple of {PATCH} in [{MIN_SIZE}, min(height, width)] = "
                             f"[{MIN_SIZE}, {min(self.height, self.width)}], got {self.start_size}")
        for name in ("window_fraction", "single_object_fraction", "start_size_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for what, value, fraction in (("window_frames", self.window_frames, "window_fraction"),
                                      ("start_size", self.start_size, "start_size_fraction")):
            if (value is None) != (getattr(self, fraction) == 0.0):
                raise ValueError(f"{what} and {fraction} go together (a curriculum's setting and the share of the "
                                 f"steps that use it), got {what}={value}, {fraction}={getattr(self, fraction)}")
            if self.steps is None and 0.0 < getattr(self, fraction) < 1.0:
                # A minutes run fixes its step count from the speed of its first steps, which are the curriculum's.
                raise ValueError(f"a --minutes run cannot switch {what} halfway: its step count comes from the first "
                                 f"steps' speed; give --steps (with --max-minutes), or {fraction} 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.foreground_weight < 0.0:
            raise ValueError(f"foreground_weight must be >= 0, got {self.foreground_weight}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def transformer_config(self) -> dict:
        return dict(
            patch_size=(1, 1, 1), num_attention_heads=self.num_heads, attention_head_dim=self.head_dim,
            in_channels=48, out_channels=48, text_dim=self.text_dim, freq_dim=256, ffn_dim=self.ffn_dim,
            num_layers=self.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )

    def text_encoder_config(self, vocab_size: int) -> dict:
        return dict(vocab_size=vocab_size, dim=self.text_dim, num_layers=self.text_layers,
                    num_heads=self.text_heads, ffn_dim=self.text_ffn_dim, max_length=self.max_length)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        with open(path) as f:
            data = json.load(f)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"path: unknown TrainConfig fields {sorted(unknown)}")
        return cls(**data)
