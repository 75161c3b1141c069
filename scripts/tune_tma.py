"""The attention kernel through TMA descriptors with Hopper's warp specialisation, against the
declared tile configs and cuDNN dense (`TileConfig.tma`).

    python scripts/tune_tma.py [CASE ...]    # default: every check, then wan cogvideox wan-fp8 flux

Each case runs in its own process under a kill timeout, because a warp-specialised kernel whose
barriers disagree hangs the GPU rather than failing: a hung case is reported and ends the run.
Cases: `check-*` compare the TMA path with the plain-torch references on small ragged inputs
(diffusers' (B, N, H, D) layout; kv_lens; FP8); a shape name of `sparsediff.bench.kernel.SHAPES`,
optionally suffixed `-fp8`, times the declared config and the TMA candidates at keep 1 and 0.25
(random masks, eager calls, `triton.testing.do_bench` medians) next to cuDNN dense of the same
q, k, v, and prints each as a fraction of cuDNN's dense-equivalent speed.
"""
import subprocess
import sys
import time

CHECKS = {  # name: (B, H, N, D, keep, with kv_lens, fp8)
    "check-full": (1, 2, 1024, 128, 1.0, False, False),
    "check-kvlens": (2, 2, 1000, 128, 0.5, True, False),
    "check-d64": (1, 2, 1000, 64, 0.5, True, False),
    "check-fp8": (2, 2, 1000, 128, 0.5, True, True),
}
DEFAULT_CASES = (*CHECKS, "wan", "cogvideox", "wan-fp8", "flux")
CASE_TIMEOUT_S = {"check": 60, "hunyuan": 300}
TIMED_CASE_TIMEOUT_S = 120


def _candidates():
    from sparsediff.kernels.block_sparse_attn import TileConfig

    return {"ws-3stages": TileConfig(1, 4, 3, True, tma=True), "ws-2stages": TileConfig(1, 4, 2, True, tma=True)}


def _qkv(B, H, N, D):
    import torch

    return [torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]


def _check(name: str) -> None:
    import torch

    from sparsediff.kernels.block_sparse_attn import (
        BLOCK_M, BLOCK_N, attention_from_lut, block_sparse_attention_reference, build_block_lut,
    )
    from sparsediff.kernels.quantize_fp8 import quantize_fp8
    from sparsediff.metrics import relative_l1

    B, H, N, D, keep, with_lens, fp8 = CHECKS[name]
    torch.manual_seed(0)
    q, k, v = _qkv(B, H, N, D)
    mask = torch.rand(B, H, -(-N // BLOCK_M), -(-N // BLOCK_N), device="cuda") < keep
    mask[..., 0] = True
    kv_lens = torch.randint(N // 2, N + 1, (B,), device="cuda", dtype=torch.int32) if with_lens else None
    lut = build_block_lut(mask, N, kv_lens)
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=kv_lens) if fp8 else None
    ref = block_sparse_attention_reference(q, k, v, mask, D**-0.5, block_m=BLOCK_M, block_n=BLOCK_N,
                                           kv_lens=kv_lens, fp8=fp8)
    for label, config in _candidates().items():
        out = attention_from_lut(q, k, v, lut, D**-0.5, kv_lens=kv_lens, config=config, quantized=quantized)
        torch.cuda.synchronize()
        err = float(relative_l1(out, ref)) if fp8 else (out.float() - ref.float()).abs().max().item()
        good = err <= (3e-2 if fp8 else 2e-2)
        print(f"{name} {label}: {'rel L1' if fp8 else 'max abs err'} {err:.2e} {'ok' if good else 'FAIL'}", flush=True)


def _time(name: str) -> None:
    import torch
    import triton

    from sparsediff.bench.kernel import SHAPES, random_mask
    from sparsediff.bench.timing import cudnn_dense
    from sparsediff.kernels.block_sparse_attn import BLOCK_M, BLOCK_N, attention_from_lut, build_block_lut, tile_config
    from sparsediff.kernels.quantize_fp8 import quantize_fp8

    shape_name, _, suffix = name.partition("-")
    fp8 = suffix == "fp8"
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    q, k, v = _qkv(shape.batch, shape.heads, shape.tokens, shape.head_dim)
    scale = shape.head_dim**-0.5
    dense_ms = triton.testing.do_bench(lambda: cudnn_dense(q, k, v), warmup=50, rep=300)
    flops = 4 * shape.batch * shape.heads * shape.tokens**2 * shape.head_dim
    print(f"{name}: cuDNN dense {dense_ms:.3f} ms, {flops / dense_ms / 1e9:.0f} TFLOP/s", flush=True)
    quantized = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N) if fp8 else None
    configs = {"declared": tile_config(shape.head_dim, torch.float8_e4m3fn if fp8 else q.dtype, q.device),
               **_candidates()}
    luts = {keep: build_block_lut(random_mask(shape, keep, "cuda"), shape.tokens) for keep in (1.0, 0.25)}
    for label, config in configs.items():
        for keep, lut in luts.items():
            def call():
                return attention_from_lut(q, k, v, lut, scale, config=config, quantized=quantized)
            ms = triton.testing.do_bench(call, warmup=25, rep=150)
            # Dense-equivalent: the kept fraction of cuDNN's dense time over ours.
            print(f"{name} {label} keep {keep}: {ms:.3f} ms, {flops * keep / ms / 1e9:.0f} TFLOP/s, "
                  f"{dense_ms * keep / ms:.3f} of cuDNN  [{config}]", flush=True)


def main(cases: list[str]) -> int:
    if len(cases) == 1 and cases[0].startswith("--run="):
        case = cases[0][len("--run="):]
        (_check if case in CHECKS else _time)(case)
        return 0
    for case in cases or DEFAULT_CASES:
        timeout = next((t for key, t in CASE_TIMEOUT_S.items() if case.startswith(key)), TIMED_CASE_TIMEOUT_S)
        start = time.time()
        try:
            done = subprocess.run([sys.executable, __file__, f"--run={case}"], timeout=timeout)
            status = f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after {timeout} s (a hang: the run stops here)"
        print(f"== {case}: {status}, {time.time() - start:.0f} s", flush=True)
        if status.startswith("killed"):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
