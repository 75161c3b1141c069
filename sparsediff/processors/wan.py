"""Wan 2.1 / 2.2: self-attention (`attn1`) runs sparse; cross-attention (`attn2`) keeps the stock processor."""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)

from sparsediff.processors.base import FamilySpec, ForwardInfo, SparseAttnProcessorBase, TokenOrderSite, timestep_value


class WanSparseAttnProcessor(SparseAttnProcessorBase):
    """diffusers 0.42.1 `WanAttnProcessor`, attention through the sparsediff controller."""

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512 is the context length of the text encoder, hardcoded for now
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:

            def apply_rotary_emb(
                hidden_states: torch.Tensor,
                freqs_cos: torch.Tensor,
                freqs_sin: torch.Tensor,
            ):
                x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
                cos = freqs_cos[..., 0::2]
                sin = freqs_sin[..., 1::2]
                out = torch.empty_like(hidden_states)
                out[..., 0::2] = x1 * cos - x2 * sin
                out[..., 1::2] = x1 * sin + x2 * cos
                return out.type_as(hidden_states)

            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        # I2V task
        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)

            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))

            hidden_states_img = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                backend=self._attention_backend,
                # Reference: https://github.com/huggingface/diffusers/pull/12909
                parallel_config=None,
            )
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        # Reference: https://github.com/huggingface/diffusers/pull/12909 (context parallel self-attention only)
        parallel = encoder_hidden_states is None and self._parallel_config is not None
        hidden_states = self.attend(query, key, value, attention_mask=attention_mask, parallel=parallel)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _read_forward(transformer: torch.nn.Module, args: dict[str, Any]) -> ForwardInfo:
    # hidden_states: (B, C, F, H, W) latents; tokens are (f, h, w) patches in raster order.
    _, _, f, h, w = args["hidden_states"].shape
    p_t, p_h, p_w = transformer.config.patch_size
    return ForwardInfo(timestep_value(args["timestep"]), (f // p_t, h // p_h, w // p_w), None)


FAMILY = FamilySpec(
    name="wan",
    transformer_class="WanTransformer3DModel",
    processor_cls=WanSparseAttnProcessor,
    stock_processors=(WanAttnProcessor,),
    is_sparse_layer=lambda name: name.startswith("blocks.") and name.endswith(".attn1.processor"),
    read_forward=_read_forward,
    # The points where diffusers' context-parallel plan (`WanTransformer3DModel._cp_plan`) splits and
    # gathers the tokens: the rotary tables, the patch embedding (whose output the forward flattens
    # into the blocks' hidden states) and the output projection; a per-token timestep (Wan 2.2
    # TI2V) is reordered by the step hook.
    token_order_sites=(TokenOrderSite("rope"), TokenOrderSite("patch_embedding", token_dim=2, token_dims=3),
                       TokenOrderSite("proj_out", restore=True)),
)
