"""Score toy-shapes weights on the held-out and seen captions over guidance scales, step counts and
seeds (thirty-eighth session): is a ten-minute model's motion short of the shipped one's at every
sampling setting, or only at the default guidance?

    PYTHONPATH=/tmp/site:$PWD/pipelines python3 scripts/session38/guidance_sweep.py OUT.json NAME=DIR...
"""

import json
import sys
import time

import torch
from toy_shapes import WEIGHTS_DIR
from toy_shapes.eval import evaluate
from toy_shapes.pipeline import ToyShapesPipeline

SETTINGS = [(g, 16) for g in (3.0, 4.0, 5.0, 6.0, 8.0)] + [(4.0, 24), (6.0, 24)]
SEEDS = (0, 1, 2)


def main() -> None:
    out, named = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    weights = {"shipped": str(WEIGHTS_DIR), **named}
    rows = []
    for name, folder in weights.items():
        pipe = ToyShapesPipeline.from_folder(folder, device="cuda", torch_dtype=torch.bfloat16)
        pipe.set_progress_bar_config(disable=True)
        for guidance, steps in SETTINGS:
            for split in ("held-out", "seen"):
                start = time.perf_counter()
                rates = [evaluate(pipe, num_inference_steps=steps, guidance_scale=guidance, seed=s, split=split)[0]
                         ["pass_rate"] for s in SEEDS]
                row = {"weights": name, "guidance": guidance, "steps": steps, "split": split,
                       "motion": [r["motion"] for r in rates], "colour": [r["colour"] for r in rates],
                       "translation": [round(r["translation_motion"], 3) for r in rates],
                       "seconds": round(time.perf_counter() - start, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "seeds": SEEDS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
