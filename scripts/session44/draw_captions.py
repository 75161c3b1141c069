"""Draw toy-shapes captions: PER_COUNT each of one, two and three objects from the training generator
(split "all"), none among the calibration or bundled held-out captions or the files given after the seed.

    python scripts/session44/draw_captions.py 2026 > scripts/session44/captions24.txt      # the validation set
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))
from toy_shapes.data import sample_batch  # noqa: E402

PER_COUNT = 8

seed, excluded = int(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
prompts = ROOT / "calibration" / "prompts"
used = {line.strip() for path in [prompts / "toy-shapes.txt", prompts / "toy-shapes.holdout.txt", *excluded]
        for line in path.read_text().splitlines() if not line.startswith("#")}
by_count: dict[int, list[str]] = {1: [], 2: [], 3: []}
for caption in sample_batch(80, torch.Generator().manual_seed(seed), split="all").captions:
    chosen = by_count[caption.count(", a ") + 1]
    if caption not in used and caption not in chosen and len(chosen) < PER_COUNT:
        chosen.append(caption)
if any(len(c) < PER_COUNT for c in by_count.values()):
    sys.exit(f"too few distinct captions drawn: {[len(c) for c in by_count.values()]}")
print(f"# {3 * PER_COUNT} toy-shapes captions drawn by scripts/session44/draw_captions.py {' '.join(sys.argv[1:])}:")
print(f"# {PER_COUNT} each of one, two and three objects; none is a calibration or bundled held-out caption"
      + (f" or in {', '.join(p.name for p in excluded)}." if excluded else "."))
print("\n".join(c for count in (1, 2, 3) for c in by_count[count]))
