"""Atomic writes of the files this package leaves (weights, configs, logs, reports, sample grids).

Not sparsediff.io's: this package also runs as the top-level ``toy_shapes`` on the device
(scripts/gpu_train_toy.sh), where sparsediff is not installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it onto ``path``, so that a run
    stopped while writing leaves the old file or the new one, never a partial file under ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 otherwise
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomically(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON (indent 1) at ``path``, written by ``write_atomically``."""
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1)))
