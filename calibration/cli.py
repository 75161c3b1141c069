"""`sparsediff calibrate`: find per-layer/per-head sparsity thresholds of a model within an error budget.

Renders the calibration prompts dense; inside every sparse-capable attention layer, at sampled
steps, it evaluates a grid of candidate thresholds against the dense output and keeps per-head
statistics. Writes PROFILE.json (load with SparsityProfile.load / `sparsediff render --profile`),
PROFILE.report.json and the resumable PROFILE.calib-state.json. See calibration/select.py for the
selection rule and calibration/driver.py for resuming.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparsediff.attention import DEFAULT_METHOD, METHODS
from sparsediff.calibration.measure import (
    DEFAULT_CDF_GRID,
    DEFAULT_ROW_FRACTION,
    DEFAULT_SIM_GRID,
    DEFAULT_STEP_STRIDE,
)
from sparsediff.calibration.select import DEFAULT_MIN_LAYER_SPARSITY


def _csv(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def add_arguments(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    """The calibrate options; `sweep`: those of `calibrate-sweep` (--out a folder, --budgets instead of
    --budget, validation always on)."""
    parser.add_argument("--model", default=None,
                        help="recipe name (see `sparsediff models`) or a local diffusers pipeline folder "
                             "(default: toy-shapes where installed, else tiny-wan)")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the profiles, reports, sweep.json and sweep.png" if sweep else
                        "profile to write (.json); report and state go beside it")
    parser.add_argument("--prompts", type=Path, default=None,
                        help="calibration prompts (.txt/.jsonl/.csv; default: the bundled set for the model's kind)")
    parser.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the recipe's)")
    parser.add_argument("--height", type=int, default=None, help="height in pixels (default: the recipe's)")
    parser.add_argument("--width", type=int, default=None, help="width in pixels (default: the recipe's)")
    parser.add_argument("--frames", type=int, default=None, help="frames of video models (default: the recipe's)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt i is SEED + i unless the file sets one")
    if sweep:
        parser.add_argument("--budgets", default="0.05,0.1,0.2,0.3,0.5",
                            help="comma list of per-head error budgets in (0, 1), each selected and validated "
                                 "(default 0.05,0.1,0.2,0.3,0.5)")
    else:
        parser.add_argument("--budget", type=float, default=0.05,
                            help="per-head relative L1 error budget of the attention output, in (0, 1) (default 0.05)")
    parser.add_argument("--dense-steps", type=int, default=None,
                        help="leading steps run dense (default: chosen from the measured per-step sensitivity)")
    parser.add_argument("--min-layer-sparsity", type=float, default=DEFAULT_MIN_LAYER_SPARSITY,
                        help=f"layers skipping less than this run dense (default {DEFAULT_MIN_LAYER_SPARSITY:g})")
    parser.add_argument("--cdf-grid", default=_csv(DEFAULT_CDF_GRID), help="candidate cdf thresholds (comma list)")
    parser.add_argument("--sim-grid", default=_csv(DEFAULT_SIM_GRID), help="candidate sim thresholds (comma list)")
    parser.add_argument("--pv-grid", default="",
                        help="candidate pv thresholds besides none (comma list, e.g. 0.001,0.01; default: none)")
    parser.add_argument("--lead-steps", type=int, default=None,
                        help="leading steps measured one by one; dense_steps is chosen among them (default: 20%% of steps)")
    parser.add_argument("--step-stride", type=int, default=DEFAULT_STEP_STRIDE,
                        help=f"after the leading steps measure every N-th step and the last (default {DEFAULT_STEP_STRIDE})")
    parser.add_argument("--row-fraction", type=float, default=DEFAULT_ROW_FRACTION,
                        help=f"share of the query blocks whose error is measured per call (default {DEFAULT_ROW_FRACTION:g}; "
                             "short sequences: all)")
    parser.add_argument("--token-order", choices=("tiles", "raster"), default="tiles",
                        help="token order the profile runs with (default tiles)")
    parser.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"mask predictor the profile runs with (default {DEFAULT_METHOD}; sampled8: four times "
                             "the sampled queries, closer masks for 1.3-3.6x the prediction time)")
    if not sweep:
        parser.add_argument("--validate", action="store_true",
                            help="render held-out prompts dense and with the new profile; PSNR, SSIM, speed-up, "
                                 "and every sparse head's attention error there")
    parser.add_argument("--validate-prompts", type=Path, default=None,
                        help="held-out prompts for validation (default: the bundled held-out set)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--fresh", action="store_true", help="discard statistics of an earlier run instead of resuming")


def run(args: argparse.Namespace) -> int:
    from sparsediff.calibration.driver import CalibrationError, calibrate, make_plan
    from sparsediff.pipelines.recipes import ModelUnavailableError

    try:
        plan = make_plan(args)
    except ValueError as e:  # CalibrationError, PromptFileError: each names the argument or file
        print(f"sparsediff calibrate: error: {e}", file=sys.stderr)
        return 2
    try:
        calibrate(plan)
    except (ModelUnavailableError, CalibrationError) as e:  # the model's; or nothing measurable at this size
        print(f"sparsediff calibrate: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = "run the same command without --fresh" if plan.fresh else "run the same command again"
        print(f"\nsparsediff calibrate: interrupted; finished prompts are kept in {plan.state_path}: "
              f"{again} to resume", file=sys.stderr)
        return 130
    return 0
