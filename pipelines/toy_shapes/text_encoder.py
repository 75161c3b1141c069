"""Small caption encoder trained jointly with the transformer: embeddings, positions, 2 layers."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ToyTextEncoder(ModelMixin, ConfigMixin):
    """Token ids (B, L) -> embeddings (B, L, dim); positions past the caption are zeros.

    Zeroed padding mirrors what WanPipeline feeds its transformer (UMT5 states cut to the
    caption's length, then zero-padded), since WanTransformer3DModel's cross-attention takes
    no mask.
    """

    @register_to_config
    def __init__(self, vocab_size: int, dim: int = 256, num_layers: int = 2, num_heads: int = 4,
                 ffn_dim: int = 512, max_length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn_dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.pos.shape[0]:
            raise ValueError(f"input_ids: length {L} exceeds max_length {self.pos.shape[0]}")
        mask = attention_mask.bool()
        h = self.embed(input_ids) + self.pos[:L]
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        return h * mask[..., None].to(h.dtype)
