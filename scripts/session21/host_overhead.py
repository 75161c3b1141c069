"""Host-side cost of eager calls at FLUX's shape: prediction, LUT, attention launch (TMA vs pointers)."""
import cProfile, dataclasses, io, json, os, pstats, time
import torch, triton, triton.language as tl
from sparsediff.attention import predict_block_mask, head_thresholds, predict_with
from sparsediff.kernels.block_sparse_attn import attention_from_lut, tile_config, build_block_lut
from sparsediff.bench.timing import cuda_graphed, cudnn_dense

out = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
B, H, N, D = 1, 24, 4608, 128
res = {}
def layout(): return torch.randn(B, N, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2)
q, k, v = layout(), layout(), layout()

def host_us(fn, reps=300):
    """Wall time per call with the GPU kept busy-free: loop, then sync; per call."""
    for _ in range(20): fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps): fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / reps * 1e6, (t2 - t0) / reps * 1e6

def gpu_us(fn):
    g = cuda_graphed(fn)
    return triton.testing.do_bench(g, warmup=50, rep=300) * 1e3

def profile(fn, name, reps=200):
    pr = cProfile.Profile(); pr.enable()
    for _ in range(reps): fn()
    pr.disable(); torch.cuda.synchronize()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    s2 = io.StringIO(); pstats.Stats(pr, stream=s2).sort_stats("cumtime").print_stats(40)
    open(f"{out}/profile-{name}.txt", "w").write(s.getvalue() + "\n\n" + s2.getvalue())

@triton.jit
def _noop(x_ptr, a, b, c, d, e, f, g, h, i, j, K: tl.constexpr):
    pass
res["noop_launch_us"] = host_us(lambda: _noop[(1,)](q, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, K=1))
res["cudnn_us"] = host_us(lambda: cudnn_dense(q, k, v)); res["cudnn_graph_us"] = gpu_us(lambda: cudnn_dense(q, k, v))
predict = lambda: predict_block_mask(q, k, 0.5, 0.2, dense_tail_tokens=512)
res["predict_public_us"] = host_us(predict); res["predict_graph_us"] = gpu_us(predict)
thr = head_thresholds([0.5], 0.2, H, dev)
pw = lambda: predict_with(q, k, thr, method="sampled", scale=D ** -0.5, kv_lens=None, dense_tail_tokens=512)
res["predict_with_us"] = host_us(pw)
profile(predict, "predict_public")
mask = predict_block_mask(q, k, 0.1, 0.0, dense_tail_tokens=0)
res["keep"] = float(mask.float().mean())
lut = build_block_lut(mask, N, None)
res["lut_us"] = host_us(lambda: build_block_lut(mask, N, None))
cfg = tile_config(D, torch.bfloat16, dev, 10**12)
for name, c in (("tma", cfg), ("pointers", dataclasses.replace(cfg, tma=False)), ("declared", None)):
    call = lambda c=c: attention_from_lut(q, k, v, lut, D ** -0.5, config=c)
    res[f"attn_{name}_us"] = host_us(call)
    res[f"attn_{name}_graph_us"] = gpu_us(call)
    profile(call, f"attn_{name}")
    from triton.tools.tensor_descriptor import TensorDescriptor
res["descriptor_build_us"] = host_us(lambda: [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 64, 128]) for t in (k, v)])
print(json.dumps(res, indent=1))
json.dump(res, open(f"{out}/host.json", "w"), indent=1)
