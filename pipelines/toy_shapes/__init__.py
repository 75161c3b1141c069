"""toy-shapes: the project's own small text-to-video model (a stock WanTransformer3DModel).

Trained here on procedural clips of coloured shapes (``data.py``) so that its attention has
real structure to sparsify. ``load_pipeline()`` loads the weights shipped in ``weights/``.
"""

from pathlib import Path

import torch

from .config import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    FLOW_SHIFT,
    TrainConfig,
)
from .pipeline import ToyShapesPipeline, ToyShapesPipelineOutput, frames_to_latents, latents_to_frames
from .text_encoder import ToyTextEncoder
from .tokenizer import ToyTokenizer

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_pipeline(device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32) -> ToyShapesPipeline:
    """The trained toy shapes pipeline from the package's own weights (no network)."""
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
    return ToyShapesPipeline.from_folder(WEIGHTS_DIR, device=device, torch_dtype=torch_dtype)


__all__ = [
    "DEFAULT_FPS", "DEFAULT_FRAMES", "DEFAULT_GUIDANCE", "DEFAULT_HEIGHT", "DEFAULT_STEPS", "DEFAULT_WIDTH",
    "FLOW_SHIFT", "WEIGHTS_DIR", "TrainConfig", "ToyShapesPipeline", "ToyShapesPipelineOutput", "ToyTextEncoder",
    "ToyTokenizer", "frames_to_latents", "latents_to_frames", "load_pipeline",
]
