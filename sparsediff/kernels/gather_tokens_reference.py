"""Plain-torch reference of the token gather: (B, H, N, D) tensors with their tokens reordered."""
from __future__ import annotations

import torch

from sparsediff.layout import stored_bnhd


def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D) with its tokens in `index` order, x[:, :, index], stored as x is: (B, N, H, D)
    or (B, H, N, D). The gather runs in that layout, so that it moves contiguous rows."""
    if stored_bnhd(x):  # each token is one row of H*D values
        return x.transpose(1, 2).index_select(1, index).transpose(1, 2)
    return x.index_select(2, index)
