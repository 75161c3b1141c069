"""Atomic writes of the files this package leaves (weights, configs, logs, reports, sample grids).

Not sparsediff.io's: this package also runs as the top-level ``toy_shapes`` on the device
(scripts/gpu_train_toy.sh), where sparsediff is not installed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_files_atomically(writes: Mapping[str | os.PathLike, Callable[[str], object]]) -> None:
    """Each ``write(tmp)`` to a temporary file beside its path, then every temporary renamed onto its path.

    A run stopped while writing (the seconds a weights file takes) leaves all the old files, never a
    partial file under a final name nor a new file beside old ones it belongs with; only one stopped
    among the renames, microseconds apart, can mix old and new. No fsync: a power loss is not covered.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.tmp-", suffix=path.suffix)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o644)  # mkstemp's 0600 otherwise
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """One file by ``write_files_atomically``: the old file or the new one, never a partial file."""
    write_files_atomically({path: write})


def text_writer(text: str) -> Callable[[str], object]:
    """A ``write`` for the functions above that writes ``text``."""
    return lambda tmp: Path(tmp).write_text(text)


def json_writer(obj: Any) -> Callable[[str], object]:
    """A ``write`` for the functions above: ``obj`` as JSON (indent 1)."""
    return text_writer(json.dumps(obj, indent=1))


def write_json_atomically(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as JSON (indent 1) at ``path``, written by ``write_atomically``."""
    write_atomically(path, json_writer(obj))


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Create ``folder`` and check a file can be made in it; ValueError naming ``flag`` otherwise. For
    commands to call before their long work, not after it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f"{flag}: cannot write to {folder} ({e.strerror or e})") from None
