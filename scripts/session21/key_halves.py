"""Key halves at HunyuanVideo's shape: split (declared) against one launch, kernel alone CUDA-graphed,
of cuDNN's graphed dense call; outputs against each other; a forced split against the reference."""
import json, os
import torch, triton
import sparsediff.kernels.block_sparse_attn as bsa
from sparsediff.bench.kernel import SHAPES, random_mask, local_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense
from sparsediff.kernels.block_sparse_attn_reference import block_sparse_attention_reference
from sparsediff.metrics import relative_l1

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
res = {"l2_bytes": bsa.l2_cache_bytes(dev)}
print("L2", res["l2_bytes"], flush=True)
real_l2 = bsa.l2_cache_bytes
# A forced split on small shapes against the fp32 reference (ragged keys, kv_lens, bf16 and fp16).
bsa.l2_cache_bytes = lambda device: 0
for dtype in (torch.bfloat16, torch.float16):
    B, H, n_q, n_k, D = 2, 3, 1000, 2100, 128
    q, k, v = (torch.randn(B, n, H, D, device=dev, dtype=dtype).transpose(1, 2) for n in (n_q, n_k, n_k))
    mask = torch.rand(B, H, -(-n_q // 128), -(-n_k // 64), device=dev) < 0.3
    mask[0, 0, 0] = False
    kv_lens = torch.tensor([n_k, n_k - 77], device=dev, dtype=torch.int32)
    o = bsa.block_sparse_attention(q, k, v, mask, kv_lens=kv_lens)
    ref = block_sparse_attention_reference(q.float(), k.float(), v.float(), mask, block_m=128, block_n=64, kv_lens=kv_lens)
    err = (o.float() - ref).abs().max().item()
    res[f"forced split {dtype} max abs err"] = err
    print("forced split", dtype, err, flush=True)
bsa.l2_cache_bytes = real_l2
for name in ("hunyuan", "wan"):
    s = SHAPES[name]
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev, dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    rep = 2000 if name == "hunyuan" else 300
    dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=20, rep=rep)
    print(name, "splits", bsa.splits_keys(k, False, None), "cuDNN graphed", dense, flush=True)
    for kind, make in (("random", random_mask), ("local", local_mask)):
        for keep in ((1.0, 0.25, 0.1) if kind == "random" else (0.1,)):
            mask = make(s, keep, "cuda")
            lut = bsa.build_block_lut(mask, s.tokens)
            kept = mask.float().mean().item()
            row = {}
            outs = {}
            for label, l2 in (("halves", real_l2), ("one launch", lambda device: None)):
                bsa.l2_cache_bytes = l2
                call = lambda: bsa.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5)
                outs[label] = call()
                ms = triton.testing.do_bench(cuda_graphed(call), warmup=20, rep=rep)
                row[label] = {"ms": ms, "of_cudnn": dense * kept / ms}
            bsa.l2_cache_bytes = real_l2
            row["kept"] = kept
            row["rel_l1_halves_vs_one"] = float(relative_l1(outs["halves"].float(), outs["one launch"].float()))
            row["max_abs_halves_vs_one"] = (outs["halves"].float() - outs["one launch"].float()).abs().max().item()
            res[f"{name} {kind} keep {keep}"] = row
            print(name, kind, keep, json.dumps(row), flush=True)
    res[f"{name} cudnn_graph_ms"] = dense
    del q, k, v
    torch.cuda.empty_cache()
json.dump(res, open(f"{out}/key-halves.json", "w"), indent=1)
