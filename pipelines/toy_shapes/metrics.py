"""Measure whether a clip shows what its caption says: colour presence and object motion.

Pixels are classified by colour: saturated pixels (max - min channel above a threshold; the
backgrounds are grey) are given the nearest palette colour when close enough to it. An
object's track is the per-frame pixel count and centroid of its colour's pixels. The checks
are the ones evaluation reports and the tests run on generated data:

- colour: the named colour covers at least ``MIN_AREA`` px per frame on average, and in a
  single-object clip it holds most of the classified pixels (it is the dominant colour);
- translation: the centroid moves >= ``MIN_SHIFT`` px in the named direction, more along it
  than across it;
- bounces: the vertical track both rises and falls by >= ``MIN_HOP`` px, with little sideways drift;
- grows / shrinks: the area at the end is >= ``AREA_RATIO`` times (or <= 1/that) the area at the start;
- rotates: only "stays in place" (centroid within ``MAX_DRIFT`` px) is measured, not the rotation.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS, MOTIONS

MIN_SATURATION = 0.3
MAX_COLOUR_DIST = 0.35
MIN_PIXELS = 6  # a frame's track point needs this many pixels of the colour
MIN_AREA = 8.0
DOMINANT_SHARE = 0.6
MIN_SHIFT = 6.0
MIN_HOP = 4.0
AREA_RATIO = 1.5
MAX_DRIFT = 3.0

_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor(list(COLOURS.values()))


def _as_frames(frames) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:  # frames read back from a video or PNG
        return t.cpu().float() / 255.0
    t = t.detach().float().cpu()
    # The thresholds are on [0, 1]: 0-255 values classified no pixel, so every colour "failed".
    lo, hi = (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)
    if not (0.0 <= lo and hi <= 1.0):
        raise ValueError(f"frames must be floats in [0, 1] or uint8, got values in [{lo:g}, {hi:g}]")
    return t


def classify_colours(frames) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1] -> (F, H, W) long: palette index of each pixel, -1 for none."""
    f = _as_frames(frames)
    sat = f.amax(-1) - f.amin(-1)
    dist = torch.cdist(f.reshape(-1, 3), _PALETTE).reshape(*f.shape[:-1], len(_NAMES))
    best, idx = dist.min(-1)
    return torch.where((sat > MIN_SATURATION) & (best < MAX_COLOUR_DIST), idx, -1)


def track(labels: torch.Tensor, colour: str) -> dict[str, torch.Tensor]:
    """Per-frame pixel count and centroid (x, y in px; NaN where under MIN_PIXELS) of one colour."""
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {_NAMES}, got {colour!r}")
    mask = (labels == _NAMES.index(colour)).float()  # (F, H, W)
    count = mask.sum((1, 2))
    H, W = mask.shape[1:]
    ys = torch.arange(H, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(W, dtype=torch.float32)[None, :] + 0.5
    safe = count.clamp(min=1.0)
    cx, cy = (mask * xs).sum((1, 2)) / safe, (mask * ys).sum((1, 2)) / safe
    valid = count >= MIN_PIXELS
    nan = torch.tensor(float("nan"))
    return {"count": count, "cx": torch.where(valid, cx, nan), "cy": torch.where(valid, cy, nan), "valid": valid}


def _ends(x: torch.Tensor, n: int = 3) -> tuple[float, float]:
    return float(x[:n].mean()), float(x[-n:].mean())


def motion_ok(tr: dict[str, torch.Tensor], motion: str) -> bool:
    """Whether one colour's track shows ``motion`` (see the module docstring for each rule)."""
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    valid = tr["valid"]
    if int(valid.sum()) < max(3, valid.numel() // 2):
        return False
    cx, cy, area = tr["cx"][valid], tr["cy"][valid], tr["count"][valid]
    if motion in DIRECTIONS:
        ex, ey = DIRECTIONS[motion]
        (x0, x1), (y0, y1) = _ends(cx), _ends(cy)
        along = (x1 - x0) * ex + (y1 - y0) * ey
        across = abs((x1 - x0) * ey - (y1 - y0) * ex)
        return along >= MIN_SHIFT and along > across
    if motion == "bounces":
        fall = float((cy - torch.cummin(cy, 0).values).max())  # y grows downwards
        rise = float((torch.cummax(cy, 0).values - cy).max())
        return fall >= MIN_HOP and rise >= MIN_HOP and float(cx.max() - cx.min()) < MIN_SHIFT
    if motion in ("grows", "shrinks"):
        a0, a1 = _ends(area)
        return a1 >= AREA_RATIO * a0 if motion == "grows" else a0 >= AREA_RATIO * a1
    # rotates: only staying in place is measured.
    drift = torch.sqrt((cx - cx.mean()) ** 2 + (cy - cy.mean()) ** 2).max()
    return float(drift) <= MAX_DRIFT


def check_clip(frames, objects: list[tuple[str, str, str]]) -> dict:
    """Score one clip (F, H, W, 3) against its objects' (colour, shape, motion) names.

    Returns ``{"colour_ok", "motion_ok", "objects": [per-object details]}``; ``colour_ok`` and
    ``motion_ok`` hold for the clip when they hold for every object.
    """
    if not objects:
        raise ValueError("objects must name at least one (colour, shape, motion)")
    labels = classify_colours(frames)
    classified = float((labels >= 0).sum())
    details = []
    for colour, shape, motion in objects:
        tr = track(labels, colour)
        area = float(tr["count"].mean())
        share = float(tr["count"].sum()) / max(classified, 1.0)
        c_ok = area >= MIN_AREA and (len(objects) > 1 or share >= DOMINANT_SHARE)
        details.append({
            "colour": colour, "shape": shape, "motion": motion,
            "mean_area_px": round(area, 2), "colour_share": round(share, 3),
            "colour_ok": bool(c_ok), "motion_ok": bool(c_ok and motion_ok(tr, motion)),
            "track_x": [None if v != v else round(float(v), 2) for v in tr["cx"]],
            "track_y": [None if v != v else round(float(v), 2) for v in tr["cy"]],
        })
    return {
        "colour_ok": all(d["colour_ok"] for d in details),
        "motion_ok": all(d["motion_ok"] for d in details),
        "objects": details,
    }
