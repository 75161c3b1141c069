"""Values the bench reports record. Strict JSON keeps only finite floats, so a NaN or inf is
recorded as its text, and printed as recorded."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def finite(x: float) -> float | str:
    """``x``, or its text ("nan", "inf") where it is not finite."""
    return x if math.isfinite(x) else str(x)


def recorded_rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float | str:
    """The relative L1 error of ``out`` against ``ref`` as a report records it."""
    from sparsediff.metrics import relative_l1

    return finite(float(relative_l1(out, ref)))


def as_text(value: float | str, spec: str) -> str:
    """A recorded value formatted by ``spec``, or its text where it was not finite."""
    return value if isinstance(value, str) else format(value, spec)
