"""Sparse attention with an online block-mask predictor (SpargeAttn's idea, better estimators).

`predict_block_mask` estimates, per (batch, head, query block), how the attention mass spreads
over the key blocks, and keeps the fewest key blocks whose estimated mass reaches
`cdf_threshold`; `sparse_attention` runs `block_sparse_attention` on that mask.

Estimators (`method=`), all producing an estimated mean-over-queries block mass:
- "sampled" (default): 2 real queries per query block (one per equal segment, at spread
  offsets) scored against EVERY key; each sample's exact softmax row summed per key block,
  averaged over the samples. Nothing is averaged away: a key outlier (attention sink) keeps its
  full logit, and a sharply local query keeps its locality, which mean pooling destroys when a
  block spans tokens far apart on the grid (raster strips of wide frames). Cost: 2 passes of
  samples * ceil(N/128) * N * D multiply-adds, 1.6% of dense attention's FLOPs at 2 samples.
- "sampled8": the same with 8 queries per block, at 4x the cost (6.3% of dense's FLOPs). Where
  a block's queries attend to different places, 2 samples misjudge its mass: on the toy model's
  frames (cdf 0.7 at every head, 8 of 16 steps dense, one caption; CPU,
  scripts/toy_attention_sparsity.py --frames-source) 2 samples skipped 59.8% of the blocks at
  27.3 dB against dense, 8 samples 59.3% at 32.5 dB, as the oracle's masks did (59.1% at 32.5 dB).
  Prototypes with 4 and 32 samples gave 29.5 and 33.2 dB there. On the video workloads below it
  reaches 0.99 of the oracle's sparsity at 5% error in both orders (H200, `bench predict`).
- "qpool": the block's mean query instead of samples (a quarter of the cost at 2 samples); good
  in tile order, fails where the block's queries attend to different places.
- "pooled": SpargeAttn stage 1: mean q per 128-token block against mean k per 64-token block,
  softmax over key blocks weighted by each block's valid key count. Cost ceil(N/128)*ceil(N/64)*D.
- "antidiag": XAttention's strided anti-diagonal scoring (stride 8): per 8x8 sub-block the sum
  of the q.k products along its anti-diagonal. Cost N^2 D / 8 per pass.
Measured (`sparsediff bench predict --device cpu`, video workloads with sinks, D=64, sim 0):
fraction of the oracle's sparsity reached at 5% error, raster / 2x8x8 tiles —
grid 8x16x16, 6 heads: sampled 0.90 / 0.95, qpool 0.91 / 0.92, pooled 0.50 / 0.43, antidiag
0.52 / 0.47; grid 12x24x32, 3 heads: sampled 0.92 / 0.99, qpool 0.83 / 0.96, pooled 0.52 / 0
(never under 5% up to cdf 0.999), antidiag 0.62 / 0.65. Four samples per block reached 0.98-0.99
in prototypes at twice the cost.

Self-similarity (`sim_threshold`): a block's mean pairwise cosine similarity of its tokens
(distinct pairs, see `block_stats_reference`). Query blocks below it keep every key block (their
mean query does not speak for them); for "pooled", key blocks below it are also kept for every
query block and left out of the softmax, as in SpargeAttn. "sampled", "qpool" and "antidiag" score
keys without pooling them, so only the query check applies there.

Defaults: cdf_threshold=0.95 (the DESIGN signature), sim_threshold=0.2. Measured on the video
workloads, a 0.6 similarity cut made the key-resolved predictors keep whole rows of blocks they
ranked correctly (0.91 -> 0.66 of the oracle's sparsity at 5% error); 0.0-0.2 cost nothing
there, and 0.2 still distrusts query blocks of unrelated tokens (random tokens: similarity ~0).
The error a given cdf_threshold yields depends on the workload; per-layer values come from
calibration.
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparsediff._runtime import on_tensor_device
from sparsediff.kernels.block_select import block_select, select_top_cdf
from sparsediff.kernels.block_sparse_attn import (
    BLOCK_M,
    BLOCK_N,
    MAX_HEAD_DIM,
    BlockLut,
    block_sparse_attention,
    build_block_lut,
    check_qkv,
    checked_scale,
    lut_targets,
    ordered_lut,
)
from sparsediff.kernels.block_sparse_attn_reference import valid_key_blocks
from sparsediff.kernels.block_stats import block_stats

__all__ = [
    "BLOCK_M", "BLOCK_N", "METHODS", "DEFAULT_METHOD", "HeadThresholds", "block_sparse_attention",
    "PredictedBlocks", "head_thresholds", "predict_block_mask", "predict_block_masks", "predict_with", "sparse_attention",
]

METHODS = ("sampled", "sampled8", "qpool", "pooled", "antidiag")
DEFAULT_METHOD = "sampled"
SAMPLED_QUERIES = {"sampled": 2, "sampled8": 8}  # queries per query block (powers of two dividing BLOCK_M)
ANTIDIAG_STRIDE = 8  # XAttention's stride; divides BLOCK_M and BLOCK_N
DEFAULT_CDF_THRESHOLD = 0.95
DEFAULT_SIM_THRESHOLD = 0.2

Threshold = float | torch.Tensor


# Every threshold lies in [0, 1]; a cdf threshold of 0 is refused (it asks for none of the attention
# mass). Profiles (`sparsediff.profile`) check their values against the same ranges.
THRESHOLD_OPEN_AT_ZERO = {"cdf_threshold": True, "sim_threshold": False, "pv_threshold": False}


def threshold_range(name: str) -> str:
    return "(0.0, 1.0]" if THRESHOLD_OPEN_AT_ZERO[name] else "[0.0, 1.0]"


def is_threshold_number(value: object, name: str) -> bool:
    """Whether ``value`` is a real number (Python or NumPy; not a bool) in ``name``'s range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    number = float(value)  # NaN fails both comparisons
    return (number > 0.0 if THRESHOLD_OPEN_AT_ZERO[name] else number >= 0.0) and number <= 1.0


def _per_head(value: Threshold, name: str, heads: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """A threshold as an fp32 (H,) tensor in its range and its largest value; ValueError naming `name`
    otherwise. A number is checked on the host; a tensor's values are read back (a device sync)."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:  # as a Python bool: True would read as 1.0
            raise ValueError(f"{name} must be a float or a tensor of shape ({heads},), got a bool tensor")
        if value.dim() == 0:
            value = value.item()
        elif tuple(value.shape) != (heads,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({heads},), got shape {tuple(value.shape)}")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise ValueError(f"{name} must be a float or a tensor of shape ({heads},), got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        values = value.detach().float().cpu()
        if not all(is_threshold_number(v, name) for v in values.tolist()):
            raise ValueError(f"{name} must lie in {threshold_range(name)}, got {value!r}")
        return value.detach().to(device=device, dtype=torch.float32).contiguous(), float(values.max())
    # A number is checked in Python: host tensors for it cost ~20 us a call (an eager call's overhead).
    if not is_threshold_number(value, name):
        raise ValueError(f"{name} must lie in {threshold_range(name)}, got {value!r}")
    return torch.full((heads,), float(value), dtype=torch.float32, device=device), float(value)


@dataclass(frozen=True)
class HeadThresholds:
    """Validated per-head thresholds on one device, for `predict_with`: build once, reuse per call.

    cdf: one fp32 (H,) tensor per mask wanted (several share one block-mass estimate); sim: fp32
    (H,); uses_sim: whether any head's sim threshold is above 0 (else the self-similarity pass is
    skipped).
    """

    cdf: tuple[torch.Tensor, ...]
    sim: torch.Tensor
    uses_sim: bool

    def heads(self, index: slice) -> HeadThresholds:
        """The thresholds of a subset of the heads (a context-parallel rank's share)."""
        return HeadThresholds(tuple(c[index] for c in self.cdf), self.sim[index], self.uses_sim)


def head_thresholds(
    cdf_thresholds: Sequence[Threshold], sim_threshold: Threshold, heads: int, device: torch.device
) -> HeadThresholds:
    """Check and convert thresholds (numbers or (H,) tensors in their ranges) once, for `predict_with`."""
    if isinstance(cdf_thresholds, (str, bytes)) or not isinstance(cdf_thresholds, Sequence) or not cdf_thresholds:
        raise ValueError(f"cdf_thresholds must be a non-empty sequence, got {cdf_thresholds!r}")
    cdf = tuple(_per_head(c, "cdf_threshold", heads, device)[0] for c in cdf_thresholds)
    sim, sim_max = _per_head(sim_threshold, "sim_threshold", heads, device)
    return HeadThresholds(cdf, sim, sim_max > 0)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, kv_lens: torch.Tensor | None, dense_tail_tokens: int, method: str) -> None:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, N, D), got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name} must be fp16, bf16 or fp32, got {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k shape {tuple(k.shape)} must equal q shape {tuple(q.shape)}")
    if k.device != q.device:
        raise ValueError(f"k is on {k.device} but q is on {q.device}")
    if k.dtype != q.dtype:
        raise ValueError(f"k has dtype {k.dtype} but q has {q.dtype}")
    if min(q.shape) < 1:
        raise ValueError(f"q must be non-empty, got shape {tuple(q.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:  # as sparse_attention's; the prediction kernels' tiles are sized for it
        raise ValueError(f"q head dim {q.shape[-1]} is not supported (1..{MAX_HEAD_DIM})")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = q.shape[2]
    # numbers.Integral: a NumPy integer is an int here (and is passed on as one).
    if isinstance(dense_tail_tokens, bool) or not isinstance(dense_tail_tokens, numbers.Integral) or not 0 <= dense_tail_tokens <= n:
        raise ValueError(f"dense_tail_tokens must be an int in [0, {n}], got {dense_tail_tokens!r}")
    if kv_lens is not None:
        if not isinstance(kv_lens, torch.Tensor) or kv_lens.dtype.is_floating_point or kv_lens.dtype == torch.bool:
            raise ValueError(f"kv_lens must be an integer tensor, got {getattr(kv_lens, 'dtype', type(kv_lens))}")
        if tuple(kv_lens.shape) != (q.shape[0],):
            raise ValueError(f"kv_lens shape {tuple(kv_lens.shape)} must be ({q.shape[0]},)")
        if kv_lens.device != q.device:  # the kernels would fail on a foreign pointer without saying which
            raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
        if bool(((kv_lens.long() < 1) | (kv_lens.long() > n)).any()):  # long: n may not fit kv_lens' dtype
            raise ValueError(f"kv_lens values must lie in [1, {n}]")


@functools.lru_cache(maxsize=64)
def sample_rows(n: int, samples: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Indices of the `samples` queries that stand for each query block: one per equal segment
    of the block, at golden-ratio offsets so that successive segments (rows of a raster strip,
    rows of a tile) are sampled at different positions; clamped into a ragged last block.
    Cached per (n, samples, device): building them on the host and copying would sync every call."""
    seg = BLOCK_M // samples
    offsets = [int((m + 0.5) * 0.6180339887 % 1.0 * seg) for m in range(samples)]
    starts = torch.arange(-(-n // BLOCK_M))[:, None] * BLOCK_M + torch.arange(samples)[None, :] * seg
    return (starts + torch.tensor(offsets)).clamp_max(n - 1).flatten().to(device)


@on_tensor_device
def predict_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    cdf_threshold: Threshold = DEFAULT_CDF_THRESHOLD,
    sim_threshold: Threshold = DEFAULT_SIM_THRESHOLD,
    *,
    method: str = DEFAULT_METHOD,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    dense_tail_tokens: int = 0,
) -> torch.Tensor:
    """Predicted block mask, bool (B, H, ceil(N/BLOCK_M), ceil(N/BLOCK_N)), True = compute.

    q, k: (B, H, N, D), any strides. cdf_threshold / sim_threshold: numbers in (0, 1] / [0, 1] or
    (H,) tensors (see the module doc; cdf 1.0 or sim 1.0 keep every block). scale: the attention's
    softmax scale (default D**-0.5). kv_lens: int (B,); key blocks with no valid key are False.
    dense_tail_tokens: the last tokens (text) are attended densely both ways.
    """
    return predict_block_masks(q, k, [cdf_threshold], sim_threshold, method=method, scale=scale,
                               kv_lens=kv_lens, dense_tail_tokens=dense_tail_tokens)[0]


@on_tensor_device
def predict_block_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    cdf_thresholds: Sequence[Threshold],
    sim_threshold: Threshold = DEFAULT_SIM_THRESHOLD,
    *,
    method: str = DEFAULT_METHOD,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    dense_tail_tokens: int = 0,
) -> list[torch.Tensor]:
    """`predict_block_mask` for each of several cdf thresholds, at the cost of one block-mass
    estimate and one cheap selection per extra threshold (calibration's candidate grid)."""
    predicted = _checked_predict(q, k, cdf_thresholds, sim_threshold, method=method, scale=scale, kv_lens=kv_lens,
                                 dense_tail_tokens=dense_tail_tokens)
    return [p.mask for p in predicted]


def _checked_predict(q, k, cdf_thresholds, sim_threshold, *, method, scale, kv_lens, dense_tail_tokens):
    _check_inputs(q, k, kv_lens, dense_tail_tokens, method)
    thresholds = head_thresholds(cdf_thresholds, sim_threshold, q.shape[1], q.device)
    return predict_with(q, k, thresholds, method=method, scale=checked_scale(scale, q.shape[3]),
                        kv_lens=kv_lens, dense_tail_tokens=int(dense_tail_tokens))


@dataclass(frozen=True)
class PredictedBlocks:
    """A predicted block mask and the lookup table of its kept blocks (`build_block_lut`'s), which
    `block_sparse_attention(..., lut=)` takes instead of building it again."""

    mask: torch.Tensor
    lut: BlockLut


def predict_with(
    q: torch.Tensor,
    k: torch.Tensor,
    thresholds: HeadThresholds,
    *,
    method: str,
    scale: float,
    kv_lens: torch.Tensor | None,
    dense_tail_tokens: int,
) -> list[PredictedBlocks]:
    """The prediction itself, on arguments already checked (`head_thresholds`, `predict_block_masks`):
    no host-device sync, so callers that validate once (the processors) keep the GPU queue full.
    One mask (with its lookup table) per cdf threshold."""
    n = q.shape[2]
    q_pooled = q_untrusted = k_untrusted = k_trusted = None
    scores_mean_query = method in ("qpool", "pooled")
    if scores_mean_query or thresholds.uses_sim:  # one pass over q
        q_pooled, _, q_untrusted = block_stats(q, BLOCK_M, pooled=scores_mean_query, sim_below=thresholds.sim)
    if method in SAMPLED_QUERIES:
        samples = SAMPLED_QUERIES[method]
        qf, kf = q, k
        geometry = dict(stride=1, q_tokens=BLOCK_M // samples, k_tokens=1, q_rows=sample_rows(n, samples, q.device))
    elif method == "qpool":
        qf, kf = q_pooled, k
        geometry = dict(stride=1, q_tokens=BLOCK_M, k_tokens=1)
    elif method == "pooled":
        kf, _, k_untrusted = block_stats(k, BLOCK_N, kv_lens, sim_below=thresholds.sim)
        qf, k_trusted = q_pooled, ~k_untrusted
        geometry = dict(stride=1, q_tokens=BLOCK_M, k_tokens=BLOCK_N)
    else:
        qf, kf = q, k
        geometry = dict(stride=ANTIDIAG_STRIDE, q_tokens=ANTIDIAG_STRIDE, k_tokens=ANTIDIAG_STRIDE)
    # Untrusted query blocks attend to every key block, untrusted key blocks are always kept, and so
    # is the text tail; completing a selection into its lookup table adds them and drops invalid keys
    # (for the first threshold inside the selection kernel).
    dense = dict(dense_rows=q_untrusted, dense_cols=k_untrusted, dense_tail_tokens=dense_tail_tokens)
    first_lut = lut_targets((q.shape[0], q.shape[1], -(-n // BLOCK_M), -(-n // BLOCK_N)), n, q.device, kv_lens,
                            **dense)
    first, mass = block_select(
        qf, kf, thresholds.cdf[0], n_tokens=n, block_m=BLOCK_M, block_n=BLOCK_N, scale=scale,
        kv_lens=kv_lens, k_trusted=k_trusted, lut=first_lut, **geometry,
    )
    predicted = [PredictedBlocks(first, ordered_lut(first_lut))]
    for cdf in thresholds.cdf[1:]:
        mask = select_top_cdf(mass, cdf).contiguous()
        predicted.append(PredictedBlocks(mask, build_block_lut(mask, n, kv_lens, out_mask=mask, **dense)))
    return predicted


@on_tensor_device
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cdf_threshold: Threshold = DEFAULT_CDF_THRESHOLD,
    sim_threshold: Threshold = DEFAULT_SIM_THRESHOLD,
    pv_threshold: float | None = None,
    return_sparsity: bool = False,
    *,
    method: str = DEFAULT_METHOD,
    scale: float | None = None,
    kv_lens: torch.Tensor | None = None,
    dense_tail_tokens: int = 0,
    fp8: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Attention over the blocks `predict_block_mask` keeps (arguments as there and as
    `block_sparse_attention`; pv_threshold enables the kernel's P·V skip, None = exact; fp8 runs
    the kernel's FP8 path).

    return_sparsity=True returns (o, sparsity): the fraction of (b, h, query block, key block)
    pairs holding a valid key that the predicted mask skips. It does not count the kernel's P·V
    skips (those blocks still cost their Q·K). With cdf_threshold 1.0 every block is computed and
    o equals dense SDPA to floating-point tolerance.
    """
    check_qkv(q, k, v)  # before predicting: what the kernel refuses is refused at once
    predicted, = _checked_predict(q, k, [cdf_threshold], sim_threshold, method=method, scale=scale, kv_lens=kv_lens,
                                  dense_tail_tokens=dense_tail_tokens)
    mask = predicted.mask
    o = block_sparse_attention(q, k, v, mask, scale, kv_lens=kv_lens, pv_threshold=pv_threshold, fp8=fp8,
                               lut=predicted.lut)
    if not return_sparsity:
        return o
    n = q.shape[2]
    valid = valid_key_blocks(q.shape[0], -(-n // BLOCK_N), BLOCK_N, n, kv_lens, q.device)
    total = valid.sum() * q.shape[1] * mask.shape[2]
    return o, 1.0 - float(mask.sum()) / float(total)
