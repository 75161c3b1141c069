"""The FP8 tile search of `bench kernel --fp8 --tune` alone (without its bf16 search and table), at the
named shapes, for whichever Q·K operand this tree's FP8 path has; writes $OUT/tune-fp8.json, prints
the candidates. Its run on branch int8-qk (2026-12-05, H200) is stored as
bench-results/h200-2026-12-05/tune-fp8-int8-qk.{log,json}:

    OUT=DIR PYTHONPATH=/tmp/site:. python3 scripts/session25/tune_fp8_tiles.py cogvideox wan
"""
import json
import os
import sys

import torch

from sparsediff.bench.kernel import SHAPES, _Timer, _tune

rows = []
for name in sys.argv[1:]:
    best, shape_rows = _tune(SHAPES[name], torch.bfloat16, _Timer("cuda", 25, 100), lambda m: print(m, flush=True), fp8=True)
    print("best", name, best, flush=True)
    rows += shape_rows
with open(f"{os.environ['OUT']}/tune-fp8.json", "w") as f:
    json.dump(rows, f, indent=1)
