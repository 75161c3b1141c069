"""Sparse attention processors for the four supported families, and `apply` / `remove`."""
from sparsediff.processors.api import SparseHandle, apply, remove
from sparsediff.processors.base import ForwardInfo, SparseAttnProcessorBase
from sparsediff.processors.cogvideox import CogVideoXSparseAttnProcessor
from sparsediff.processors.controller import AttentionCall, AttentionController, SparsityStats
from sparsediff.processors.flux import FluxSparseAttnProcessor
from sparsediff.processors.hunyuan_video import HunyuanVideoSparseAttnProcessor
from sparsediff.processors.wan import WanSparseAttnProcessor

__all__ = [
    "apply",
    "remove",
    "SparseHandle",
    "AttentionController",
    "AttentionCall",
    "SparsityStats",
    "ForwardInfo",
    "SparseAttnProcessorBase",
    "WanSparseAttnProcessor",
    "HunyuanVideoSparseAttnProcessor",
    "CogVideoXSparseAttnProcessor",
    "FluxSparseAttnProcessor",
]
