"""FLUX: double-stream (joint) and single-stream blocks attend over [text ; image] sparsely.

Image tokens lie on a 2D latent grid (packed 2x2 latents), learnt from `img_ids` (rows
(0, row, col) in raster order). Single-stream blocks never see the text length: it comes from the
transformer-level hook (`text_tokens=None`).
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, _get_qkv_projections

from sparsediff.processors.base import FamilySpec, ForwardInfo, SparseAttnProcessorBase, timestep_value


class FluxSparseAttnProcessor(SparseAttnProcessorBase):
    """diffusers 0.42.1 `FluxAttnProcessor`, attention through the sparsediff controller."""

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )

        # Reshape by a fixed `head_dim` and let `-1` absorb the head count. Under tensor parallelism each rank
        # holds a column-sharded slice (`attn.heads // tp_degree` heads); this keeps the processor TP-agnostic.
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))

            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)

            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # The sequence is [text ; image]; single-stream blocks get it already joined.
        hidden_states = self.attend(
            query,
            key,
            value,
            text_tokens=None if encoder_hidden_states is None else encoder_hidden_states.shape[1],
            text_first=True,
            attention_mask=attention_mask,
            parallel=self._parallel_config is not None,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states


def image_grid_from_ids(img_ids: torch.Tensor) -> tuple[int, int, int] | None:
    """(1, h, w) if `img_ids` ((N, 3) or deprecated (B, N, 3)) is one image's (0, row, col) raster, else None."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[1] != 3 or ids.shape[0] == 0:
        return None
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    if h * w != ids.shape[0]:
        return None
    idx = torch.arange(h * w, device=ids.device)
    raster = (rows == idx // w) & (cols == idx % w) & (ids[:, 0] == ids[0, 0])
    return (1, h, w) if bool(raster.all()) else None


def _read_forward(transformer: torch.nn.Module, args: dict[str, Any]) -> ForwardInfo:
    img_ids = args.get("img_ids")
    grid = None if img_ids is None else image_grid_from_ids(img_ids)
    return ForwardInfo(timestep_value(args["timestep"]), grid, args["encoder_hidden_states"].shape[1])


FAMILY = FamilySpec(
    name="flux",
    transformer_class="FluxTransformer2DModel",
    processor_cls=FluxSparseAttnProcessor,
    stock_processors=(FluxAttnProcessor,),
    is_sparse_layer=lambda name: name.startswith(("transformer_blocks.", "single_transformer_blocks.")),
    read_forward=_read_forward,
)
