"""The two captions tests/test_toy_shapes.py checked until the forty-eighth session (on the three-run weights),
rendered on the CPU (fp32, the evaluation's settings: 17 frames, 16 steps, guidance 3, clip i from seed i) with
other weights: colour, motion, and the motion of the clip played backwards (which must fail).

    python scripts/session47/test_captions_cpu.py WEIGHTS_DIR
"""
import sys

import torch

from sparsediff.pipelines import toy_shapes as ts
from sparsediff.pipelines.toy_shapes import data, metrics

pipe = ts.ToyShapesPipeline.from_folder(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
clips = [(data.eval_clips()[8], 8), (data.eval_clips("seen")[4], 4)]
captions = [data.caption_for(objs, bg) for (objs, bg), _ in clips]
out = pipe(prompt=captions, generator=[torch.Generator().manual_seed(seed) for _, seed in clips]).frames
for ((objs, _), _), clip, caption in zip(clips, out, captions):
    result = metrics.check_clip(clip, objs)
    backwards = metrics.check_clip(clip[::-1].copy(), objs)
    print(caption, "colour", result["colour_ok"], "motion", result["motion_ok"],
          "reversed motion", backwards["motion_ok"])
