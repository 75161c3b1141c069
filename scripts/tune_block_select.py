"""GPU time of mask prediction per tile config of the partial-mass kernel (a tuning aid).

    python scripts/tune_block_select.py [SHAPE ...]      # default: flux cogvideox wan hunyuan

For each model shape (`sparsediff.bench.kernel.SHAPES`) and each candidate (query feature rows per
program for 16-bit features, warps), the processors' prediction (`predict_with`, default method, sim 0) is captured in a
CUDA graph and its replay timed (GPU time alone), next to cuDNN dense; block masses are checked
against the declared config's. The declared config lives in `sparsediff/kernels/block_select.py`.
"""
import sys

import torch
import triton

from sparsediff.attention import DEFAULT_METHOD, head_thresholds, predict_with
from sparsediff.bench.kernel import SHAPES, _make_qkv
from sparsediff.bench.predict import _cudnn_dense, _graphed
from sparsediff.kernels import block_select

CANDIDATES = ((64, 4), (32, 4), (128, 4), (128, 8), (256, 8))


def main(names: list[str]) -> None:
    declared = (block_select.QUERY_ROWS[2], block_select.PARTIAL_NUM_WARPS)
    for name in names or ["flux", "cogvideox", "wan", "hunyuan"]:
        s = SHAPES[name]
        q, k, v = _make_qkv(s, torch.bfloat16, "cuda")  # (B, N, H, D) viewed as (B, H, N, D)
        thresholds = head_thresholds([0.95], 0.0, s.heads, q.device)
        dense = triton.testing.do_bench(lambda: _cudnn_dense(q, k, v))
        line, reference = [], None
        for rows, warps in CANDIDATES:
            block_select.QUERY_ROWS[2], block_select.PARTIAL_NUM_WARPS = rows, warps
            try:
                predict = lambda: predict_with(q, k, thresholds, method=DEFAULT_METHOD, scale=s.head_dim**-0.5,  # noqa: E731
                                               kv_lens=None, dense_tail_tokens=s.text_tokens)
                mask = predict()[0].mask
                if reference is None:
                    reference = mask
                agree = (mask == reference).float().mean().item()
                ms = triton.testing.do_bench(_graphed(predict))
                line.append(f"({rows},{warps}) {ms:.3f} ms {ms / dense:.1%} agree {agree:.4f}")
            except Exception as error:  # a candidate that fails to compile is reported
                line.append(f"({rows},{warps}) {type(error).__name__}: {str(error)[:80]}")
        block_select.QUERY_ROWS[2], block_select.PARTIAL_NUM_WARPS = declared
        print(f"{name}: cuDNN dense {dense:.3f} ms; " + "; ".join(line), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
