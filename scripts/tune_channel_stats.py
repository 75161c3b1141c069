"""GPU time of the FP8 path's channel statistics per tile config, against torch's reductions (a
tuning aid).

    python scripts/tune_channel_stats.py

For FLUX's, CogVideoX's and Wan's k and v (stored as diffusers hands them): torch's
`channel_stats` plus `e4m3_scales` (what `quantize_fp8` ran before `kernels/channel_stats.py`),
then `channel_stats_fp8` at each candidate (key rows a tile, warps, target program count, most
tiles a chunk), each captured in a CUDA graph and its replay timed: the GPU's time alone. The
declared config lives in `sparsediff/kernels/channel_stats.py`.
"""
import torch
import triton

from sparsediff.bench.timing import cuda_graphed
from sparsediff.kernels import channel_stats
from sparsediff.kernels.quantize_fp8_reference import channel_stats as channel_stats_torch
from sparsediff.kernels.quantize_fp8_reference import e4m3_scales

CONFIG = ("TILE_ROWS", "PARTIALS_NUM_WARPS", "TARGET_PROGRAMS", "MAX_TILES_PER_CHUNK")  # a candidate's fields
# Values of CONFIG's fields, in its order.
CANDIDATES = ((32, 4, 1024, 64), (64, 4, 1024, 64), (64, 8, 512, 64), (32, 4, 4096, 64), (128, 8, 512, 64),
              (64, 4, 264, 256))
SHAPES = {"flux": (1, 4608 + 512, 24, 128), "cogvideox": (1, 17776, 48, 64), "wan": (1, 32760, 12, 128)}  # (B, N, H, D)


def _set(candidate: tuple[int, int, int, int]) -> None:
    for name, value in zip(CONFIG, candidate):
        setattr(channel_stats, name, value)


def main() -> None:
    declared = tuple(getattr(channel_stats, name) for name in CONFIG)
    for name, shape in SHAPES.items():
        k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        torch_ms = triton.testing.do_bench(cuda_graphed(lambda: e4m3_scales(channel_stats_torch(k, v, None)[1])))
        line = [f"{name} {shape}: torch {torch_ms * 1e3:.1f} us"]
        for candidate in CANDIDATES:
            _set(candidate)
            ms = triton.testing.do_bench(cuda_graphed(lambda: channel_stats.channel_stats_fp8(k, v, None)))
            line.append(f"{candidate} {ms * 1e3:.1f} us")
        _set(declared)
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
