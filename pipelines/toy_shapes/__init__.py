"""toy-shapes: the project's own small text-to-video model (a stock WanTransformer3DModel).

Trained here on procedural clips of coloured shapes (``data.py``) so that its attention has
real structure to sparsify. ``load_pipeline()`` loads the weights shipped in ``weights/``.
"""

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    DEFAULT_GUIDANCE,
    DEFAULT_HEIGHT,
    DEFAULT_STEPS,
    DEFAULT_WIDTH,
    FLOW_SHIFT,
    PATCH,
    TrainConfig,
)

if TYPE_CHECKING:
    from .pipeline import ToyShapesPipeline

# Imported on first use (PEP 562): the recipe list (`sparsediff models`) needs the defaults above,
# not diffusers, which the pipeline module loads.
_EXPORTS = {
    "ToyShapesPipeline": ".pipeline", "ToyShapesPipelineOutput": ".pipeline", "frames_to_latents": ".pipeline",
    "latents_to_frames": ".pipeline", "ToyTextEncoder": ".text_encoder", "ToyTokenizer": ".tokenizer",
}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_pipeline(device: str | torch.device = "cpu", torch_dtype: torch.dtype = torch.float32) -> "ToyShapesPipeline":
    """The trained toy shapes pipeline from the package's own weights (no network)."""
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"torch_dtype must be a torch.dtype, got {torch_dtype!r}")
    from .pipeline import ToyShapesPipeline

    return ToyShapesPipeline.from_folder(WEIGHTS_DIR, device=device, torch_dtype=torch_dtype)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_FPS", "DEFAULT_FRAMES", "DEFAULT_GUIDANCE", "DEFAULT_HEIGHT", "DEFAULT_STEPS", "DEFAULT_WIDTH",
    "FLOW_SHIFT", "PATCH", "WEIGHTS_DIR", "TrainConfig", "ToyShapesPipeline", "ToyShapesPipelineOutput", "ToyTextEncoder",
    "ToyTokenizer", "frames_to_latents", "latents_to_frames", "load_pipeline",
]
