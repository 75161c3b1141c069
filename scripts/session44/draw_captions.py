"""Draw the 24 validation captions of scripts/session44/captions24.txt: 8 each of one, two and three objects,
from the training generator (split "all", seed 2026), none among the calibration or bundled held-out captions.

    python scripts/session44/draw_captions.py > scripts/session44/captions24.txt
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
from toy_shapes.data import sample_batch  # noqa: E402

PER_COUNT = 8

used = {line.strip() for name in ("toy-shapes.txt", "toy-shapes.holdout.txt")
        for line in (ROOT / "calibration" / "prompts" / name).read_text().splitlines() if not line.startswith("#")}
by_count: dict[int, list[str]] = {1: [], 2: [], 3: []}
for caption in sample_batch(80, torch.Generator().manual_seed(2026), split="all").captions:
    chosen = by_count[caption.count(", a ") + 1]
    if caption not in used and caption not in chosen and len(chosen) < PER_COUNT:
        chosen.append(caption)
if any(len(c) < PER_COUNT for c in by_count.values()):
    sys.exit(f"too few distinct captions drawn: {[len(c) for c in by_count.values()]}")
print("# 24 toy-shapes captions for validating sparse against dense renders (scripts/session44/draw_captions.py):")
print("# 8 each of one, two and three objects; none is a calibration or bundled held-out caption.")
print("\n".join(c for count in (1, 2, 3) for c in by_count[count]))
