"""(Needs the last-step-in-loop kernel change, not in this commit.) FLUX's shape (4608 keys: no ragged block): the last step in the loop (unmasked) against peeled and
masked, kernel alone CUDA-graphed, of cuDNN's graphed call; outputs compared."""
import json, os
import torch, triton
import sparsediff.kernels.block_sparse_attn as bsa
from sparsediff.bench.kernel import SHAPES, random_mask
from sparsediff.bench.timing import cuda_graphed, cudnn_dense

out = os.environ.get("OUT", "/tmp")
res = {}
real = bsa.ragged_keys
s = SHAPES["flux"]
q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
           for _ in range(3))
dense = triton.testing.do_bench(cuda_graphed(lambda: cudnn_dense(q, k, v)), warmup=50, rep=500)
res["cudnn_graph_ms"] = dense
for rnd in range(2):
    for keep in (1.0, 0.25, 0.1):
        mask = random_mask(s, keep, "cuda")
        lut = bsa.build_block_lut(mask, s.tokens)
        kept = mask.float().mean().item()
        row, outs = {}, {}
        for label, fn in (("in loop", real), ("peeled", lambda n_k, kv_lens, config: True)):
            bsa.ragged_keys = fn
            call = lambda: bsa.attention_from_lut(q, k, v, lut, s.head_dim ** -0.5)
            outs[label] = call()
            ms = triton.testing.do_bench(cuda_graphed(call), warmup=50, rep=500)
            row[label] = {"ms": ms, "of_cudnn": dense * kept / ms}
        bsa.ragged_keys = real
        row["identical"] = bool(torch.equal(outs["in loop"], outs["peeled"]))
        res[f"run {rnd} keep {keep}"] = row
        print(rnd, keep, json.dumps(row), flush=True)
json.dump(res, open(f"{out}/last-step.json", "w"), indent=1)
