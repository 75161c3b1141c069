"""sparsediff: block-sparse attention with online mask prediction for diffusion transformers."""
from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N
from sparsediff.attention import block_sparse_attention, predict_block_mask, sparse_attention
from sparsediff.profile import SparsityProfile
from sparsediff import processors
from sparsediff.processors import apply, remove

__all__ = [
    "BLOCK_M",
    "BLOCK_N",
    "block_sparse_attention",
    "predict_block_mask",
    "sparse_attention",
    "SparsityProfile",
    "processors",
    "apply",
    "remove",
]
__version__ = "0.1.0"
