"""Experiment (fifty-second session): the Gluon probe kernel (`gluon_attention.py`) against the product
kernel and cuDNN SDPA on the H100, random masks, the four model shapes with N rounded up to a
multiple of 128 (the probe takes no ragged length; all three run at that N). The probe's key blocks
are 128 keys, the product's BLOCK_N (64): the masks are drawn over 128-key blocks and given to the
product kernel with each block split in two, so that both compute the same attention.

    python scripts/session52/gluon_attention_probe.py --smoke      # sparsediff installed; a Hopper GPU
    python scripts/session52/gluon_attention_probe.py --out DIR    # (or scripts/gpu_session.sh gluon)

--smoke checks small shapes against the product's torch reference (fp32 arithmetic) and exits. The full run
checks each mask against the product kernel (relative L1) and times the three CUDA-graphed
(`triton.testing.do_bench_cudagraph`, median): ours with its lookup table built beforehand, the
probe with its table, cuDNN dense. Dense-equivalent throughput of cuDNN: cuDNN time x keep / time.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from pathlib import Path

import torch
import triton
from gluon_attention import BLOCK, gluon_attention, kept_block_table
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparsediff.bench.kernel import SHAPES
from sparsediff.kernels.block_sparse_attn import BLOCK_N, block_sparse_attention, build_block_lut
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
from sparsediff.metrics import relative_l1


VARIANTS = "2,0;3,0;2,1;3,1;2,2;3,2"  # stages,schedule;... (schedules: `_gluon_attention_kernel`)


def parse_variants(text: str) -> list[tuple[int, int]]:
    return [(int(stages), int(schedule)) for stages, schedule in (v.split(",") for v in text.split(";"))]


def variant_name(stages: int, schedule: int) -> str:
    return f"gluon{stages}{('', 'split', 'pingpong')[schedule]}"


def random_block_mask(b: int, h: int, n: int, keep: float, device: str) -> torch.Tensor:
    """Bool (B, H, N/128, N/128) mask over the probe's 128-key blocks, round(keep * blocks) (at least 1)
    kept in every row, as `bench kernel`'s random masks."""
    qb = n // BLOCK
    return torch.rand(b, h, qb, qb, device=device).argsort(-1) < max(1, round(keep * qb))


def product_mask(mask: torch.Tensor) -> torch.Tensor:
    """The same mask over the product kernel's BLOCK_N-key blocks (each 128-key block is BLOCK // BLOCK_N
    of them), so that both kernels compute the same attention."""
    return mask.repeat_interleave(BLOCK // BLOCK_N, dim=-1)


def smoke(variants: list[tuple[int, int]]) -> None:
    """Each variant on small cases against the torch reference; prints `variant S,X ok` for those that
    pass all (a variant that hangs stops the run: the device call's timeout ends it)."""
    cases = []
    torch.manual_seed(0)
    for b, h, n, d, keep in ((1, 2, 1024, 128, 0.5), (2, 3, 768, 64, 0.34), (1, 1, 512, 128, 1.0),
                             (1, 2, 2048, 128, 0.07)):
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        k = k + 1.5  # rows whose maximum grows along the keys: the rescale matters
        mask = random_block_mask(b, h, n, keep, "cuda")
        cases.append((q, k, v, mask, block_sparse_attention_reference(q, k, v, mask, block_m=BLOCK, block_n=BLOCK)))
    for stages, schedule in variants:
        errors = []
        for q, k, v, mask, ref in cases:
            out = gluon_attention(q, k, v, kept_block_table(mask), stages=stages, schedule=schedule)
            errors.append(float(relative_l1(out, ref)))
        verdict = "ok" if max(errors) < 1e-2 else "WRONG"
        print(f"variant {stages},{schedule} {verdict}: rel L1 " + " ".join(f"{e:.1e}" for e in errors), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--shapes", default="flux,cogvideox,wan,hunyuan")
    parser.add_argument("--keeps", default="1,0.25,0.1")
    parser.add_argument("--variants", default=VARIANTS, help="stages,schedule pairs joined by ';'")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    variants = parse_variants(args.variants)
    if args.smoke:
        smoke(variants)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        shape = dataclasses.replace(shape, tokens=math.ceil(shape.tokens / BLOCK) * BLOCK)
        torch.manual_seed(0)
        q, k, v = (torch.randn(shape.batch, shape.heads, shape.tokens, shape.head_dim, device="cuda",
                               dtype=torch.bfloat16) for _ in range(3))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn_ms = triton.testing.do_bench_cudagraph(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), rep=500)
        for keep in (float(x) for x in args.keeps.split(",")):
            coarse = random_block_mask(shape.batch, shape.heads, shape.tokens, keep, "cuda")
            kept = float(coarse.float().mean())
            table = kept_block_table(coarse)
            mask = product_mask(coarse)
            lut = build_block_lut(mask, shape.tokens)
            ours = block_sparse_attention(q, k, v, mask, lut=lut)
            row = dict(shape=name, tokens=shape.tokens, heads=shape.heads, head_dim=shape.head_dim, keep=keep,
                       kept=kept, cudnn_ms=cudnn_ms)
            calls = {"ours": lambda: block_sparse_attention(q, k, v, mask, lut=lut)}
            calls.update({variant_name(stages, schedule): functools.partial(
                gluon_attention, q, k, v, table, stages=stages, schedule=schedule) for stages, schedule in variants})
            text = []
            for impl, call in calls.items():
                if impl != "ours":
                    row[f"{impl}_rel_l1_vs_ours"] = float(relative_l1(call(), ours))
                row[f"{impl}_ms"] = triton.testing.do_bench_cudagraph(call, rep=500)
                row[f"{impl}_of_cudnn"] = cudnn_ms * kept / row[f"{impl}_ms"]
                error = f" (rel L1 {row[f'{impl}_rel_l1_vs_ours']:.1e})" if impl != "ours" else ""
                text.append(f"{impl} {row[f'{impl}_of_cudnn']:.3f}{error}")
            rows.append(row)
            print(f"{name} N={shape.tokens} keep {keep}: cuDNN {cudnn_ms:.4f} ms; of cuDNN:", ", ".join(text),
                  flush=True)
            (args.out / "gluon-probe.json").write_text(json.dumps(dict(  # after every row: a timeout keeps the rest
                device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, rows=rows),
                indent=1))


if __name__ == "__main__":
    main()
