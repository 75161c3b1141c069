"""What the four family processors share: the processor base class and the family description."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn

from sparsediff.processors.ops import register_owner

if TYPE_CHECKING:
    from sparsediff.processors.controller import AttentionController


@dataclass(frozen=True)
class ForwardInfo:
    """What the transformer-level hook learns from one forward call's inputs.

    timestep: the call's timestep as a float (its maximum over the batch/tokens).
    grid: latent token grid (t, h, w) of the video/image tokens in raster order, or None if unknown.
    text_tokens: length of the text segment of joint-attention sequences (None if the family has none
    or it is not known from the inputs).
    """

    timestep: float
    grid: tuple[int, int, int] | None
    text_tokens: int | None


@dataclass(frozen=True)
class TokenOrderSite:
    """A submodule whose output tensors carry the video tokens, in raster order, along `token_dim`
    (and the `token_dims` - 1 dims after it, flattened: a patch embedding's (B, C, T, H, W) output
    holds its tokens in T, H, W). The token-order hooks (api.py) put them in the attention order
    there, or back in raster order (`restore`) where the forward leaves token space. `text_first`: the
    output holds the forward's text tokens before its video tokens (CogVideoX's patch embedding
    joins them); the text stays first."""

    module: str
    token_dim: int = 1
    token_dims: int = 1
    restore: bool = False
    text_first: bool = False


@dataclass(frozen=True)
class FamilySpec:
    """How sparsediff plugs into one model family.

    transformer_class: the diffusers transformer class name.
    processor_cls: our processor, used for the layers `is_sparse_layer` accepts (keys of
    `model.attn_processors`); all other layers keep their stock processor.
    stock_processors: the diffusers processor classes `processor_cls` stands in for; a sparse layer
    holding any other (an IP-Adapter's, a user's) is refused, since replacing it would drop what it adds.
    read_forward: (transformer, the forward's tensor arguments by name) -> ForwardInfo.
    token_order_sites: where a forward can hold its video tokens in the attention order from the
    patch embedding to the output projection, so that its sparse calls reorder nothing (every
    per-token tensor the blocks read passes one of the sites). Empty: each sparse call reorders its
    q, k, v and output. A family whose processor puts the text first joins its sequence with
    `SparseAttnProcessorBase.join_text` (text last in such a forward, so that its calls move no token).
    joint_rotary_argument: a forward argument holding rotary tables (cos, sin) of the video tokens
    alone, (N, D) each, that the processor applies to its joint sequence (CogVideoX's
    `image_rotary_emb`): the step hook hands the blocks tables of the joint sequence instead, in the
    order `join_text` makes (`AttentionController.joint_rotary`; the text length is that of the
    forward's `encoder_hidden_states`).
    """

    name: str
    transformer_class: str
    processor_cls: type[SparseAttnProcessorBase]
    stock_processors: tuple[type, ...]
    is_sparse_layer: Callable[[str], bool]
    read_forward: Callable[[torch.nn.Module, dict[str, Any]], ForwardInfo]
    token_order_sites: tuple[TokenOrderSite, ...] = ()
    joint_rotary_argument: str | None = None


class SparseAttnProcessorBase:
    """Base of the family processors: the layer's qualified name and the shared controller.

    Subclasses copy the stock diffusers processor of their family and replace its attention call
    with `self.attend(query, key, value, ...)`; `dense_attention` is that stock call.
    """

    # `enable_parallelism` fills `_parallel_config` only where the class declares it.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_name: str, controller: AttentionController) -> None:
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name must be a non-empty string, got {layer_name!r}")
        self.layer_name = layer_name
        self.controller = controller
        self._op_key = register_owner(self)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        layout: str = "BNHD",
        text_tokens: int | None = 0,
        text_first: bool = False,
        attention_mask: torch.Tensor | None = None,
        parallel: bool = False,
    ) -> torch.Tensor:
        """This layer's attention through the `sparsediff::attend` op (opaque to torch.compile), which
        runs `self.controller.attend(self.layer_name, ..., dense=<self.dense_attention(...)>)`.

        Returns what `dense_attention` returns, as a contiguous tensor. Arguments as in
        `AttentionController.attend`; `parallel`: the call runs under context parallelism (the stock
        call gets `self._parallel_config`).
        """
        return torch.ops.sparsediff.attend(self._op_key, query, key, value, attention_mask, layout, text_tokens,
                                           text_first, parallel)

    def join_text(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """The joint sequence of a processor that puts the text first: `torch.cat([text, video], dim=1)`
        as the stock one, but [video ; text] in a forward that holds its video tokens in the attention
        order (`AttentionController.join_text`, through the `sparsediff::join_text` op)."""
        return torch.ops.sparsediff.join_text(self._op_key, text, video)

    def dense_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, parallel: bool) -> torch.Tensor:
        """The stock processor's attention call: `dispatch_attention_fn` (Wan, HunyuanVideo, FLUX)."""
        return dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config if parallel else None,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer_name!r})"


def timestep_value(timestep: Any) -> float:
    """A timestep argument (tensor of any shape, or number) as one float: its maximum.

    The maximum because Wan 2.2 TI2V passes per-token timesteps whose conditioning-frame tokens are 0.
    """
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max())
    return float(timestep)
