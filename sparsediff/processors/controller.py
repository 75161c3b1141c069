"""The attention controller: one per `apply()`, shared by every processor of the pipeline.

Processors compute q, k, v as the stock ones do and hand them, through the `sparsediff::attend`
custom op (ops.py), to `AttentionController.attend`, which decides dense or sparse for this call,
reorders the tokens (layout.py), runs `run_sparse` (what calibration overrides, with `can_run_sparse`), records
the sparsity reached and returns the output in the caller's token order and tensor layout.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsediff._runtime import kernels_available, on_tensor_device, warn_once
from sparsediff.attention import HeadThresholds, head_thresholds
from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N, FP8_MIN_CAPABILITY, MAX_HEAD_DIM, fp8_unsupported
from sparsediff.kernels.block_sparse_attn_reference import valid_key_blocks
from sparsediff.kernels.gather_tokens import gather_tokens
from sparsediff.layout import inverse_permutation, token_permutation
from sparsediff.processors.base import ForwardInfo
from sparsediff.processors.call_graph import SparseCallGraph
from sparsediff.processors.context_parallel import CONTEXT_PARALLEL_CAUSES, HeadShard, attend_ulysses
from sparsediff.profile import SparsityProfile


@dataclass
class AttentionCall:
    """Everything `run_sparse` needs besides q, k, v (which arrive already in the attention order).

    text_tokens: the text segment, LAST in the attention order; pass as `dense_tail_tokens`.
    kv_lens: int (B,) valid keys per batch element (HunyuanVideo's padded text), or None.
    grid / token_order / tile: the video layout actually used (grid None: raster, shape unknown).
    thresholds: the layer's validated cdf/sim thresholds on q's device, for the call's H heads (under
    context parallelism a rank's share of the layer's heads). pv_threshold: one float for the
    call (the kernel's granularity: the smallest of the profile's per-head values) or None.
    fp8: run the kernel's FP8 path (`apply(..., fp8=True)`).
    """

    layer_name: str
    layer_index: int
    step: int
    heads: int
    text_tokens: int
    kv_lens: torch.Tensor | None
    grid: tuple[int, int, int] | None
    token_order: str
    tile: tuple[int, int, int] | None
    thresholds: HeadThresholds
    pv_threshold: float | None
    method: str | None
    fp8: bool = False


class SparsityStats:
    """Blocks skipped per layer, step and head, accumulated over calls (and over generations until reset).

    Sparsity = skipped / total (b, h, query block, key block) pairs. Dense calls of a sparse-capable
    layer (dense steps, profile-dense layers, fallbacks) count as computing every pair.
    `fallbacks` counts, by cause (`FALLBACK_CAUSES`), the calls that were to run sparse and ran dense:
    a render whose sparsity is 0 says why.
    """

    def __init__(self, layer_names: list[str], heads: list[int], dense_steps: int) -> None:
        self.layer_names = list(layer_names)
        self.heads = list(heads)
        self.dense_steps = dense_steps
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self._kept: dict[tuple[int, int], torch.Tensor] = {}  # (layer, step) -> kept pairs per head
        self._total: dict[tuple[int, int], int] = {}  # (layer, step) -> pairs per head
        self.fallbacks: Counter[str] = Counter()

    def record(self, layer_name: str, step: int, kept_per_head: torch.Tensor, pairs_per_head: int) -> None:
        """Add one call: `kept_per_head` (H,) computed pairs (stays on its device, no sync)."""
        key = (self._index[layer_name], step)
        kept = kept_per_head.detach().to(torch.float64)
        if key in self._kept:
            self._kept[key] = self._kept[key] + kept.to(self._kept[key].device)
            self._total[key] += pairs_per_head
        else:
            self._kept[key], self._total[key] = kept, pairs_per_head

    def record_fallback(self, cause: str) -> None:
        """Count one call that was to run sparse and ran dense for `cause` (a FALLBACK_CAUSES key)."""
        self.fallbacks[cause] += 1

    def fallback_summary(self) -> list[dict[str, Any]]:
        """JSON-ready: one {"cause", "reason", "calls"} per cause seen, most calls first."""
        return [{"cause": c, "reason": FALLBACK_CAUSES[c], "calls": n} for c, n in self.fallbacks.most_common()]

    def reset(self) -> None:
        self._kept.clear()
        self._total.clear()
        self.fallbacks.clear()

    @property
    def steps(self) -> list[int]:
        """Steps with at least one recorded call, ascending."""
        return sorted({s for _, s in self._kept})

    def _sums(self, after_dense_steps: bool) -> dict[tuple[int, int], tuple[torch.Tensor, int]]:
        first = self.dense_steps if after_dense_steps else 0
        return {k: (self._kept[k].cpu(), self._total[k]) for k in self._kept if k[1] >= first}

    def per_layer_step(self) -> torch.Tensor:
        """(layers, len(steps)) float64 sparsity of each layer at each step; NaN where not called."""
        steps = self.steps
        col = {s: j for j, s in enumerate(steps)}
        out = torch.full((len(self.layer_names), len(steps)), math.nan, dtype=torch.float64)
        for (i, s), (kept, total) in self._sums(False).items():
            out[i, col[s]] = 1.0 - kept.sum().item() / (total * kept.numel())
        return out

    def per_layer_head(self, after_dense_steps: bool = True) -> torch.Tensor:
        """(layers, max heads) float64 sparsity per head over all recorded steps (after the dense
        steps by default); NaN where a layer was not called or has fewer heads."""
        kept_sum = torch.zeros(len(self.layer_names), max(self.heads), dtype=torch.float64)
        totals = torch.zeros(len(self.layer_names), dtype=torch.float64)
        for (i, _), (kept, total) in self._sums(after_dense_steps).items():
            kept_sum[i, : kept.numel()] += kept
            totals[i] += total
        out = 1.0 - kept_sum / totals[:, None]
        for i, h in enumerate(self.heads):
            out[i, h:] = math.nan
        return out

    def per_step(self) -> torch.Tensor:
        """(len(steps),) float64 sparsity of each step over all layers and heads."""
        steps = self.steps
        kept = torch.zeros(len(steps), dtype=torch.float64)
        total = torch.zeros(len(steps), dtype=torch.float64)
        col = {s: j for j, s in enumerate(steps)}
        for (_, s), (k, t) in self._sums(False).items():
            kept[col[s]] += k.sum()
            total[col[s]] += t * k.numel()
        return 1.0 - kept / total

    def mean_sparsity(self, after_dense_steps: bool = True) -> float:
        """Fraction of all block pairs skipped (after the dense steps by default); NaN if nothing recorded."""
        sums = self._sums(after_dense_steps)
        total = sum(t * k.numel() for k, t in sums.values())
        if total == 0:
            return math.nan
        return 1.0 - sum(k.sum().item() for k, _ in sums.values()) / total

    def as_dict(self) -> dict:
        """JSON-ready summary: layer names, steps, per-layer-step and per-layer-head tables (None for NaN)."""
        def rows(t: torch.Tensor) -> list[list[float | None]]:
            return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

        mean = self.mean_sparsity()  # NaN where no call after the dense steps was recorded
        return {
            "layers": self.layer_names,
            "steps": self.steps,
            "dense_steps": self.dense_steps,
            "mean_sparsity": None if math.isnan(mean) else mean,
            "per_layer_step": rows(self.per_layer_step()),
            "per_layer_head": rows(self.per_layer_head()),
            "dense_fallbacks": self.fallback_summary(),
        }


# Calls of at least this many tokens whose forward holds them in the attention order run without a
# CUDA graph. Wan 1.3B at 480p (32,760 tokens, GPU-bound) gained from dropping the graph's input copy
# (H200, 2026-12-03: compiled setting A 1.77x -> 1.80x, with its per-call gathers gone); short
# sequences (FLUX's 5,120, the toy model's) are launch-bound, where graphs gained most (README).
ORDERED_GRAPH_MAX_TOKENS = 16384


class AttentionController:
    """Decides, per attention call, dense or sparse; owns the step count, layout and stats.

    Step: the transformer-level hook calls `begin_forward` with each forward's timestep; a smaller
    timestep than the last one starts the next step, an equal one is the same step (classifier-free
    guidance as a second call), a larger one starts a new generation (step 0). `reset()` forgets
    the step state and the stats.

    Override `run_sparse` to change what a sparse call computes (calibration does).
    fp8: sparse calls run the attention kernel's FP8 path (dense calls stay stock).
    cuda_graphs: on CUDA, each call signature's sparse computation is captured once as a CUDA graph
    and replayed (call_graph.py): one launch instead of a dozen, for about 4x the size of q of GPU
    memory per signature. Long calls whose tokens the forward already holds in the attention order
    (`begin_forward`) run without one (ORDERED_GRAPH_MAX_TOKENS).
    """

    def __init__(self, profile: SparsityProfile, *, min_query_blocks: int = 4, fp8: bool = False,
                 cuda_graphs: bool = True) -> None:
        if not isinstance(profile, SparsityProfile):
            raise ValueError(f"profile must be a SparsityProfile, got {type(profile).__name__}")
        if not isinstance(min_query_blocks, int) or min_query_blocks < 1:
            raise ValueError(f"min_query_blocks must be a positive int, got {min_query_blocks!r}")
        if not isinstance(fp8, bool):
            raise ValueError(f"fp8 must be a bool, got {fp8!r}")
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
        self.profile = profile
        self.fp8 = fp8
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple, SparseCallGraph] = {}
        self._graph_epoch = 0  # generations seen (and resets): graphs unused for a whole one are freed
        self.min_query_blocks = min_query_blocks
        self.layer_names = list(profile.layers)
        self._layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.stats = SparsityStats(self.layer_names, [profile.layers[n].heads for n in self.layer_names],
                                   profile.dense_steps)
        self.step = 0
        self.generation = 0
        self.forward_info: ForwardInfo | None = None
        self._last_timestep: float | None = None
        self._thresholds: dict[tuple[str, torch.device], tuple] = {}
        self._perms: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._padding: _KeyPadding | None = None  # the last attention mask seen and what it means
        self._forward_ordered = False  # the current forward holds its video tokens in the attention order

    # ------------------------------------------------------------------ step schedule

    def starts_generation(self, timestep: float) -> bool:
        """Whether a forward at `timestep` would be step 0 of a new generation (`begin_forward`)."""
        return self._last_timestep is None or timestep > self._last_timestep

    def begin_forward(self, info: ForwardInfo, orderable_latents: torch.Tensor | None = None) -> None:
        """Called by the hook before each transformer forward: advances the step, stores the grid.

        orderable_latents: the forward's latent hidden states, where the transformer has token-order
        hooks (`FamilySpec.token_order_sites`), no context parallelism and no diffusers cache (see
        `_StepHook.begin_forward`). Then a forward of a sparse step whose grid is known holds its
        video tokens in the attention order between the sites (`order_tokens`): its sparse calls
        gather nothing, where each would otherwise reorder q, k, v and its output (for Wan 1.3B at
        480p, 6 of a compiled sparse step's 237 ms on the H200). Forwards whose calls all run dense
        (dense steps, every layer profile-dense, a device, dtype or length the kernels do not take)
        keep raster order: their results stay the stock ones bit for bit.
        """
        t = info.timestep
        if self._last_timestep is not None:
            if self.starts_generation(t):
                self.step = 0
                self.generation += 1
                self._next_graph_epoch()
            elif t < self._last_timestep:
                self.step += 1
        self._last_timestep = t
        self.forward_info = info
        x = orderable_latents
        self._forward_ordered = (
            x is not None and info.grid is not None and not self.is_dense_step()
            and self.profile.token_order != "raster" and not all(layer.dense for layer in self.profile.layers.values())
            and self._kernel_cause(x.device, x.dtype) is None and not self._too_short(math.prod(info.grid)))

    def end_forward(self) -> None:
        """Called by the hook after each transformer forward: the grid is only valid inside it."""
        self.forward_info = None
        self._padding = None
        self._forward_ordered = False

    def order_tokens(self, x: torch.Tensor, token_dim: int, restore: bool, text_first: bool = False) -> torch.Tensor:
        """A contiguous copy of `x`, whose dim `token_dim` holds the forward's video tokens (after its
        text tokens, which stay first, with `text_first`): put in the attention order, or back in
        raster order (`restore`), where the forward holds its tokens in the attention order
        (`begin_forward`); else unchanged."""
        if not self._forward_ordered:
            return x.clone(memory_format=torch.contiguous_format)
        grid = self.forward_info.grid
        n_text = self.forward_info.text_tokens or 0 if text_first else 0
        if x.shape[token_dim] != n_text + math.prod(grid):
            raise RuntimeError(f"sparsediff: a token-order site holds {x.shape[token_dim]} tokens along dim "
                               f"{token_dim}, the forward's {n_text} text tokens and latent grid {grid} "
                               f"{n_text + math.prod(grid)}")
        perm, inverse = self._site_permutation(grid, n_text, x.device)
        return x.index_select(token_dim, inverse if restore else perm)

    def join_text(self, text: torch.Tensor, video: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The joint sequence (along `dim`) of a text-first family's processor: [text ; video] as the
        stock processor joins it, or [video ; text] where the forward holds its video tokens in the
        attention order, so that its sparse calls move no token (`attend` puts the output back text first)."""
        return torch.cat([video, text] if self._forward_ordered else [text, video], dim=dim)

    def joint_rotary(self, cos: torch.Tensor, sin: torch.Tensor, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables (N, D) of the video tokens in raster order, as tables of the joint sequence
        that `join_text` makes in this forward (the text's rows the identity: cos 1, sin 0)."""
        cos, sin = (self.join_text(table.new_full((text_tokens, table.shape[1]), text_value),
                                   self.order_tokens(table, 0, False), dim=0)
                    for table, text_value in ((cos, 1.0), (sin, 0.0)))
        return cos, sin

    def order_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """A copy of the forward's timestep; one per token (B, N) (Wan 2.2 TI2V) in the forward's token order."""
        if timestep.dim() == 2:
            return self.order_tokens(timestep, 1, False)
        return timestep.clone()

    def reset(self) -> None:
        """Forget the step state (the next forward is step 0 of a new run) and the stats."""
        self.step = 0
        self.generation = 0
        self._last_timestep = None
        self.forward_info = None
        self._padding = None
        self._forward_ordered = False
        self.stats.reset()
        self._next_graph_epoch()

    def is_dense_step(self) -> bool:
        return self.step < self.profile.dense_steps

    # ------------------------------------------------------------------ the attention call

    @on_tensor_device
    def attend(
        self,
        layer_name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        dense: Callable[[], torch.Tensor],
        layout: str = "BNHD",
        text_tokens: int | None = 0,
        text_first: bool = False,
        attention_mask: torch.Tensor | None = None,
        parallel_config: Any = None,
        head_shard: HeadShard | None = None,
    ) -> torch.Tensor:
        """Attention of one layer call; returns what `dense()` (the stock computation) would return.

        Processors reach it through the `sparsediff::attend` op (`SparseAttnProcessorBase.attend`),
        which torch.compile does not trace: it may read the step and any Python state.

        query/key/value: (B, N, H, D) for layout "BNHD" (dispatch_attention_fn's layout) or
        (B, H, N, D) for "BHND" (SDPA's); the output has the same layout.
        text_tokens: length of the text segment inside the sequence, first (`text_first`) or last;
        None means "the length the hook learned" (FLUX single-stream blocks).
        attention_mask: the stock call's mask; only a bool key-padding mask that pads on the right
        can run sparse (as kv_lens); anything else runs dense.
        parallel_config: the processor's diffusers ParallelConfig under context parallelism (q, k, v are
        sequence shards): handled by `context_parallel.attend_ulysses`.
        head_shard: set by `attend_ulysses` when q, k, v are the full sequence of a subset of the heads.
        """
        layer = self.profile.layers.get(layer_name)
        if layer is None:  # a layer we do not sparsify (e.g. a cross-attention the processor was set on)
            return dense()
        if self.forward_info is None and self.is_dense_step():
            # Processors set by hand (`set_attn_processor`) have no step hook: the step stays 0.
            warn_once("unhooked", "sparsediff: attention called outside a transformer forward hooked by "
                                  "sparsediff.apply(): the denoising step stays 0, so every call runs dense (the "
                                  f"profile's dense_steps={self.profile.dense_steps}); install the processors "
                                  "with sparsediff.apply()")
        if layout not in ("BNHD", "BHND"):
            raise ValueError(f"layout must be 'BNHD' or 'BHND', got {layout!r}")
        if parallel_config is not None:
            return attend_ulysses(self, layer_name, query, key, value, parallel_config, dense=dense, layout=layout,
                                  text_tokens=text_tokens, text_first=text_first, attention_mask=attention_mask)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value)) if layout == "BNHD" else (query, key, value)
        batch, heads, n_tokens, head_dim = q.shape
        cause = self._fallback_cause(q, k, layer.heads if head_shard is None else head_shard.stop - head_shard.start)
        padding = None
        if cause is None and attention_mask is not None:
            padding = self._key_padding(attention_mask, batch, n_tokens)
            cause = padding.cause
        # In a forward that holds its video tokens in the attention order, a text-first processor joins
        # its text last (`join_text`): the call moves no token, and its output goes back text first.
        text_last = self._forward_ordered and text_first
        text_back = self._text_first_again(n_tokens, text_tokens, q.device) if text_last else None
        if self.runs_dense(layer_name, cause, "stock SDPA"):
            self._record(layer_name, None, batch, heads, n_tokens, padding, head_shard)
            if text_back is None:
                return dense()
            out, = gather_tokens((dense().transpose(1, 2) if layout == "BNHD" else dense(),), text_back)
            return out.transpose(1, 2) if layout == "BNHD" else out
        kv_lens = None if padding is None else padding.kv_lens

        n_text = self._text_tokens(text_tokens)
        grid, order = self._video_layout(n_tokens - n_text)
        # Video tokens the forward already holds in the attention order leave at most the text to move.
        ordered = self._forward_ordered and grid is not None
        video, video_order = (n_tokens - n_text, "raster") if ordered or grid is None else (grid, order)
        perms = self._permutation(video, video_order, n_text, text_first and not text_last, q.device)
        # Indices into the attention order (None: q, k, v arrive in it) and back (None: the output stays in it).
        to_attention = None if perms is None else perms[0]
        from_attention = text_back if text_last else None if perms is None else perms[1]
        thresholds, pv = self._layer_thresholds(layer_name, q.device)
        if head_shard is not None:
            thresholds = thresholds.heads(slice(head_shard.start, head_shard.stop))
        call = AttentionCall(
            layer_name=layer_name, layer_index=self._layer_index[layer_name], step=self.step, heads=heads,
            text_tokens=n_text, kv_lens=kv_lens, grid=grid, token_order=order, tile=self.profile.tile,
            thresholds=thresholds, pv_threshold=pv, method=self.profile.method, fp8=self.fp8,
        )
        # A graph reads its own static q, k, v: tokens that need no reordering would be copied in.
        # For a long call that copy costs more than the launches the graph saves.
        long_ordered = ordered and to_attention is None and n_tokens >= ORDERED_GRAPH_MAX_TOKENS
        graph = None if long_ordered else self._call_graph(call, q)
        if graph is None:
            if to_attention is not None:
                q, k, v = gather_tokens((q, k, v), to_attention)
            out, block_mask = self.run_sparse(call, q, k, v)
        else:
            if to_attention is None:
                for x, static in zip((q, k, v), graph.inputs):
                    static.copy_(x)
            else:
                gather_tokens((q, k, v), to_attention, outs=graph.inputs)
            out, block_mask = graph.run(self.run_sparse, call)
        self._record(layer_name, block_mask, batch, heads, n_tokens, padding, head_shard)
        if from_attention is not None:
            out, = gather_tokens((out,), from_attention)
        elif graph is not None:  # the graph's buffer: the next replay rewrites it
            out = out.clone()
        return out.transpose(1, 2) if layout == "BNHD" else out

    def run_sparse(
        self, call: AttentionCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse attention of one call. q, k, v: (B, H, N, D) in the attention order (video tiles or
        raster, then the text segment). Returns (output (B, H, N, D) in the same order, the bool block
        mask used (B, H, ceil(N/BLOCK_M), ceil(N/BLOCK_N)), for the stats).

        The method to override (with `can_run_sparse`): calibration evaluates candidate thresholds here and may return
        any output (e.g. dense) with the mask it wants counted.
        """
        from sparsediff.attention import DEFAULT_METHOD, block_sparse_attention, predict_with

        predicted, = predict_with(q, k, call.thresholds, method=call.method or DEFAULT_METHOD, scale=q.shape[-1] ** -0.5,
                                  kv_lens=call.kv_lens, dense_tail_tokens=call.text_tokens)
        out = block_sparse_attention(q, k, v, predicted.mask, kv_lens=call.kv_lens, pv_threshold=call.pv_threshold,
                                     fp8=call.fp8, lut=predicted.lut)
        return out, predicted.mask

    # ------------------------------------------------------------------ helpers

    def _next_graph_epoch(self) -> None:
        """A new generation: free the CUDA graphs no call used in the last one (a batch render that
        changes size would otherwise keep every size's buffers)."""
        self._graph_epoch += 1
        self._graphs = {s: g for s, g in self._graphs.items() if g.epoch >= self._graph_epoch - 1}

    def _call_graph(self, call: AttentionCall, q: torch.Tensor) -> SparseCallGraph | None:
        """The CUDA graph for this call's signature, made on first use; None where calls run without
        one: graphs off, not CUDA, inside a capture of the caller's, a subclass's own `run_sparse`
        (it may decide per call), or a signature whose capture failed."""
        if not (self.cuda_graphs and q.is_cuda and type(self).run_sparse is AttentionController.run_sparse) \
                or torch.cuda.is_current_stream_capturing():
            return None
        signature = SparseCallGraph.signature(call, q)
        graph = self._graphs.get(signature)
        if graph is None:
            graph = self._graphs[signature] = SparseCallGraph(call, q)
        graph.epoch = self._graph_epoch
        return None if graph.failed else graph

    def runs_dense(self, layer_name: str, cause: str | None, dense_path: str) -> bool:
        """Whether this call of `layer_name` runs dense: a dense step or a profile-dense layer, or a
        fallback `cause` (a FALLBACK_CAUSES key). A fallback of a call that was to run sparse is said
        once per cause in the log, naming `dense_path`, and counted every time in the stats."""
        if self.profile.layers[layer_name].dense or self.is_dense_step():
            return True
        if cause is None:
            return False
        warn_once(f"dense:{cause}", f"sparsediff: {FALLBACK_CAUSES[cause]}; attention runs dense ({dense_path})")
        self.stats.record_fallback(cause)
        return True

    def can_run_sparse(self, device: torch.device) -> bool:
        """Whether `run_sparse` can run on `device` (the Triton kernels). Calibration overrides it: it
        computes through the public functions, whose torch references also serve a CPU."""
        return kernels_available(device)

    def _kernel_cause(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """"device" or "dtype" where sparse calls cannot take tensors of `dtype` on `device`, else None
        (fp32 only on the CPU, through the interpreter)."""
        if not self.can_run_sparse(device):
            return "device"
        if dtype not in (torch.float16, torch.bfloat16) + ((torch.float32,) if device.type == "cpu" else ()):
            return "dtype"
        return None

    def _too_short(self, n_tokens: int) -> bool:
        return math.ceil(n_tokens / BLOCK_M) < self.min_query_blocks

    def _fallback_cause(self, q: torch.Tensor, k: torch.Tensor, profile_heads: int) -> str | None:
        cause = self._kernel_cause(q.device, q.dtype)
        if cause is not None:
            return cause
        if self.fp8 and fp8_unsupported(q.device):
            return "fp8"
        if q.shape[-1] > MAX_HEAD_DIM:
            return "head_dim"
        if k.shape[2] != q.shape[2]:
            return "cross"
        if q.shape[1] != profile_heads:
            return "heads"
        if self._too_short(q.shape[2]):
            return "short"
        return None

    def _key_padding(self, mask: torch.Tensor, batch: int, n_tokens: int) -> _KeyPadding:
        """kv_lens for a bool key-padding mask that pads on the right; else the fallback cause "mask".

        The stock transformer passes one mask object to every block of a forward: check it once
        (the check syncs with the device).
        """
        if self._padding is not None and self._padding.mask is mask:
            return self._padding
        padding = _KeyPadding(mask, None, 0, "mask")
        if mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[1] == mask.shape[2] == 1 \
                and mask.shape[3] == n_tokens and mask.shape[0] in (1, batch):
            valid = mask.reshape(mask.shape[0], n_tokens)
            lens = valid.sum(-1)
            right = torch.arange(n_tokens, device=mask.device)[None, :] < lens[:, None]
            if bool((right == valid).all()) and bool((lens > 0).all()):
                kv_lens = lens.to(torch.int32).expand(batch).contiguous()
                padding = _KeyPadding(mask, kv_lens, int((kv_lens + BLOCK_N - 1).div(BLOCK_N, rounding_mode="floor").sum()), None)
        self._padding = padding
        return padding

    def _text_tokens(self, text_tokens: int | None) -> int:
        if text_tokens is not None:
            return text_tokens
        info = self.forward_info
        if info is None or info.text_tokens is None:
            warn_once("text-unknown", "sparsediff: text length unknown outside a hooked forward; "
                                      "text tokens are not kept dense")
            return 0
        return info.text_tokens

    def _video_layout(self, n_video: int) -> tuple[tuple[int, int, int] | None, str]:
        """(grid, order) for `n_video` video tokens: tiles need the hook's grid to match them."""
        order = self.profile.token_order
        info = self.forward_info
        grid = info.grid if info is not None and info.grid is not None and math.prod(info.grid) == n_video else None
        if grid is None and order == "tiles":
            warn_once("grid-unknown", "sparsediff: latent grid unknown or not matching the sequence; "
                                      "video tokens stay in raster order")
            order = "raster"
        return grid, order

    def _text_first_again(self, n_tokens: int, text_tokens: int | None, device: torch.device) -> torch.Tensor | None:
        """Indices that put a [video ; text] sequence of `n_tokens` back in [text ; video] order (None: no text)."""
        n_text = self._text_tokens(text_tokens)
        perms = self._permutation(n_tokens - n_text, "raster", n_text, True, device)
        return None if perms is None else perms[1]

    def _permutation(self, video: tuple[int, int, int] | int, order: str, n_text: int, text_first: bool,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(permutation, inverse) into the attention order, or None for the identity; cached."""
        key = (video, order, self.profile.tile, n_text, text_first, device)
        if key not in self._perms:
            perm = token_permutation(video, order=order, text_tokens=n_text, text_first=text_first,
                                     block_tokens=BLOCK_M, tile=self.profile.tile, device=device)
            self._perms[key] = None if perm is None else (perm, inverse_permutation(perm))
        return self._perms[key]

    def _site_permutation(self, grid: tuple[int, int, int], n_text: int,
                          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(permutation, inverse) of a token-order site's [text ; video] sequence: its video tokens into
        the attention order, its `n_text` text tokens left first; cached."""
        video_perms = self._permutation(grid, self.profile.token_order, 0, False, device)
        if not n_text:  # the video permutation itself: no second cached copy of it
            return video_perms
        key = ("site", grid, self.profile.token_order, self.profile.tile, n_text, device)
        if key not in self._perms:
            perm = torch.cat([torch.arange(n_text, device=device), video_perms[0] + n_text])
            self._perms[key] = (perm, inverse_permutation(perm))
        return self._perms[key]

    def _layer_thresholds(self, layer_name: str, device: torch.device) -> tuple[HeadThresholds, float | None]:
        """The layer's thresholds, checked and moved to `device` once: per call that would sync."""
        key = (layer_name, device)
        if key not in self._thresholds:
            layer = self.profile.layers[layer_name]

            # The kernel takes one pv threshold per call: the strictest (smallest) of the heads'.
            pv = None if layer.pv_threshold is None else min(layer.pv_threshold)
            self._thresholds[key] = (head_thresholds([torch.tensor(layer.cdf_threshold)], torch.tensor(layer.sim_threshold),
                                                     layer.heads, device),
                                     pv or None)  # 0 means "never skip": the kernel's None
        return self._thresholds[key]

    def _record(self, layer_name: str, block_mask: torch.Tensor | None, batch: int, heads: int,
                n_tokens: int, padding: _KeyPadding | None, head_shard: HeadShard | None = None) -> None:
        """Count one call in the stats; with `head_shard`, this rank's heads are gathered to all of them."""
        n_q, n_k = math.ceil(n_tokens / BLOCK_M), math.ceil(n_tokens / BLOCK_N)
        padded = padding is not None and padding.kv_lens is not None
        pairs = n_q * (padding.valid_key_blocks if padded else batch * n_k)
        if block_mask is None:
            kept = torch.full((heads if head_shard is None else head_shard.total,), float(pairs), dtype=torch.float64)
        else:
            if padded:  # blocks wholly in the padding are never computed: do not count them
                valid = valid_key_blocks(batch, n_k, BLOCK_N, n_tokens, padding.kv_lens, block_mask.device)
                block_mask = block_mask & valid[:, None, None, :]
            kept = block_mask.sum(dim=(0, 2, 3))
            if head_shard is not None:
                kept = head_shard.gather(kept)
        self.stats.record(layer_name, self.step, kept, pairs)


@dataclass
class _KeyPadding:
    mask: torch.Tensor
    kv_lens: torch.Tensor | None  # int32 (B,)
    valid_key_blocks: int  # key blocks holding a valid key, summed over the batch
    cause: str | None  # fallback cause when the mask cannot run sparse


# Why a call that was to run sparse ran dense (SparsityStats.fallbacks, the render sidecars).
FALLBACK_CAUSES = {
    "device": "Triton kernels unavailable on this device (CPU needs TRITON_INTERPRET=1)",
    "dtype": "unsupported dtype (fp16/bf16; fp32 only on the CPU interpreter)",
    "head_dim": f"head dim above {MAX_HEAD_DIM} is not supported by the kernel",
    "cross": "query and key lengths differ (cross-attention)",
    "heads": "head count differs from the profile's (tensor parallelism?)",
    "short": "sequence of only a few query blocks",
    "mask": "attention mask is not a right-padding bool key mask",
    "fp8": f"fp8=True needs a GPU of compute capability {'.'.join(map(str, FP8_MIN_CAPABILITY))} or newer",
    **{f"cp-{cause}": reason for cause, reason in CONTEXT_PARALLEL_CAUSES.items()},
}
