"""sparsediff's custom ops: the attention call and the transformer-level step hook, opaque to torch.compile.

Why ops: the controller makes Python decisions that read the denoising step (dense warm-up steps,
profile-dense layers, fallbacks), reorders tokens, predicts the mask, launches the Triton kernels
and records stats. Traced by Dynamo, each of those would be a graph break, or a guard on the step
(a recompile at every step). A registered custom op is one opaque node of the graph whose Python
body runs at every call, so a compiled transformer has no graph breaks and no recompiles from
step to step. Eager runs call the same ops: there is one path.

Which processor (or hook) a call belongs to is passed as a key tensor, not as a constant:
`compile_repeated_blocks` compiles one graph for all blocks of a kind, and a per-layer constant
(a name, an int) would be guarded on and recompile that graph for every block. A tensor input is
guarded only on its shape, dtype and device. The key is a 0-d int64 CPU tensor (reading it never
syncs a device).

The ops are tagged `cudagraph_unsafe`: a CUDA graph replay would skip their Python bodies (the
step, the mask prediction, the stats), so Inductor keeps them out of CUDA graphs.

The op outputs are new tensors (a custom op may not return a view of an input): `attend` returns
a contiguous tensor of the query's shape; `begin_forward` returns copies of the timestep and of the
latent hidden states, `end_forward` a copy of the transformer's output sample, which the rest of
the forward then uses, so that a compiler keeps them and keeps them in order (before everything
the forward computes / after all of it); `order_tokens` returns its input reordered (or a copy),
`join_text` the processor's joint sequence and `joint_rotary` rotary tables for it.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

_TAGS = (torch.Tag.cudagraph_unsafe,)
_owners: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_next_key = itertools.count()


def register_owner(owner: Any) -> torch.Tensor:
    """A key tensor under which the ops find `owner` (a processor or a step hook); held weakly."""
    key = next(_next_key)
    _owners[key] = owner
    return torch.tensor(key, dtype=torch.int64)


def _owner(key: torch.Tensor) -> Any:
    return _owners[int(key)]


@torch.library.custom_op("sparsediff::attend", mutates_args=(), tags=_TAGS)
def attend(
    processor_key: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layout: str,
    text_tokens: int | None,
    text_first: bool,
    parallel: bool,
) -> torch.Tensor:
    """`AttentionController.attend` of the processor's layer; the dense computation is the processor's
    stock call (`dense_attention`). See `SparseAttnProcessorBase.attend` for the arguments."""
    processor = _owner(processor_key)
    out = processor.controller.attend(
        processor.layer_name, query, key, value,
        dense=lambda: processor.dense_attention(query, key, value, attention_mask, parallel),
        layout=layout, text_tokens=text_tokens, text_first=text_first, attention_mask=attention_mask,
        parallel_config=processor._parallel_config if parallel else None,
    )
    return out.contiguous()


@attend.register_fake
def _attend_fake(processor_key, query, key, value, attention_mask, layout, text_tokens, text_first, parallel):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


@torch.library.custom_op("sparsediff::begin_forward", mutates_args=(), tags=_TAGS)
def begin_forward(
    hook_key: torch.Tensor, timestep: torch.Tensor, hidden_states: torch.Tensor, arguments: list[torch.Tensor | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step hook's work before a transformer forward; `arguments`: the forward's arguments in its
    signature's order, None where not given or not a tensor. Returns copies of `timestep` (a
    per-token one reordered with the tokens) and of the latent `hidden_states`, for the forward to
    use in their place: all it computes then follows this op, the token-order sites included."""
    hook = _owner(hook_key)
    hook.begin_forward(arguments)
    return hook.controller.order_timestep(timestep), hidden_states.clone()


@begin_forward.register_fake
def _begin_forward_fake(hook_key, timestep, hidden_states, arguments):
    return torch.empty_like(timestep), torch.empty_like(hidden_states)


@torch.library.custom_op("sparsediff::order_tokens", mutates_args=(), tags=_TAGS)
def order_tokens(
    hook_key: torch.Tensor, after: torch.Tensor | None, x: torch.Tensor, token_dim: int, restore: bool, text_first: bool
) -> torch.Tensor:
    """A copy of `x` with its video tokens (dim `token_dim`, after the forward's text tokens with
    `text_first`) in the attention order, or back in raster order (`restore`), where the current
    forward holds its tokens in the attention order (`AttentionController.order_tokens`); else a
    plain copy. For the token-order hooks (api.py). `after`: the site's input, unused but for the
    order (as `joint_rotary`'s)."""
    return _owner(hook_key).controller.order_tokens(x, token_dim, restore, text_first)


@order_tokens.register_fake
def _order_tokens_fake(hook_key, after, x, token_dim, restore, text_first):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sparsediff::join_text", mutates_args=(), tags=_TAGS)
def join_text(processor_key: torch.Tensor, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """The processor's joint sequence of `text` and `video` (B, T, C) and (B, N, C):
    `AttentionController.join_text`."""
    return _owner(processor_key).controller.join_text(text, video)


@join_text.register_fake
def _join_text_fake(processor_key, text, video):
    return video.new_empty(video.shape[0], text.shape[1] + video.shape[1], *video.shape[2:])


@torch.library.custom_op("sparsediff::joint_rotary", mutates_args=(), tags=_TAGS)
def joint_rotary(
    hook_key: torch.Tensor, after: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, text_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The video tokens' rotary tables (N, D) as tables of the forward's joint sequence:
    `AttentionController.joint_rotary`. For the step hook (api.py). `after`: an output of this forward's
    `begin_forward`, unused but for the order: the tables follow the decision it makes, and nothing
    else in a compiled graph would keep this op behind it."""
    return _owner(hook_key).controller.joint_rotary(cos, sin, text_tokens)


@joint_rotary.register_fake
def _joint_rotary_fake(hook_key, after, cos, sin, text_tokens):
    return (cos.new_empty(text_tokens + cos.shape[0], cos.shape[1]), sin.new_empty(text_tokens + sin.shape[0], sin.shape[1]))


@torch.library.custom_op("sparsediff::end_forward", mutates_args=(), tags=_TAGS)
def end_forward(hook_key: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The step hook's work after a transformer forward. Returns a copy of `sample` (the forward's output)."""
    _owner(hook_key).end_forward()
    return sample.clone()


@end_forward.register_fake
def _end_forward_fake(hook_key, sample):
    return torch.empty_like(sample)
