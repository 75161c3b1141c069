"""Split tail rows (session 22, measured and dropped): kernel alone CUDA-graphed, of cuDNN's graphed dense call, split counts side by side.

    OUT=DIR python3 scripts/session22/split_rows.py
"""
import json, os
import torch, triton
import sparsediff.kernels.block_sparse_attn as bsa
from sparsediff.bench.kernel import SHAPES, random_mask, local_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
from sparsediff.kernels.quantize_fp8 import quantize_fp8
from sparsediff.metrics import relative_l1

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
sms = bsa.multiprocessors(dev)
res = {"sms": sms}
# Correctness: every row split, against the fp32 reference and against whole rows.
for dtype in (torch.bfloat16, torch.float16):
    B, H, n_q, n_k, D = 2, 3, 1000, 2100, 128
    q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=dtype).transpose(1, 2) for n in (n_q, n_k, n_k))
    mask = torch.rand(B, H, -(-n_q // 128), -(-n_k // 64), device=dev) < 0.3
    mask[0, 0, 0] = False
    mask[1, 2, 3] = True
    kv_lens = torch.tensor([n_k, n_k - 77], device=dev, dtype=torch.int32)
    lut = bsa.build_block_lut(mask, n_k, kv_lens)
    n_rows = lut.counts.numel()
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, block_m=128, block_n=64, kv_lens=kv_lens)
    for split in (0, 7, n_rows):
        o = bsa.attention_from_lut(q, k, v, lut, D ** -0.5, kv_lens=kv_lens, split_rows=split)
        o2, skips = bsa.attention_from_lut(q, k, v, lut, D ** -0.5, kv_lens=kv_lens, split_rows=split,
                                           pv_threshold=1e-3, return_pv_skips=True)
        err = (o.float() - ref).abs().max().item()
        res[f"check {dtype} split {split}"] = {"max_abs_err": err, "pv_skips": int(skips.sum()),
                                               "pv_err": (o2.float() - ref).abs().max().item()}
        print("check", dtype, split, res[f"check {dtype} split {split}"], flush=True)
for name in ("flux", "cogvideox", "wan"):
    s = SHAPES[name]
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    rep = 300
    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=20, rep=rep)
    res[f"{name} cudnn_graph_ms"] = dense
    print(name, "cuDNN graphed", dense, flush=True)
    cases = [("random", keep) for keep in (1.0, 0.25, 0.1)] + [("local", 0.1)]
    for kind, keep in cases:
        mask = (random_mask if kind == "random" else local_mask)(s, keep, "cuda")
        lut = bsa.build_block_lut(mask, s.tokens, dense_tail_tokens=s.text_tokens if kind == "local" else 0)
        n_rows = lut.counts.numel()
        kept = float(lut.counts.sum()) / (n_rows * mask.shape[-1])
        splits = sorted({0} | {bsa.tail_split_rows(n_rows, p * sms) for p in (1, 2, 3, 4)})
        row = {"kept": kept, "rows": n_rows}
        outs = {}
        graphs = {}
        for split in splits:
            call = lambda split=split: bsa.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5, split_rows=split)
            outs[split] = call()
            graphs[split] = cuda_graphed(call)
        for rnd in range(2):
            for split in splits:
                ms = triton.testing.do_bench(graphs[split], warmup=20, rep=rep)
                row.setdefault(str(split), []).append({"ms": ms, "of_cudnn": dense * kept / ms})
        for split in splits:
            row[f"max_abs_vs_whole {split}"] = (outs[split].float() - outs[0].float()).abs().max().item()
        res[f"{name} {kind} keep {keep}"] = row
        print(name, kind, keep, json.dumps(row), flush=True)
    if name == "flux":  # the FP8 path: one program an SM
        quantized = quantize_fp8(q, k, v, block_m=128, block_n=64)
        for keep in (1.0, 0.1):
            mask = random_mask(s, keep, "cuda")
            lut = bsa.build_block_lut(mask, s.tokens)
            n_rows = lut.counts.numel()
            row = {}
            for split in sorted({0, bsa.tail_split_rows(n_rows, sms), bsa.tail_split_rows(n_rows, 2 * sms)}):
                call = lambda split=split: bsa.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5, quantized=quantized,
                                                                  split_rows=split)
                g = cuda_graphed(call)
                row[str(split)] = [triton.testing.do_bench(g, warmup=20, rep=rep) for _ in range(2)]
            res[f"flux fp8 random keep {keep}"] = row
            print("flux fp8", keep, json.dumps(row), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/split-rows.json", "w"), indent=1)
