"""What the four family processors share: the processor base class and the family description."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

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
class FamilySpec:
    """How sparsediff plugs into one model family.

    transformer_class: the diffusers transformer class name.
    processor_cls: our processor, used for the layers `is_sparse_layer` accepts (keys of
    `model.attn_processors`); all other layers keep their stock processor.
    read_forward: (transformer, bound forward arguments) -> ForwardInfo.
    """

    name: str
    transformer_class: str
    processor_cls: type[SparseAttnProcessorBase]
    is_sparse_layer: Callable[[str], bool]
    read_forward: Callable[[torch.nn.Module, dict[str, Any]], ForwardInfo]


class SparseAttnProcessorBase:
    """Base of the family processors: the layer's qualified name and the shared controller.

    Subclasses copy the stock diffusers processor of their family and replace its attention call
    with `self.controller.attend(self.layer_name, ..., dense=<the stock call>)`.
    """

    # `enable_parallelism` fills `_parallel_config` only where the class declares it.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layer_name: str, controller: AttentionController) -> None:
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError(f"layer_name must be a non-empty string, got {layer_name!r}")
        self.layer_name = layer_name
        self.controller = controller

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.layer_name!r})"


def timestep_value(timestep: Any) -> float:
    """A timestep argument (tensor of any shape, or number) as one float: its maximum.

    The maximum because Wan 2.2 TI2V passes per-token timesteps whose conditioning-frame tokens are 0.
    """
    if isinstance(timestep, torch.Tensor):
        return float(timestep.detach().max())
    return float(timestep)
