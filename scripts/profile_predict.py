"""Where mask prediction and `sparse_attention` spend their time on a CUDA device (a diagnostic).

    python scripts/profile_predict.py [SHAPE ...]       # default: flux cogvideox wan

For each model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k/v in diffusers' (B, N, H, D)
layout, torch.profiler over 10 calls of `predict_block_mask` (default thresholds) and of
`sparse_attention` (cdf 0.95): GPU time per kernel and per call, host time per call, and the host
calls that wait for the device (stream/device synchronisations, blocking copies): these should be
none on the sparse path.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsediff.attention import predict_block_mask, sparse_attention
from sparsediff.bench.kernel import SHAPES

CALLS = 10
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def report(name: str, fn) -> None:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - started) / CALLS * 1e6  # submission time: the GPU runs behind, unless a call waits
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sorted((e for e in events if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    total_gpu = sum(e.device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    waits = {e.key: e.count for e in events if any(e.key.startswith(w) for w in WAITS) and not e.key.startswith("cudaMemcpyAsync")}
    print(f"  {name}: GPU {total_gpu / CALLS / 1e3:.3f} ms/call, host {host / 1e3:.3f} ms/call, device waits {waits or 'none'}")
    for e in gpu[:8]:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            print(f"      {e.device_time_total / CALLS / 1e3:8.3f} ms  {e.key[:90]}")


def main(names: list[str]) -> None:
    for name in names or ["flux", "cogvideox", "wan"]:
        s = SHAPES[name]
        q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
        print(f"{name} {(s.batch, s.heads, s.tokens, s.head_dim)}")
        report("predict_block_mask", lambda: predict_block_mask(q, k, dense_tail_tokens=s.text_tokens))
        report("sparse_attention", lambda: sparse_attention(q, k, v, 0.95, dense_tail_tokens=s.text_tokens))
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
