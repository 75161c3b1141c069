"""CogVideoX: the joint [text ; video] self-attention of every block runs sparse."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0

from sparsediff.processors.base import FamilySpec, ForwardInfo, SparseAttnProcessorBase, TokenOrderSite, timestep_value


class CogVideoXSparseAttnProcessor(SparseAttnProcessorBase):
    """diffusers 0.42.1 `CogVideoXAttnProcessor2_0`, attention through the sparsediff controller.

    `fuse_qkv_projections()` replaces whatever processor is set: apply sparsediff after fusing.
    """

    def dense_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, parallel: bool) -> torch.Tensor:
        """The stock processor's attention call: SDPA directly (CogVideoX has no context parallel plan)."""
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        text_seq_length = encoder_hidden_states.size(1)

        # [text ; video], or [video ; text] where the forward holds its video tokens in the attention order
        hidden_states = self.join_text(encoder_hidden_states, hidden_states)

        batch_size, sequence_length, _ = hidden_states.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads

        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # Apply RoPE if needed
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            # Tables of the joint sequence (sparsediff's step hook: the text's rows the identity), or of
            # the video tokens after the text (the stock tables, where no hook replaced them).
            rotated = slice(None) if image_rotary_emb[0].shape[0] == sequence_length else slice(text_seq_length, None)
            query[:, :, rotated] = apply_rotary_emb(query[:, :, rotated], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, rotated] = apply_rotary_emb(key[:, :, rotated], image_rotary_emb)

        # The stock sequence is [text ; video] (`attend` returns the output in that order)
        hidden_states = self.attend(
            query, key, value, layout="BHND", text_tokens=text_seq_length, text_first=True,
            attention_mask=attention_mask,
        )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_seq_length, hidden_states.size(1) - text_seq_length], dim=1
        )
        return hidden_states, encoder_hidden_states


def _read_forward(transformer: torch.nn.Module, args: dict[str, Any]) -> ForwardInfo:
    # hidden_states: (B, F, C, H, W) latents; tokens are (f, h, w) patches in raster order.
    _, f, _, h, w = args["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
    return ForwardInfo(timestep_value(args["timestep"]), (f // p_t, h // p, w // p),
                       args["encoder_hidden_states"].shape[1])


FAMILY = FamilySpec(
    name="cogvideox",
    transformer_class="CogVideoXTransformer3DModel",
    processor_cls=CogVideoXSparseAttnProcessor,
    stock_processors=(CogVideoXAttnProcessor2_0, FusedCogVideoXAttnProcessor2_0),
    is_sparse_layer=lambda name: name.startswith("transformer_blocks."),
    read_forward=_read_forward,
    # The patch embedding joins [text ; video] (the forward then splits them by position), and the
    # output projection is the last per-token module; the rotary tables arrive as a forward argument.
    token_order_sites=(TokenOrderSite("patch_embed", text_first=True), TokenOrderSite("proj_out", restore=True)),
    joint_rotary_argument="image_rotary_emb",
)
