"""Compiled-kernel smoke check on a CUDA device: every predictor method and the attention kernel
against their torch references on a small video-like workload, the LUT (with the programs'
heavy-first row order, one program per head), the token gather and the FP8 channel statistics and
quantiser against their references, and the processors' sparse
calls replayed as CUDA graphs against the same calls launched one by one, on the four families'
tiny transformers. Exits 1 on any mismatch."""
import dataclasses
import pathlib
import sys

import torch

from sparsediff.attention import BLOCK_M, BLOCK_N, METHODS, predict_block_mask, sparse_attention
from sparsediff.kernels.block_sparse_attn import TMA_MIN_PAIRS, WORK_LEVELS, attention_from_lut, build_block_lut, tile_config
from sparsediff.kernels.block_sparse_attn_reference import block_lut_reference, block_sparse_attention_reference
from sparsediff.kernels.channel_stats import channel_stats_fp8
from sparsediff.kernels.gather_tokens import gather_tokens
from sparsediff.kernels.gather_tokens_reference import gather_tokens_reference
from sparsediff.kernels.quantize_fp8 import quantize_fp8
from sparsediff.kernels.quantize_fp8_reference import channel_stats, e4m3_scales, quantize_fp8_reference
from sparsediff.kernels.row_order_reference import heavy_rows_first_reference
from sparsediff.layout import stored_bnhd
from sparsediff.metrics import relative_l1
from sparsediff.workloads import video_workload

failed = False
for dtype in (torch.bfloat16, torch.float16):
    w = video_workload((5, 16, 24), 4, 128, batch=1, text_tokens=70, sinks=4, seed=0, dtype=dtype, device="cuda")
    for method in METHODS:
        mask = predict_block_mask(w.q, w.k, 0.9, 0.2, method=method, dense_tail_tokens=70)
        ref_mask = predict_block_mask(w.q.cpu().float(), w.k.cpu().float(), 0.9, 0.2, method=method, dense_tail_tokens=70)
        agree = (mask.cpu() == ref_mask).float().mean().item()
        out, sparsity = sparse_attention(w.q, w.k, w.v, 0.9, 0.2, method=method, dense_tail_tokens=70, return_sparsity=True)
        ref = block_sparse_attention_reference(w.q.float(), w.k.float(), w.v.float(), mask, block_m=BLOCK_M, block_n=BLOCK_N)
        err = float(relative_l1(out.float(), ref))
        ok = agree > 0.97 and err < 2e-2 and torch.isfinite(out).all().item()
        failed |= not ok
        print(f"{dtype} {method:9s} mask agreement {agree:.3f} sparsity {sparsity:.3f} kernel rel-L1 vs ref {err:.2e} {'ok' if ok else 'FAIL'}")

# The LUT at HunyuanVideo's shape (931 query blocks a head: one order chunk) and Wan's; then the
# kernel in either program order.
for heads, q_blocks, key_blocks in ((24, 931, 1861), (12, 256, 512)):
    gen = torch.Generator(device="cuda").manual_seed(0)
    keep = torch.rand(1, heads, q_blocks, 1, device="cuda", generator=gen)
    mask = torch.rand(1, heads, q_blocks, key_blocks, device="cuda", generator=gen) < keep
    lut = build_block_lut(mask, key_blocks * BLOCK_N)
    counts, indices = block_lut_reference(mask, key_blocks * BLOCK_N, BLOCK_N)
    kept = indices >= 0
    ok = (torch.equal(lut.counts, counts) and torch.equal(lut.indices.long()[kept], indices[kept])
          and torch.equal(lut.order, heavy_rows_first_reference(counts, key_blocks, WORK_LEVELS)))
    failed |= not ok
    print(f"LUT and row order {heads}x{q_blocks}x{key_blocks}: {'ok' if ok else 'FAIL'}")
q, k, v = (torch.randn(1, 12, 256 * BLOCK_M, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mask = torch.rand(1, 12, 256, 512, device="cuda") < torch.rand(1, 12, 256, 1, device="cuda")
lut = build_block_lut(mask, 512 * BLOCK_N)
config = tile_config(64, torch.bfloat16, q.device, q.shape[0] * q.shape[1] * q.shape[2] ** 2)
outs = [attention_from_lut(q, k, v, lut, 0.125, config=dataclasses.replace(config, heavy_rows_first=first))
        for first in (False, True)]
ok = torch.equal(outs[0], outs[1])
failed |= not ok
print(f"heavy rows first vs row order: identical outputs {'ok' if ok else 'FAIL'}")
# TMA key and value tiles against pointer loads (D=128, (B, N, H, D) storage; the declared tile takes
# TMA on long calls only).
q, k, v = (torch.randn(1, 256 * BLOCK_M, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
config = tile_config(128, torch.bfloat16, q.device, TMA_MIN_PAIRS)
outs = [attention_from_lut(q, k, v, lut, 128**-0.5, config=dataclasses.replace(config, tma=tma)) for tma in (False, True)]
ok = config.tma and torch.equal(outs[0], outs[1])
failed |= not ok
print(f"TMA tiles vs pointer loads: identical outputs {'ok' if ok else 'FAIL'}")

# The token gather in both storage layouts, against torch's.
index = torch.randperm(4608 + 512, device="cuda")
xs = [torch.randn(1, 4608 + 512, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2),
      torch.randn(2, 48, 4608 + 512, 64, device="cuda", dtype=torch.bfloat16)]
for x in xs:
    ys = [x, x * 2, x + 1]
    ok = all(torch.equal(out, gather_tokens_reference(y, index)) for y, out in zip(ys, gather_tokens(ys, index)))
    failed |= not ok
    print(f"token gather {tuple(x.shape)} {'(B, N, H, D)' if stored_bnhd(x) else '(B, H, N, D)'}: "
          f"{'ok' if ok else 'FAIL'}")

# FP8 channel statistics and quantisation, (B, N, H, D) storage with padded keys (kv_lens), against
# the references on the CPU (whose divisions are IEEE-rounded, as the kernels'; CUDA torch divides
# by a scalar through its reciprocal): means to summation order, and given the kernel's means,
# every bit of the quantised tensors and of the scales.
q, k, v = (torch.randn(2, 4608 + 512, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) + shift
           for shift in (0.0, 1.5, 0.0))
lens = torch.tensor([4608 + 512, 4700], device="cuda", dtype=torch.int32)
k_mean, v_scale, v_inverse = channel_stats_fp8(k, v, lens)
ref_mean, ref_amax = channel_stats(k.cpu(), v.cpu(), lens.cpu())
ok = (torch.allclose(k_mean.cpu(), ref_mean, rtol=1e-5, atol=1e-6)
      and all(torch.equal(a.cpu(), b) for a, b in zip((v_scale, v_inverse), e4m3_scales(ref_amax))))
out = quantize_fp8(q, k, v, block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens)
ref = quantize_fp8_reference(q.cpu(), k.cpu(), v.cpu(), block_m=BLOCK_M, block_n=BLOCK_N, kv_lens=lens.cpu(),
                             k_mean=out.k_mean.cpu())
ok &= all(torch.equal(getattr(out, name).cpu().view(torch.uint8), getattr(ref, name).view(torch.uint8))
          for name in ("q", "k", "v_t"))
ok &= all(torch.equal(getattr(out, name).cpu(), getattr(ref, name)) for name in ("q_scale", "k_scale", "v_scale"))
failed |= not ok
print(f"FP8 channel statistics and quantiser {tuple(k.shape)} with kv_lens: {'ok' if ok else 'FAIL'}")


def graphed_vs_launched(family: str, fp8: bool) -> bool:
    """Four steps of a two-block tiny transformer (its blocks at different thresholds, so a replay must
    take each layer's own), sparse after one dense step, with CUDA graphs and without: equal outputs,
    equal sparsity, and the graphs were captured (the second sparse call of a signature)."""
    import sparsediff
    from sparsediff.profile import SparsityProfile
    from tiny_models import TINY

    build, make_inputs = TINY[family]
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = build(num_layers=2)
    torch.set_default_dtype(torch.float32)
    profile = SparsityProfile.uniform(model, cdf_threshold=0.5, sim_threshold=0.0, dense_steps=1)
    for i, layer in enumerate(profile.layers.values()):
        layer.cdf_threshold = [0.3 + 0.2 * (i % 3)] * layer.heads
    inputs = {name: x.cuda() if isinstance(x, torch.Tensor) else x for name, x in make_inputs(model).items()}
    if "image_rotary_emb" in inputs:
        inputs["image_rotary_emb"] = tuple(x.cuda() for x in inputs["image_rotary_emb"])
    t0 = float(inputs["timestep"].max())
    outputs, sparsity, graphs = [], [], []
    for cuda_graphs in (False, True):
        handle = sparsediff.apply(model, profile, fp8=fp8, cuda_graphs=cuda_graphs)
        with torch.no_grad():
            outputs.append([model(**dict(inputs, timestep=torch.full_like(inputs["timestep"], t0 * (4 - i) / 4)))[0]
                            for i in range(4)])
        sparsity.append(handle.stats.mean_sparsity())
        graphs.append(sum(g._graph is not None for g in handle.controller._graphs.values()))
        sparsediff.remove(model)
    same = all(torch.equal(a, b) for a, b in zip(*outputs))
    ok = same and sparsity[0] == sparsity[1] > 0 and graphs[0] == 0 and graphs[1] >= 1
    print(f"{family} {'FP8' if fp8 else 'bf16'}: CUDA graphs vs launched: identical outputs {same}, "
          f"sparsity {sparsity[0]:.3f} / {sparsity[1]:.3f}, graphs captured {graphs[1]} {'ok' if ok else 'FAIL'}")
    return ok


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
for family in ("wan", "cogvideox", "hunyuan_video", "flux"):
    for fp8 in (False, True):
        failed |= not graphed_vs_launched(family, fp8)
sys.exit(1 if failed else 0)
