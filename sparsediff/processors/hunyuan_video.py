"""HunyuanVideo: dual- and single-stream blocks attend over [video ; text] sparsely; the text token
refiner keeps its stock processor. Padded text keys stay excluded (bool key-padding mask -> kv_lens)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from sparsediff.processors.base import FamilySpec, ForwardInfo, SparseAttnProcessorBase, timestep_value


class HunyuanVideoSparseAttnProcessor(SparseAttnProcessorBase):
    """diffusers 0.42.1 `HunyuanVideoAttnProcessor2_0`, attention through the sparsediff controller."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        # 2. QK normalization
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(
                            query[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        query[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(
                            key[:, : -encoder_hidden_states.shape[1]],
                            image_rotary_emb,
                            sequence_dim=1,
                        ),
                        key[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states)
            encoder_key = attn.add_k_proj(encoder_hidden_states)
            encoder_value = attn.add_v_proj(encoder_hidden_states)

            encoder_query = encoder_query.unflatten(2, (attn.heads, -1))
            encoder_key = encoder_key.unflatten(2, (attn.heads, -1))
            encoder_value = encoder_value.unflatten(2, (attn.heads, -1))

            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        # 5. Attention: the sequence is [video ; text]
        hidden_states = self.attend(
            query,
            key,
            value,
            text_tokens=0 if encoder_hidden_states is None else encoder_hidden_states.shape[1],
            attention_mask=attention_mask,
            parallel=self._parallel_config is not None,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : -encoder_hidden_states.shape[1]],
                hidden_states[:, -encoder_hidden_states.shape[1] :],
            )

            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)

            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        return hidden_states, encoder_hidden_states


def _read_forward(transformer: torch.nn.Module, args: dict[str, Any]) -> ForwardInfo:
    # hidden_states: (B, C, F, H, W) latents; tokens are (f, h, w) patches in raster order.
    _, _, f, h, w = args["hidden_states"].shape
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    return ForwardInfo(timestep_value(args["timestep"]), (f // p_t, h // p, w // p),
                       args["encoder_hidden_states"].shape[1])


FAMILY = FamilySpec(
    name="hunyuan_video",
    transformer_class="HunyuanVideoTransformer3DModel",
    processor_cls=HunyuanVideoSparseAttnProcessor,
    stock_processors=(HunyuanVideoAttnProcessor2_0,),
    is_sparse_layer=lambda name: name.startswith(("transformer_blocks.", "single_transformer_blocks.")),
    read_forward=_read_forward,
)
