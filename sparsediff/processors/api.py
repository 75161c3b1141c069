"""`apply()` / `remove()`: swap a pipeline's attention processors for sparse ones and back."""
from __future__ import annotations

import dataclasses
import inspect
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

from sparsediff.processors.base import FamilySpec, TokenOrderSite
from sparsediff.processors.context_parallel import unsharded_arguments
from sparsediff.processors.controller import AttentionController, SparsityStats
from sparsediff.processors.families import family_of, transformers_of
from sparsediff.processors.ops import register_owner
from sparsediff.profile import (
    DEFAULT_CDF_THRESHOLD,
    DEFAULT_DENSE_STEPS,
    DEFAULT_SIM_THRESHOLD,
    DEFAULT_TOKEN_ORDER,
    SparsityProfile,
    few_names,
)

HOOK_NAME = "sparsediff"
TOKEN_ORDER_HOOK_NAME = "sparsediff.token_order"


class _StepHook(ModelHook):
    """Transformer-level hook: hands each forward's timestep and latent grid to the controller.

    It also keeps the transformer's stock processors so that `remove()` can restore them.
    `controller` None makes it inert.

    Its work runs inside the `sparsediff::begin_forward` / `end_forward` ops (ops.py): compiling the
    whole transformer (`torch.compile(transformer, fullgraph=True)`) traces this hook as part of
    the forward, and reading the timestep as a Python float there would be a graph break. The
    forward continues with the ops' copies of the timestep, of its latent hidden states and of its
    output sample, which keeps the ops in a compiled graph, before everything else the forward
    computes and after all of it.
    """

    def __init__(self, family: FamilySpec, controller: AttentionController, stock_processors: dict[str, Any]) -> None:
        super().__init__()
        self.family = family
        self.controller: AttentionController | None = controller
        self.stock_processors = stock_processors
        self.orders_tokens = False  # the family's token-order hooks are installed (`_install`)
        self.order_sites: list[tuple[TokenOrderSite, torch.nn.Module]] = []  # the modules `_install` hooked
        # A diffusers cache's hooks are on the transformer (`_has_cache_hooks`); None: not looked for yet.
        self.cache_hooks: bool | None = None
        self._transformer: weakref.ref[torch.nn.Module] | None = None
        self._parameter_names: list[str] = []  # of the transformer's forward, without `self`
        self._op_key = register_owner(self)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._transformer = weakref.ref(module)
        self._parameter_names = list(inspect.signature(type(module).forward).parameters)[1:]
        return module

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if self.controller is None:
            return args, kwargs
        arguments = dict(zip(self._parameter_names, args))
        arguments.update(kwargs)
        values = [arguments.get(name) for name in self._parameter_names]
        tensors = [value if isinstance(value, torch.Tensor) else None for value in values]
        timestep, hidden_states = torch.ops.sparsediff.begin_forward(
            self._op_key, arguments["timestep"], arguments["hidden_states"], tensors)
        replaced = [("timestep", timestep), ("hidden_states", hidden_states)]
        rotary = self.family.joint_rotary_argument
        if rotary is not None and arguments.get(rotary) is not None:
            cos, sin = arguments[rotary]
            text_tokens = arguments["encoder_hidden_states"].shape[1]
            replaced.append((rotary, torch.ops.sparsediff.joint_rotary(self._op_key, timestep, cos, sin, text_tokens)))
        for name, value in replaced:
            if name in kwargs:
                kwargs[name] = value
            else:
                index = self._parameter_names.index(name)
                args = (*args[:index], value, *args[index + 1:])
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        if self.controller is None:
            return output
        sample = torch.ops.sparsediff.end_forward(self._op_key, output[0])
        if isinstance(output, tuple):
            return (sample, *output[1:])
        return dataclasses.replace(output, sample=sample)  # Transformer2DModelOutput

    def begin_forward(self, arguments: list[torch.Tensor | None]) -> None:
        """Body of the begin_forward op: `arguments` as `pre_forward` passes them (tensors or None)."""
        tensors = {name: value for name, value in zip(self._parameter_names, arguments) if value is not None}
        transformer = self._transformer()
        # Under context parallelism: the grid and text length of the full sequence, not of a shard.
        tensors = unsharded_arguments(transformer, tensors, HOOK_NAME)
        # Under context (or tensor) parallelism diffusers' hooks split the tokens at the same sites.
        # A diffusers cache (`_has_cache_hooks`) carries tensors from step to step, and the token order
        # changes from the dense steps to the sparse ones: with one, each sparse call reorders.
        # A site module replaced since (peft wraps the modules a LoRA adapts, `unload_lora_weights` unwraps
        # them) would leave its hook inside the wrapper (the LoRA term added in the other order) or gone.
        info = self.family.read_forward(transformer, tensors)
        if self.cache_hooks is None or self.controller.starts_generation(info.timestep):
            # Looked for once a generation (and at each transformer's first forward: Wan 2.2's second one
            # starts mid-generation): the walk over the modules takes about a millisecond (Wan 1.3B).
            self.cache_hooks = _has_cache_hooks(transformer)
        orderable = (self.orders_tokens and _sites_in_place(transformer, self.order_sites)
                     and getattr(transformer, "_parallel_config", None) is None and not self.cache_hooks)
        self.controller.begin_forward(info, tensors["hidden_states"] if orderable else None)

    def end_forward(self) -> None:
        """Body of the end_forward op."""
        self.controller.end_forward()


# The diffusers.hooks modules of the caches (`enable_cache` applies them, and so do their public `apply_*`
# functions, which leave the transformer's `is_cache_enabled` False).
_CACHE_HOOK_MODULES = tuple(f"diffusers.hooks.{name}" for name in (
    "faster_cache", "first_block_cache", "mag_cache", "pyramid_attention_broadcast", "sea_cache", "taylorseer_cache",
    "text_kv_cache"))


def _has_cache_hooks(transformer: torch.nn.Module) -> bool:
    """Whether a diffusers cache's hooks are on `transformer` or its submodules, by `enable_cache` or by an
    `apply_*` function of diffusers.hooks (`apply_first_block_cache(transformer, config)`)."""
    if getattr(transformer, "is_cache_enabled", False):
        return True
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(type(hook).__module__ in _CACHE_HOOK_MODULES for hook in registry.hooks.values()):
            return True
    return False


class _TokenOrderHook(ModelHook):
    """On a `TokenOrderSite` module: its output tensors, their video tokens put in the attention
    order (or back in raster order) by the `sparsediff::order_tokens` op, which copies them where
    the forward keeps raster order. `controller` None makes it inert."""

    def __init__(self, site: TokenOrderSite, controller: AttentionController) -> None:
        super().__init__()
        self.site = site
        self.controller: AttentionController | None = controller
        self._op_key = register_owner(self)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.controller is None:
            return output
        # The op follows the site's first tensor input (the forward's latents at Wan's rotary
        # embedding, whose output depends on their shape alone): nothing else would keep a compiled
        # graph from ordering the tables before `begin_forward` decides the forward's order.
        after = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if isinstance(output, tuple):
            return tuple(self._order(x, after) if isinstance(x, torch.Tensor) else x for x in output)
        return self._order(output, after)

    def _order(self, x: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
        first = self.site.token_dim
        tokens = x.flatten(first, first + self.site.token_dims - 1)
        return torch.ops.sparsediff.order_tokens(self._op_key, after, tokens, first, self.site.restore,
                                                 self.site.text_first).view(x.shape)


class SparseHandle:
    """What `apply()` returns: the controller, its stats, and the means to reset or undo."""

    def __init__(self, controller: AttentionController, transformers: dict[str, torch.nn.Module]) -> None:
        self.controller = controller
        self.transformers = transformers

    @property
    def profile(self) -> SparsityProfile:
        return self.controller.profile

    @property
    def stats(self) -> SparsityStats:
        return self.controller.stats

    @property
    def step(self) -> int:
        """The current denoising step (0-based) as the controller counts it."""
        return self.controller.step

    def reset(self) -> None:
        """Start over: the next transformer call is step 0 of a new generation; stats are cleared."""
        self.controller.reset()

    def remove(self) -> None:
        """Restore the stock processors and remove the hooks, where this handle's controller is the one
        applied (a handle removed before a later `apply()` leaves that one in place)."""
        for transformer in self.transformers.values():
            _remove_one(transformer, self.controller)

    def reapply(self) -> None:
        """Make the attention sparse again after `remove()`, with this handle's controller: its
        profile, stats and captured CUDA graphs carry over, where a new `apply()` would capture every
        graph again (for switching between dense and sparse renders, as `render --compare-dense` and
        the demo do). ValueError if sparsediff is applied to one of the transformers now."""
        _install(self.controller, self.transformers)


def apply(
    pipe_or_transformer: Any,
    profile: SparsityProfile | None = None,
    *,
    cdf_threshold: float | None = None,
    sim_threshold: float | None = None,
    dense_steps: int | None = None,
    pv_threshold: float | None = None,
    token_order: str | None = None,
    tile: tuple[int, int, int] | None = None,
    method: str | None = None,
    fp8: bool = False,
    cuda_graphs: bool = True,
    controller_cls: type[AttentionController] = AttentionController,
) -> SparseHandle:
    """Make the attention of every supported transformer in a pipeline (or of one transformer) sparse.

    profile: per-layer/per-head thresholds (refused with ValueError if it does not fit the model);
    None: the same thresholds everywhere (the predictor's defaults cdf 0.95, sim 0.2; 2 dense steps;
    "tiles" order; method "sampled"; see sparsediff.profile and sparsediff.attention). Explicit keyword values override the profile's, on every head:
    cdf_threshold / sim_threshold / pv_threshold, dense_steps (leading denoising steps run dense),
    token_order ("tiles" | "raster"), tile ((t, h, w) tile shape; None: chosen from the latent grid),
    method (predictor method of predict_block_mask).
    fp8: sparse calls quantise q, k, v to e4m3 and run the kernel's FP8 path (CUDA: compute
    capability 8.9+; on an older GPU the sparse calls fall back to dense, saying so once).
    cuda_graphs: on CUDA, replay each call shape's sparse computation (prediction, lookup table,
    kernel) as one CUDA graph, captured at its second call: it frees the host from a dozen
    launches per call, for about 4x the size of one call's q of GPU memory per shape (False: launch
    them every call). Wan's sparse steps hold their tokens in tile order in the forward; their calls
    need no reordering, and long ones run without a graph (its static inputs would be one more copy).
    controller_cls: an AttentionController subclass (calibration).
    Returns a SparseHandle (stats, reset(), remove(), reapply()). ValueError, with the model left as it
    was, if sparsediff is applied already or a layer to make sparse holds a processor other than its
    family's stock one (`FamilySpec.stock_processors`).
    """
    transformers = transformers_of(pipe_or_transformer)
    if profile is None:
        profile = SparsityProfile.uniform(
            pipe_or_transformer,
            cdf_threshold=DEFAULT_CDF_THRESHOLD, sim_threshold=DEFAULT_SIM_THRESHOLD,
            dense_steps=DEFAULT_DENSE_STEPS, token_order=DEFAULT_TOKEN_ORDER,
        )
    elif not isinstance(profile, SparsityProfile):
        raise ValueError(f"profile must be a SparsityProfile or None, got {type(profile).__name__}")
    else:
        profile.check_fits(pipe_or_transformer)
    profile = profile.with_overrides(
        cdf_threshold=cdf_threshold, sim_threshold=sim_threshold, pv_threshold=pv_threshold,
        dense_steps=dense_steps, token_order=token_order, tile=tile, method=method,
    )
    if not (isinstance(controller_cls, type) and issubclass(controller_cls, AttentionController)):
        raise ValueError(f"controller_cls must be an AttentionController subclass, got {controller_cls!r}")
    controller = controller_cls(profile, fp8=fp8, cuda_graphs=cuda_graphs)
    _install(controller, transformers)
    return SparseHandle(controller, transformers)


def _check_not_applied(transformers: dict[str, torch.nn.Module]) -> None:
    for name, transformer in transformers.items():
        hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK_NAME)
        if hook is not None and hook.controller is not None:
            raise ValueError(f"pipe_or_transformer: sparsediff is already applied to {name}; call remove() first")


def _check_stock_processors(transformers: dict[str, torch.nn.Module]) -> None:
    """ValueError if a layer to make sparse holds a processor other than its family's stock one."""
    for component, transformer in transformers.items():
        family = family_of(transformer)
        foreign = [f"{component}.{key} ({type(proc).__name__})" for key, proc in transformer.attn_processors.items()
                   if family.is_sparse_layer(key) and type(proc) not in family.stock_processors]
        if foreign:
            stock = " or ".join(cls.__name__ for cls in family.stock_processors)
            raise ValueError(
                f"pipe_or_transformer: sparsediff replaces only the stock {stock}, and {len(foreign)} layer(s) hold "
                f"another processor: {few_names(foreign)}. Replacing them would drop what they add (an IP-Adapter's "
                "image conditioning, a custom processor's change); restore the stock processors first")


def _install(controller: AttentionController, transformers: dict[str, torch.nn.Module]) -> None:
    """Set `controller`'s sparse processors and step hook on every transformer."""
    _check_not_applied(transformers)
    _check_stock_processors(transformers)
    for component, transformer in transformers.items():
        family = family_of(transformer)
        stock = dict(transformer.attn_processors)
        processors = {
            key: family.processor_cls(f"{component}.{key}", controller) if family.is_sparse_layer(key) else proc
            for key, proc in stock.items()
        }
        _set_processors(transformer, processors)
        step_hook = _attach(transformer, HOOK_NAME, lambda: _StepHook(family, controller, stock), controller)
        step_hook.stock_processors = stock
        sites = _token_order_sites(transformer, family)
        for site, module in sites:
            _attach(module, TOKEN_ORDER_HOOK_NAME, lambda: _TokenOrderHook(site, controller), controller)
        step_hook.orders_tokens, step_hook.order_sites, step_hook.cache_hooks = bool(sites), sites, None


def _token_order_sites(transformer: torch.nn.Module,
                       family: FamilySpec) -> list[tuple[TokenOrderSite, torch.nn.Module]]:
    """The family's token-order sites with their modules; none if the transformer lacks one of them
    (a subclass built differently): its sparse calls then reorder their own tokens."""
    names = {name for name, _ in transformer.named_modules()}
    if not all(site.module in names for site in family.token_order_sites):
        return []
    return [(site, transformer.get_submodule(site.module)) for site in family.token_order_sites]


def _sites_in_place(transformer: torch.nn.Module, sites: list[tuple[TokenOrderSite, torch.nn.Module]]) -> bool:
    """Whether each hooked token-order site module is still the one at its path in `transformer`."""
    try:
        return all(transformer.get_submodule(site.module) is module for site, module in sites)
    except AttributeError:
        return False


def _attach(module: torch.nn.Module, name: str, make_hook: Callable[[], ModelHook],
            controller: AttentionController) -> ModelHook:
    """Register the hook `make_hook()` on `module` as `name`, or revive the inert one an earlier
    remove() left in a foreign forward chain (`_detach`) with `controller`."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(name)
    if hook is not None:
        hook.controller = controller
        return hook
    hook = make_hook()
    with _beneath_accelerate(module):
        registry.register_hook(hook, name)
    return hook


def remove(pipe_or_transformer: Any) -> None:
    """Restore the exact stock processor objects and remove sparsediff's hook (no-op where not applied)."""
    for transformer in transformers_of(pipe_or_transformer).values():
        _remove_one(transformer)


def _remove_one(transformer: torch.nn.Module, controller: AttentionController | None = None) -> None:
    """Undo `_install` on `transformer`; with `controller`, only if that is the controller applied."""
    hook = HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK_NAME)
    if hook is None or hook.controller is None or (controller is not None and hook.controller is not controller):
        return
    _set_processors(transformer, hook.stock_processors)
    _detach(transformer, HOOK_NAME)
    for _, module in hook.order_sites:  # where `_install` hooked them, wrapped or replaced since or not
        _detach(module, TOKEN_ORDER_HOOK_NAME)


def _detach(module: torch.nn.Module, name: str) -> None:
    """Make `module`'s hook `name` inert and remove it."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    hook = registry.get_hook(name)
    if hook is None:
        return
    hook.controller = None
    with _beneath_accelerate(module):
        # HookRegistry.remove_hook re-sets `forward` to what it was when we registered. If something
        # other than diffusers hooks wrapped it since, that would drop their wrapper: leave our hook,
        # now inert, in the chain then (apply() revives it).
        if _is_registry_forward(module.forward):
            registry.remove_hook(name, recurse=False)


def _set_processors(transformer: torch.nn.Module, processors: dict[str, Any]) -> None:
    """`set_attn_processor`, the new processors taking over the attention backend and context-parallel
    config that `set_attention_backend` / `enable_parallelism` gave the old ones: either may come before
    or after `apply()` (and `remove()`)."""
    for key, old in transformer.attn_processors.items():
        new = processors[key]
        for attribute in ("_attention_backend", "_parallel_config"):
            if new is not old and hasattr(old, attribute) and hasattr(new, attribute):
                setattr(new, attribute, getattr(old, attribute))
    transformer.set_attn_processor(processors)


@contextmanager
def _beneath_accelerate(module: torch.nn.Module) -> Iterator[None]:
    """Operate on the forward that accelerate's hook (enable_model_cpu_offload) wraps, if any.

    accelerate restores `module.forward = module._old_forward` whenever it removes its hook (at the
    end of every offloaded pipeline call) and re-wraps it: our hook must live inside `_old_forward`,
    whichever of the two was installed first, to survive that.
    """
    if not (hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")):
        yield
        return
    outer = module.forward
    module.forward = module._old_forward
    try:
        yield
    finally:
        module._old_forward = module.forward
        module.forward = outer


def _is_registry_forward(forward: Any) -> bool:
    """Whether `forward` is the wrapper a diffusers HookRegistry installed."""
    return getattr(getattr(forward, "func", None), "__qualname__", "").startswith("HookRegistry.register_hook")
