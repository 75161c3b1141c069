"""SparsityProfile: per-layer, per-head thresholds of one model, stored as versioned JSON.

A profile names every sparse-capable attention layer of a model by its qualified name,
"<component>.<attn_processors key>" (e.g. "transformer.blocks.0.attn1.processor"; Wan 2.2's second
expert is "transformer_2...."), with its head count and one cdf / sim (and optionally pv) threshold
per head. It also carries the schedule and layout choices the thresholds were calibrated with.

Without a profile, `apply()` uses `SparsityProfile.uniform(...)` with the defaults below.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from sparsediff.attention import (
    DEFAULT_CDF_THRESHOLD,
    DEFAULT_SIM_THRESHOLD,
    METHODS,
    THRESHOLD_OPEN_AT_ZERO,
    is_threshold_number,
    threshold_range,
)
from sparsediff.io import atomic_write_json
from sparsediff.layout import TOKEN_ORDERS

FORMAT_VERSION = 1

# Defaults when no profile is given: the predictor's own (see sparsediff.attention for why).
DEFAULT_DENSE_STEPS = 2  # the first steps fix the global layout; keep them exact
DEFAULT_TOKEN_ORDER = "tiles"
# The render settings calibration records in calibration.extra (calibration/driver.py writes these keys, its
# plan's attribute names), and their names in messages. Each changes the errors the thresholds were chosen at:
# the size the token grid and so the attention, the step count the share of dense warm-up steps (dense_steps
# counts steps), guidance the scale of the conditional half's sparse error.
CALIBRATED_SETTINGS = {"height": "height", "width": "width", "frames": "frames", "steps": "steps",
                       "guidance_scale": "guidance"}

FAMILIES = ("wan", "hunyuan_video", "cogvideox", "flux")


def _check_thresholds(name: str, key: str, values: list[float]) -> None:
    """ValueError unless every value is a number in the range of threshold ``key`` (cdf, sim or pv)."""
    for v in values:
        if not is_threshold_number(v, key):
            raise ValueError(f"{name} values must be numbers in {threshold_range(key)}, got {v!r}")


_TILE_RULE = "tile must be None or three positive ints (t, h, w)"


def _as_tile(tile: object) -> tuple | None:
    """None, or ``tile`` (a list or tuple) as a tuple; ValueError for anything else."""
    if tile is None:
        return None
    if not isinstance(tile, (tuple, list)):
        raise ValueError(f"{_TILE_RULE}, got {tile!r}")
    return tuple(tile)


def _check_dense_steps(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"dense_steps must be a non-negative int, got {value!r}")


def check_overrides(
    *,
    cdf_threshold: float | None = None,
    sim_threshold: float | None = None,
    pv_threshold: float | None = None,
    dense_steps: int | None = None,
) -> None:
    """Raise ValueError naming the first given value that no profile may hold (the ranges
    `SparsityProfile.validate` checks): callers that override a profile check their values before
    loading a model."""
    given = {"cdf_threshold": cdf_threshold, "sim_threshold": sim_threshold, "pv_threshold": pv_threshold}
    for name in THRESHOLD_OPEN_AT_ZERO:
        if given[name] is not None:
            _check_thresholds(name, name, [given[name]])
    if dense_steps is not None:
        _check_dense_steps(dense_steps)


def _check_format_version(version: Any) -> None:
    # An int, not merely equal to one: JSON's true and 1.0 compare equal to 1.
    if type(version) is not int or version != FORMAT_VERSION:
        raise ValueError(f"format_version {version!r} is not supported: this sparsediff reads profiles of "
                         f"format_version {FORMAT_VERSION}")


@dataclass
class LayerProfile:
    """Thresholds of one attention layer: lists of one value per head."""

    heads: int
    cdf_threshold: list[float]
    sim_threshold: list[float]
    pv_threshold: list[float] | None = None
    dense: bool = False  # always run this layer dense

    def validate(self, name: str) -> None:
        if not isinstance(self.heads, int) or isinstance(self.heads, bool) or self.heads < 1:
            raise ValueError(f"layers[{name!r}].heads must be a positive int, got {self.heads!r}")
        for key in THRESHOLD_OPEN_AT_ZERO:
            values = getattr(self, key)
            if values is None and key == "pv_threshold":
                continue
            if not isinstance(values, list) or len(values) != self.heads:
                raise ValueError(f"layers[{name!r}].{key} must be a list of {self.heads} numbers (one per head)")
        for key in THRESHOLD_OPEN_AT_ZERO:
            if getattr(self, key) is not None:
                _check_thresholds(f"layers[{name!r}].{key}", key, getattr(self, key))
        if not isinstance(self.dense, bool):
            raise ValueError(f"layers[{name!r}].dense must be a bool")


@dataclass
class CalibrationInfo:
    """How the thresholds were found: error budget, per-head errors and sparsity reached, anything else."""

    budget: float | None = None
    errors: dict[str, list[float]] = field(default_factory=dict)  # layer -> per-head attention error
    sparsity: dict[str, list[float]] = field(default_factory=dict)  # layer -> per-head sparsity reached
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (prompts, steps, sizes, versions)


@dataclass
class SparsityProfile:
    """Per-layer/per-head thresholds and run settings of one model (see module docstring)."""

    model_id: str
    family: str
    layers: dict[str, LayerProfile]
    dense_steps: int = DEFAULT_DENSE_STEPS
    token_order: str = DEFAULT_TOKEN_ORDER
    tile: tuple[int, int, int] | None = None  # None: layout.choose_tile from the latent grid
    method: str | None = None  # predictor method of predict_block_mask; None: its default
    calibration: CalibrationInfo = field(default_factory=CalibrationInfo)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is wrong."""
        _check_format_version(self.format_version)
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a string, got {self.model_id!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not isinstance(self.layers, dict) or not self.layers:
            raise ValueError("layers must be a non-empty dict of layer name -> LayerProfile")
        for name, layer in self.layers.items():
            if not isinstance(layer, LayerProfile):
                raise ValueError(f"layers[{name!r}] must be a LayerProfile")
            layer.validate(name)
        _check_dense_steps(self.dense_steps)
        if self.token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order must be one of {TOKEN_ORDERS}, got {self.token_order!r}")
        if self.tile is not None and (
            not isinstance(self.tile, (tuple, list)) or len(self.tile) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in self.tile)
        ):
            raise ValueError(f"{_TILE_RULE}, got {self.tile!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be None or one of {METHODS}, got {self.method!r}")
        if not isinstance(self.calibration, CalibrationInfo):
            raise ValueError("calibration must be a CalibrationInfo")
        budget = self.calibration.budget
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool)
                                   or not 0.0 < budget < 1.0):  # NaN fails too; as `calibrate --budget` takes
            raise ValueError(f"calibration.budget must be None or a number in (0, 1) (an error budget), got {budget!r}")
        for key in ("errors", "sparsity", "extra"):
            if not isinstance(getattr(self.calibration, key), dict):
                raise ValueError(f"calibration.{key} must be a dict")

    # ------------------------------------------------------------------ construction

    @classmethod
    def uniform(
        cls,
        pipe_or_transformer: Any,
        *,
        model_id: str = "",
        cdf_threshold: float = DEFAULT_CDF_THRESHOLD,
        sim_threshold: float = DEFAULT_SIM_THRESHOLD,
        pv_threshold: float | None = None,
        dense_steps: int = DEFAULT_DENSE_STEPS,
        token_order: str = DEFAULT_TOKEN_ORDER,
        tile: tuple[int, int, int] | None = None,
        method: str | None = None,
    ) -> SparsityProfile:
        """A profile for this pipeline/transformer with the same thresholds on every head of every layer."""
        from sparsediff.processors.families import sparse_layers

        family, heads = sparse_layers(pipe_or_transformer)
        layers = {
            name: LayerProfile(
                heads=h,
                cdf_threshold=[float(cdf_threshold)] * h,
                sim_threshold=[float(sim_threshold)] * h,
                pv_threshold=None if pv_threshold is None else [float(pv_threshold)] * h,
            )
            for name, h in heads.items()
        }
        return cls(model_id=model_id, family=family, layers=layers, dense_steps=dense_steps,
                   token_order=token_order, tile=_as_tile(tile), method=method)

    def with_overrides(
        self,
        *,
        cdf_threshold: float | None = None,
        sim_threshold: float | None = None,
        pv_threshold: float | None = None,
        dense_steps: int | None = None,
        token_order: str | None = None,
        tile: tuple[int, int, int] | None = None,
        method: str | None = None,
    ) -> SparsityProfile:
        """A copy where every given (non-None) value replaces the profile's, on every head of every layer."""
        check_overrides(cdf_threshold=cdf_threshold, sim_threshold=sim_threshold, pv_threshold=pv_threshold,
                        dense_steps=dense_steps)
        layers = {}
        for name, layer in self.layers.items():
            layers[name] = replace(
                layer,
                cdf_threshold=layer.cdf_threshold if cdf_threshold is None else [float(cdf_threshold)] * layer.heads,
                sim_threshold=layer.sim_threshold if sim_threshold is None else [float(sim_threshold)] * layer.heads,
                pv_threshold=layer.pv_threshold if pv_threshold is None else [float(pv_threshold)] * layer.heads,
            )
        return replace(
            self,
            layers=layers,
            dense_steps=self.dense_steps if dense_steps is None else dense_steps,
            token_order=self.token_order if token_order is None else token_order,
            tile=self.tile if tile is None else _as_tile(tile),
            method=self.method if method is None else method,
        )

    # ------------------------------------------------------------------ fitting a model

    def mismatch(self, pipe_or_transformer: Any) -> str | None:
        """What differs between this profile and the model (None when it fits)."""
        from sparsediff.processors.families import sparse_layers

        family, heads = sparse_layers(pipe_or_transformer)
        problems = []
        if family != self.family:
            problems.append(f"family: profile {self.family!r}, model {family!r}")
        missing = [n for n in heads if n not in self.layers]
        extra = [n for n in self.layers if n not in heads]
        if missing:
            problems.append(f"{len(missing)} model layer(s) missing from the profile: {few_names(missing)}")
        if extra:
            problems.append(f"{len(extra)} profile layer(s) not in the model: {few_names(extra)}")
        wrong = [f"{n} (profile {self.layers[n].heads}, model {h})"
                 for n, h in heads.items() if n in self.layers and self.layers[n].heads != h]
        if wrong:
            problems.append(f"head counts differ in {len(wrong)} layer(s): {few_names(wrong)}")
        return "; ".join(problems) or None

    def check_fits(self, pipe_or_transformer: Any) -> None:
        """Raise ValueError saying exactly what differs when this profile does not fit the model."""
        problem = self.mismatch(pipe_or_transformer)
        if problem is not None:
            raise ValueError(f"profile for {self.model_id or 'an unnamed model'} does not fit this model: {problem}")

    def calibration_differences(self, **rendered: Iterable[float | None]) -> list[str]:
        """Each setting of CALIBRATED_SETTINGS that this profile was calibrated at and some of the `rendered`
        values (setting -> the values a render uses) differ from, as "height 64 (this render: 96, 128)".
        Settings the profile does not record (guidance only since 2026-12-06) or a render leaves None are skipped."""
        unknown = set(rendered) - set(CALIBRATED_SETTINGS)
        if unknown:
            raise ValueError(f"calibration_differences: unknown setting(s) {sorted(unknown)}; "
                             f"known: {list(CALIBRATED_SETTINGS)}")
        differences = []
        for key, name in CALIBRATED_SETTINGS.items():
            calibrated = self.calibration.extra.get(key)
            if key not in rendered or not isinstance(calibrated, (int, float)) or isinstance(calibrated, bool):
                continue
            other = sorted({v for v in rendered[key] if v is not None and not math.isclose(v, calibrated)})
            if other:
                differences.append(f"{name} {calibrated:g} (this render: {', '.join(f'{v:g}' for v in other)})")
        return differences

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_id": self.model_id,
            "family": self.family,
            "dense_steps": self.dense_steps,
            "token_order": self.token_order,
            "tile": None if self.tile is None else list(self.tile),
            "method": self.method,
            "layers": {
                name: {
                    "heads": layer.heads,
                    "dense": layer.dense,
                    # float(): values may be NumPy scalars, which JSON cannot hold
                    "cdf_threshold": [float(v) for v in layer.cdf_threshold],
                    "sim_threshold": [float(v) for v in layer.sim_threshold],
                    "pv_threshold": None if layer.pv_threshold is None else [float(v) for v in layer.pv_threshold],
                }
                for name, layer in self.layers.items()
            },
            "calibration": {
                "budget": self.calibration.budget,
                "errors": self.calibration.errors,
                "sparsity": self.calibration.sparsity,
                "extra": self.calibration.extra,
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SparsityProfile:
        """Build and validate a profile from its JSON object; unknown or missing keys are refused."""
        if not isinstance(data, dict):
            raise ValueError("a profile must be a JSON object")
        _check_format_version(data.get("format_version"))
        top = {"format_version", "model_id", "family", "dense_steps", "token_order", "tile", "method",
               "layers", "calibration"}
        _exact_keys("profile", data, top, required={"model_id", "family", "layers"})
        if not isinstance(data["layers"], dict):
            raise ValueError("layers must be a JSON object of layer name -> thresholds")
        layers = {}
        for name, entry in data["layers"].items():
            if not isinstance(entry, dict):
                raise ValueError(f"layers[{name!r}] must be a JSON object")
            _exact_keys(f"layers[{name!r}]", entry,
                        {"heads", "dense", "cdf_threshold", "sim_threshold", "pv_threshold"},
                        required={"heads", "cdf_threshold", "sim_threshold"})
            layers[name] = LayerProfile(**entry)
        calib = data.get("calibration", {})
        if not isinstance(calib, dict):
            raise ValueError("calibration must be a JSON object")
        _exact_keys("calibration", calib, {"budget", "errors", "sparsity", "extra"}, required=set())
        tile = data.get("tile")
        return cls(
            model_id=data["model_id"],
            family=data["family"],
            layers=layers,
            dense_steps=data.get("dense_steps", DEFAULT_DENSE_STEPS),
            token_order=data.get("token_order", DEFAULT_TOKEN_ORDER),
            tile=_as_tile(tile),
            method=data.get("method"),
            calibration=CalibrationInfo(**calib),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> SparsityProfile:
        """Read a profile written by `save` (JSON). Raises ValueError if it is malformed."""
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"path {os.fspath(path)!r} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile as JSON atomically (temp file in the same folder, then os.replace)."""
        self.validate()
        atomic_write_json(path, self.to_dict(), indent=1)


def _exact_keys(where: str, data: dict, allowed: set[str], required: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    absent = sorted(required - set(data))
    if absent:
        raise ValueError(f"{where} lacks required key(s) {absent}")


def few_names(items: list[str], n: int = 4) -> str:
    """The first ``n`` of ``items``, comma-separated, and how many more (for error messages)."""
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
