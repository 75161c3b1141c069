"""Which transformers sparsediff supports, and which of their attention layers it makes sparse."""
from __future__ import annotations

from typing import Any

import torch

from sparsediff.processors import cogvideox, flux, hunyuan_video, wan
from sparsediff.processors.base import FamilySpec

FAMILY_SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in (
    wan.FAMILY, hunyuan_video.FAMILY, cogvideox.FAMILY, flux.FAMILY)}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, or the one `torch.compile` wrapped."""
    return getattr(module, "_orig_mod", module)


def family_of(module: Any) -> FamilySpec | None:
    """The family whose transformer class `module` is (or subclasses), else None."""
    if not isinstance(module, torch.nn.Module):
        return None
    names = {cls.__name__ for cls in type(unwrap(module)).__mro__}
    return next((spec for spec in FAMILY_SPECS.values() if spec.transformer_class in names), None)


def transformers_of(pipe_or_transformer: Any) -> dict[str, torch.nn.Module]:
    """Supported transformers by component name ("transformer", "transformer_2", ...), unwrapped.

    A bare transformer module is named "transformer". Raises ValueError if there is none or if
    they belong to different families.
    """
    supported = ", ".join(spec.transformer_class for spec in FAMILY_SPECS.values())
    components = getattr(pipe_or_transformer, "components", None)
    if isinstance(pipe_or_transformer, torch.nn.Module) and not isinstance(components, dict):
        if family_of(pipe_or_transformer) is None:
            raise ValueError(f"pipe_or_transformer: {type(pipe_or_transformer).__name__} is not a supported "
                             f"transformer ({supported})")
        return {"transformer": unwrap(pipe_or_transformer)}
    if not isinstance(components, dict):
        raise ValueError(f"pipe_or_transformer must be a DiffusionPipeline or a transformer module, "
                         f"got {type(pipe_or_transformer).__name__}")
    found = {name: unwrap(c) for name, c in components.items() if family_of(c) is not None}
    if not found:
        raise ValueError(f"pipe_or_transformer: the pipeline has no supported transformer ({supported})")
    families = {family_of(m).name for m in found.values()}
    if len(families) > 1:
        raise ValueError(f"pipe_or_transformer: transformers of several families {sorted(families)}")
    return found


def sparse_layers(pipe_or_transformer: Any) -> tuple[str, dict[str, int]]:
    """(family name, {qualified layer name: heads}) of the layers sparsediff makes sparse.

    Qualified name: "<component>.<key of model.attn_processors>".
    """
    transformers = transformers_of(pipe_or_transformer)
    family = family_of(next(iter(transformers.values())))
    layers = {}
    for component, model in transformers.items():
        for key in model.attn_processors:
            if family.is_sparse_layer(key):
                layers[f"{component}.{key}"] = model.get_submodule(key.removesuffix(".processor")).heads
    return family.name, layers
