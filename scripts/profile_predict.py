"""Where mask prediction and `sparse_attention` spend their time on a CUDA device (a diagnostic).

    python scripts/profile_predict.py [SHAPE ...]       # default: flux cogvideox wan

For each model shape (`sparsediff.bench.kernel.SHAPES`), random bf16 q/k/v in diffusers' (B, N, H, D)
layout, torch.profiler over 10 calls of `predict_block_mask` (default thresholds) and of
`sparse_attention` (cdf 0.95) and of the processors' path (`predict_with` on thresholds checked once,
then `block_sparse_attention`): GPU time per kernel and per call, host time per call, the host
operations that take that time, and the host calls that wait for the device (stream/device
synchronisations, blocking copies): these should be none on the sparse path.
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from sparsediff.attention import (
    DEFAULT_METHOD,
    block_sparse_attention,
    head_thresholds,
    predict_block_mask,
    predict_with,
    sparse_attention,
)
from sparsediff.bench.kernel import SHAPES, _make_qkv

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
    host_ops = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    for e in host_ops[:10]:
        print(f"      host {e.self_cpu_time_total / CALLS / 1e3:8.3f} ms  x{e.count // CALLS:<3d} {e.key[:80]}")


def launch_cost() -> None:
    """Host time of one small Triton launch (the LUT builder on a 1-row mask): the floor per kernel."""
    from sparsediff.kernels.block_sparse_attn import build_block_lut

    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool, device="cuda")
    build_block_lut(mask, 256)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(200):
        build_block_lut(mask, 256)
    print(f"build_block_lut on a tiny mask: host {(time.perf_counter() - started) / 200 * 1e6:.1f} us/call")
    torch.cuda.synchronize()


def main(names: list[str]) -> None:
    launch_cost()
    for name in names or ["flux", "cogvideox", "wan"]:
        s = SHAPES[name]
        q, k, v = _make_qkv(s, torch.bfloat16, "cuda")  # (B, N, H, D) viewed as (B, H, N, D)
        print(f"{name} {(s.batch, s.heads, s.tokens, s.head_dim)}")
        report("predict_block_mask", lambda: predict_block_mask(q, k, dense_tail_tokens=s.text_tokens))
        report("sparse_attention", lambda: sparse_attention(q, k, v, 0.95, dense_tail_tokens=s.text_tokens))
        thresholds = head_thresholds([0.95], 0.0, s.heads, q.device)

        def processor_path():
            predicted, = predict_with(q, k, thresholds, method=DEFAULT_METHOD, scale=s.head_dim**-0.5, kv_lens=None,
                                      dense_tail_tokens=s.text_tokens)
            return block_sparse_attention(q, k, v, predicted.mask, lut=predicted.lut)
        report("processor path", processor_path)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
