"""Twenty-sixth session: CogVideoX's sparse steps with the video tokens held in the attention order
for the whole forward and the text joined last (no token moved by a sparse call but its output),
against per-call reordering (q, k, v gathered into the attention order and the output back), in one
process, alternating, on the real CogVideoX-5B configuration (random bf16 weights, 49 frames, 720x480,
10 steps), eager and compiled, settings A and B of `bench e2e --steps`.

The per-call variant is the same applied model with the forward's ordering turned off (the step
hook's `orders_tokens`): the token-order sites then copy their outputs unchanged (two copies of the
hidden states and the rotary tables a forward, which main before this change did not make) and the
processors join [text ; video]. So the compiled graph is the same for both and one compilation
serves both variants.

    OUT=DIR PYTHONPATH=/tmp/site:. python3 scripts/session26/cog_text_last.py [ROUNDS]

Writes $OUT/cog-text-last.json; prints each loop.
"""
import json
import os
import sys

import torch
from diffusers.hooks import HookRegistry
from torch.nn.attention import sdpa_kernel

import sparsediff
from sparsediff.bench.e2e import CASES, _build, _sdpa_priority, _time_loop
from sparsediff.processors.api import HOOK_NAME

STEPS = 10
SETTINGS = {"A": dict(cdf_threshold=0.15, dense_steps=2, fp8=False), "B": dict(cdf_threshold=0.1, dense_steps=1, fp8=True)}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    case = CASES["cogvideox"]
    model, inputs = _build(case, case.frames)
    base = model
    t0 = float(inputs["timestep"].max()) * 2
    timesteps = [torch.full_like(inputs["timestep"], t0 * (STEPS - i) / STEPS) for i in range(STEPS)]
    rows = []
    with sdpa_kernel(_sdpa_priority(), set_priority=True):
        for mode in ("eager", "compiled"):
            if mode == "compiled":
                torch.compiler.reset()
                model = torch.compile(base)
            dense_s = _time_loop(model, inputs, timesteps, warmup_steps=1)
            print(f"{mode} dense {dense_s:.3f} s", flush=True)
            for name, setting in SETTINGS.items():
                handle = sparsediff.apply(model, sim_threshold=0.0, **setting)
                hook = HookRegistry.check_if_exists_or_initialize(base).get_hook(HOOK_NAME)
                for r in range(rounds):
                    for ordered in (False, True):
                        hook.orders_tokens = ordered
                        handle.reset()
                        loop_s = _time_loop(model, inputs, timesteps, warmup_steps=setting["dense_steps"] + 1)
                        row = {"mode": mode, "setting": name, "round": r, "ordered_forward": ordered,
                               "dense_s": dense_s, "sparse_s": loop_s, "speedup": dense_s / loop_s,
                               "sparsity": handle.stats.mean_sparsity()}
                        rows.append(row)
                        print(f"{mode} {name} round {r} {'ordered forward' if ordered else 'per-call reorder'}: "
                              f"{loop_s:.3f} s, {row['speedup']:.3f}x dense, sparsity {row['sparsity']:.3f}", flush=True)
                sparsediff.remove(model)
    with open(os.path.join(os.environ["OUT"], "cog-text-last.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS,
                   "frames": case.frames, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
