"""GPU time of mask prediction per tile config of the partial-mass kernel (a tuning aid).

    python scripts/tune_block_select.py [SHAPE ...]      # default: flux cogvideox wan hunyuan

For each model shape (`sparsediff.bench.kernel.SHAPES`):
- each candidate (query feature rows per program for 16-bit features, warps, target program
  count, which sets the key tiles a program walks, key rows per tile, pipeline stages): the
  processors' prediction (`predict_with`, each sampled method, sim 0, its lookup table included)
  captured in a CUDA graph and its replay timed (GPU time alone), next to cuDNN dense; masks are
  compared with the first candidate's;
- the declared config's kernels one by one (torch.profiler, GPU time per call), with sim 0 and
  with the default sim threshold (which adds the self-similarity pass over q).
The declared config lives in `sparsediff/kernels/block_select.py`.
"""
import sys

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from sparsediff.attention import DEFAULT_METHOD, DEFAULT_SIM_THRESHOLD, SAMPLED_QUERIES, head_thresholds, predict_with
from sparsediff.bench.kernel import SHAPES, _make_qkv
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels import block_select

# (query rows per program, warps, target programs, key rows per tile, pipeline stages) for 16-bit
# features, short and long sequences alike, at most 8 key tiles a program; the first is the declared
# config for short sequences.
CANDIDATES = ((64, 4, 2048, 128, 3), (128, 8, 2048, 128, 2), (128, 4, 2048, 128, 2), (64, 4, 2048, 128, 4),
              (128, 8, 2048, 128, 3), (128, 8, 2048, 64, 3), (64, 4, 2048, 64, 3), (64, 8, 2048, 128, 3),
              (128, 4, 2048, 64, 2), (256, 8, 2048, 64, 3))
PROFILED_CALLS = 20


def _set(rows: int, warps: int, programs: int, key_rows: int, stages: int) -> None:
    for long_keys in (False, True):
        block_select.PARTIAL_CONFIGS[2, long_keys] = block_select.PartialMassConfig(rows, warps, stages, 8)
    block_select.TARGET_PROGRAMS, block_select.KEY_ROWS = programs, key_rows


def _restore(declared: tuple) -> None:
    configs, programs, key_rows = declared
    block_select.PARTIAL_CONFIGS.update(configs)
    block_select.TARGET_PROGRAMS, block_select.KEY_ROWS = programs, key_rows


def _kernel_times(predict) -> str:
    predict()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            predict()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.device_time_total)
    return ", ".join(f"{e.key[:40]} {e.device_time_total / PROFILED_CALLS:.1f} us" for e in events if e.device_time_total > 0)


def main(names: list[str]) -> None:
    declared = dict(block_select.PARTIAL_CONFIGS), block_select.TARGET_PROGRAMS, block_select.KEY_ROWS
    for name in names or ["flux", "cogvideox", "wan", "hunyuan"]:
        s = SHAPES[name]
        q, k, v = _make_qkv(s, torch.bfloat16, "cuda")  # (B, N, H, D) viewed as (B, H, N, D)
        dense = triton.testing.do_bench(lambda: cudnn_dense(q, k, v))

        def predictor(sim: float, method: str = DEFAULT_METHOD):
            thresholds = head_thresholds([0.95], sim, s.heads, q.device)
            return lambda: predict_with(q, k, thresholds, method=method, scale=s.head_dim**-0.5, kv_lens=None,
                                        dense_tail_tokens=s.text_tokens)

        print(f"{name}: cuDNN dense {dense:.3f} ms", flush=True)
        for method in SAMPLED_QUERIES:
            line, reference = [], None
            for candidate in CANDIDATES:
                _set(*candidate)
                label = ",".join(map(str, candidate))
                try:
                    mask = predictor(0.0, method)()[0].mask
                    if reference is None:
                        reference = mask
                    agree = (mask == reference).float().mean().item()
                    ms = triton.testing.do_bench(cuda_graphed(predictor(0.0, method)))
                    line.append(f"({label}) {ms * 1e3:.1f} us {ms / dense:.1%} agree {agree:.4f}")
                except Exception as error:  # a candidate that fails to compile is reported
                    line.append(f"({label}) {type(error).__name__}: {str(error)[:80]}")
            print(f"  {method}: " + "; ".join(line), flush=True)
        _restore(declared)
        for sim in (0.0, DEFAULT_SIM_THRESHOLD):
            graphed = triton.testing.do_bench(cuda_graphed(predictor(sim)))
            print(f"  declared, sim {sim}: graphed {graphed * 1e3:.1f} us ({graphed / dense:.1%} of dense); kernels: "
                  + _kernel_times(predictor(sim)), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
