"""Sparse attention under diffusers' context parallelism (Ulysses), and how to turn it on.

Under `ContextParallelConfig(ulysses_degree=P)` every rank holds a contiguous 1/P of the sequence
inside the processors. `attend_ulysses` exchanges q, k, v all-to-all so that each rank holds the
WHOLE sequence for H/P heads (rank r: heads [r*H/P, (r+1)*H/P)), runs the controller's ordinary
sparse attention on it with those heads' thresholds, and exchanges the output back. The block
mask is predicted over the full sequence, so P ranks compute exactly what one process computes.

Ring attention (ring_degree > 1: each rank sees the keys a part at a time), Ulysses "anything"
mode (uneven shards), attention masks and head counts P does not divide run dense through the
stock diffusers path, said once in the log.

Written against diffusers 0.42.1 internals: `ContextParallelConfig._ulysses_mesh` /
`_flattened_mesh`, and the `ContextParallelSplitHook`s that `enable_parallelism` registers.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from diffusers.hooks import HookRegistry
from diffusers.hooks.context_parallel import ContextParallelSplitHook, EquipartitionSharder, PartitionAnythingSharder
from diffusers.models._modeling_parallel import ContextParallelInput


if TYPE_CHECKING:
    from sparsediff.processors.controller import AttentionController

# Families whose diffusers transformer defines a `_cp_plan` (diffusers 0.42.1).
CONTEXT_PARALLEL_FAMILIES = ("wan", "flux")

# Why a call under context parallelism that was to run sparse ran dense (the controller's
# FALLBACK_CAUSES holds them as "cp-<key>").
CONTEXT_PARALLEL_CAUSES = {
    "ring": "ring attention (ring_degree > 1) passes the keys around a part at a time, which a block mask "
            "predicted over the whole sequence cannot follow",
    "anything": "Ulysses/ring 'anything' mode (uneven shards) is not supported by the sparse path",
    "heads": "the head count is not divisible by the Ulysses degree",
    "mask": "an attention mask under context parallelism is not supported by the sparse path",
}


@dataclass(frozen=True)
class HeadShard:
    """This rank's heads of a layer after the Ulysses all-to-all: heads [start, stop) of `total`."""

    start: int
    stop: int
    total: int
    group: dist.ProcessGroup

    def gather(self, per_head: torch.Tensor) -> torch.Tensor:
        """(stop - start,) values of this rank's heads -> (total,) values of all heads, in head order."""
        out = per_head.new_empty(self.total)
        dist.all_gather_into_tensor(out, per_head.contiguous(), group=self.group)
        return out


@dataclass(frozen=True)
class _Ulysses:
    """The Ulysses group of a context-parallel config, and the all-to-all exchanges over it."""

    group: dist.ProcessGroup
    degree: int
    rank: int

    def head_shard(self, heads: int) -> HeadShard:
        local = heads // self.degree
        return HeadShard(self.rank * local, (self.rank + 1) * local, heads, self.group)

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        return out

    def to_heads(self, x: torch.Tensor, text_local: int, text_first: bool) -> torch.Tensor:
        """(B, n, H, D) sequence shard -> (B, P*n, H/P, D): the whole sequence, this rank's heads.

        Each rank's shard is [its text shard ; its video shard] (or the reverse): the gathered
        sequence is put back into [all text ; all video], the order of the unsplit sequence.
        """
        batch, n, heads, dim = x.shape
        x = x.reshape(batch, n, self.degree, heads // self.degree, dim).permute(2, 1, 0, 3, 4).contiguous()
        x = self._exchange(x)  # (source rank = sequence shard, n, B, H/P, D)
        if text_local:  # each segment's shards in rank order, then the next segment
            x = torch.cat([s.flatten(0, 1) for s in x.split(_segments(n, text_local, text_first), dim=1)])
        else:
            x = x.flatten(0, 1)
        return x.permute(1, 0, 2, 3)  # (B, N, H/P, D)

    def to_sequence(self, x: torch.Tensor, text_local: int, text_first: bool) -> torch.Tensor:
        """Inverse of `to_heads`: (B, N, H/P, D) -> (B, N/P, H, D) this rank's sequence shard."""
        batch, n_full, heads_local, dim = x.shape
        n = n_full // self.degree
        x = x.permute(1, 0, 2, 3)  # (N, B, H/P, D)
        if text_local:
            segments = x.split(_segments(n_full, text_local * self.degree, text_first))
            x = torch.cat([s.unflatten(0, (self.degree, -1)) for s in segments], dim=1)
        else:
            x = x.reshape(self.degree, n, batch, heads_local, dim).contiguous()
        x = self._exchange(x)  # (source rank = head shard, n, B, H/P, D)
        return x.permute(2, 1, 0, 3, 4).reshape(batch, n, heads_local * self.degree, dim)


def _segments(n_tokens: int, n_text: int, text_first: bool) -> tuple[int, int]:
    """Lengths of the two segments of a sequence, in sequence order."""
    return (n_text, n_tokens - n_text) if text_first else (n_tokens - n_text, n_text)


def _ulysses_or_cause(parallel_config: Any, heads: int, attention_mask: torch.Tensor | None) -> _Ulysses | str:
    cp = parallel_config.context_parallel_config
    if cp.ring_degree > 1:
        return "ring"
    if cp.ulysses_anything or cp.ring_anything:
        return "anything"
    if heads % cp.ulysses_degree:
        return "heads"
    if attention_mask is not None:
        return "mask"
    return _Ulysses(cp._ulysses_mesh.get_group(), cp.ulysses_degree, cp._ulysses_local_rank)


def attend_ulysses(
    controller: AttentionController,
    layer_name: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    parallel_config: Any,
    *,
    dense: Callable[[], torch.Tensor],
    layout: str,
    text_tokens: int | None,
    text_first: bool,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """`AttentionController.attend` for a processor under context parallelism (q, k, v sequence shards).

    Dense calls (dense steps and layers, unsupported configs) take the stock path `dense()`, which
    does its own exchange; sparse ones exchange here and call `controller.attend` on the full sequence.
    """
    q, k, v = (query, key, value) if layout == "BNHD" else (x.transpose(1, 2) for x in (query, key, value))
    batch, n_local, heads, _ = q.shape
    ulysses = _ulysses_or_cause(parallel_config, heads, attention_mask)
    cause = f"cp-{ulysses}" if isinstance(ulysses, str) else None
    if controller.runs_dense(layer_name, cause, "stock diffusers context-parallel path"):
        cp = parallel_config.context_parallel_config
        n_full = n_local * cp.ring_degree * cp.ulysses_degree
        controller._record(layer_name, None, batch, heads, n_full, None)
        return dense()

    # The text length the processor gives is its shard's; the hook's (text_tokens None) is the whole one.
    text_local = text_tokens if text_tokens is not None else controller._text_tokens(None) // ulysses.degree
    qh, kh, vh = (ulysses.to_heads(x, text_local, text_first) for x in (q, k, v))
    out = controller.attend(
        layer_name, qh, kh, vh, layout="BNHD", text_tokens=text_local * ulysses.degree, text_first=text_first,
        head_shard=ulysses.head_shard(heads),
        # Fallbacks found on the full sequence (e.g. too short) attend densely over it, as the stock op would.
        dense=lambda: torch.nn.functional.scaled_dot_product_attention(
            qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)).transpose(1, 2),
    )
    out = ulysses.to_sequence(out, text_local, text_first)
    return out if layout == "BNHD" else out.transpose(1, 2)


def unsharded_arguments(module: torch.nn.Module, arguments: dict[str, Any], hook_name: str) -> dict[str, Any]:
    """`module`'s forward arguments as its caller passed them, for the hook named `hook_name`.

    `enable_parallelism` after `apply()` registers diffusers' context-parallel split hooks outside
    ours: on the root of FLUX they shard hidden_states, encoder_hidden_states and the ids before our
    hook reads the grid and the text length. Gather back what those hooks split.
    """
    # A registry wraps each hook it registers around the earlier ones: the later, the earlier it runs.
    hooks = HookRegistry.check_if_exists_or_initialize(module).hooks
    names = list(hooks)
    outer = [hooks[name] for name in names[names.index(hook_name) + 1:]
             if isinstance(hooks[name], ContextParallelSplitHook)]
    if not outer:
        return arguments
    arguments = dict(arguments)
    for hook in outer:
        cp = hook.parallel_config
        unshard = (PartitionAnythingSharder.unshard_anything if cp.ulysses_anything or cp.ring_anything
                   else EquipartitionSharder.unshard)
        for name, plan in hook.metadata.items():
            x = arguments.get(name)
            # The split hook's own condition for splitting (ContextParallelSplitHook._prepare_cp_input).
            if isinstance(plan, ContextParallelInput) and not plan.split_output and isinstance(x, torch.Tensor) \
                    and (plan.expected_dims is None or x.dim() == plan.expected_dims):
                gathered = unshard(x, plan.split_dim, cp._flattened_mesh)
                # A functional collective's result must be waited on even when only its shape is read.
                arguments[name] = gathered.wait() if isinstance(gathered, funcol.AsyncCollectiveTensor) else gathered
    return arguments


def enable_context_parallel(pipe_or_transformer: Any, ulysses_degree: int) -> None:
    """Ulysses context parallelism of degree `ulysses_degree` on every transformer of a pipeline (or on one).

    `enable_parallelism(config=ContextParallelConfig(ulysses_degree=...))` once per transformer, after
    checking it can work; before or after `sparsediff.apply()`. torch.distributed must be initialised
    with one process per rank (gloo on CPU works). Raises ValueError for a family without a diffusers
    context-parallel plan (HunyuanVideo, CogVideoX) or a head count `ulysses_degree` does not divide.
    """
    from diffusers import ContextParallelConfig

    from sparsediff.processors.families import family_of, transformers_of

    models = transformers_of(pipe_or_transformer)
    for transformer in models.values():
        if family_of(transformer).name not in CONTEXT_PARALLEL_FAMILIES:
            raise ValueError(f"pipe_or_transformer: {type(transformer).__name__} has no context-parallel plan in "
                             f"diffusers; supported families: {', '.join(CONTEXT_PARALLEL_FAMILIES)}")
        heads = transformer.config.num_attention_heads
        if not isinstance(ulysses_degree, int) or ulysses_degree < 2 or heads % ulysses_degree:
            raise ValueError(f"ulysses_degree must be an int >= 2 dividing the {heads} attention heads of "
                             f"{type(transformer).__name__}, got {ulysses_degree!r}")
    # diffusers' split hooks log through `logger.warning_once`, which only importing transformers defines.
    import transformers  # noqa: F401

    with _one_device_without_accelerator():
        for transformer in models.values():
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses_degree))


@contextlib.contextmanager
def _one_device_without_accelerator():
    """Without an accelerator `enable_parallelism` computes `rank % device_count()` = `rank % 0`:
    count the CPU as one device while it runs."""
    if torch.accelerator.device_count() > 0:
        yield
        return
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real
