"""sparsediff: block-sparse attention with online mask prediction for diffusion transformers."""
from __future__ import annotations

import importlib
from typing import Any

# Public names and the modules that define them, imported on first use (PEP 562): `sparsediff --help`
# and the CLI's argument checks then do not wait for torch, Triton and diffusers to load.
_EXPORTS = {
    "BLOCK_M": "sparsediff.kernels.block_sparse_attn",
    "BLOCK_N": "sparsediff.kernels.block_sparse_attn",
    "block_sparse_attention": "sparsediff.attention",
    "predict_block_mask": "sparsediff.attention",
    "sparse_attention": "sparsediff.attention",
    "SparsityProfile": "sparsediff.profile",
    "apply": "sparsediff.processors",
    "remove": "sparsediff.processors",
}
__all__ = [*_EXPORTS, "processors"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "processors":
        return importlib.import_module("sparsediff.processors")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsediff' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
