"""The demo's dense and sparse timings over repeated Generates (a diagnostic).

    python scripts/demo_timing.py [--model toy-shapes] [--repeats 3]

Loads the model as `sparsediff demo` does (its shipped profile), then runs the demo session's
comparison `--repeats` times with the same sparse settings (the first compiles and warms up; the
later ones reapply the same sparse handle, so its CUDA graphs are replayed, not captured again),
then once with other thresholds (a new handle: its graphs are captured during that render).
Prints each Generate's dense and sparse wall times and the speed-up.
"""
import argparse
import dataclasses

import torch

from sparsediff.apps.demo import PROFILE, THRESHOLDS, DemoSession, Request
from sparsediff.pipelines.recipes import get_recipe
from sparsediff.pipelines.render import _load_profile


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-shapes")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    recipe = get_recipe(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = recipe.load(device)
    pipe.set_progress_bar_config(disable=True)
    path = recipe.shipped_profile()
    profile = _load_profile(path, recipe, "shipped profile") if path else None
    session = DemoSession(recipe, pipe, device, profile, path.name if path else None)
    request = Request(prompt="a red circle moves left on a black background", negative_prompt=None, seed=0,
                      steps=recipe.steps, height=recipe.height, width=recipe.width, frames=recipe.frames,
                      source=PROFILE if profile else THRESHOLDS)
    other = dataclasses.replace(request, source=THRESHOLDS, cdf_threshold=0.9, sim_threshold=0.0,
                                dense_steps=profile.dense_steps if profile else None)
    print(f"{recipe.name} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"{recipe.steps} steps, {recipe.frames} frames of {recipe.height}x{recipe.width}")
    for i, (label, req) in enumerate([("same settings", request)] * args.repeats + [("other thresholds", other)]):
        c = session.compare(dataclasses.replace(req, seed=i))
        print(f"Generate {i + 1} ({label}): dense {c.dense_s:.3f} s, sparse {c.sparse_s:.3f} s, "
              f"speed-up {c.speedup:.2f}x, sparsity {c.stats.mean_sparsity(after_dense_steps=True):.3f}", flush=True)


if __name__ == "__main__":
    main()
