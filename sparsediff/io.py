"""Atomic writes of the files a user keeps (outputs, sidecars, profiles, reports), and the checks of
the paths a user gives (an output folder, an input file).

Every writer puts the bytes under a temporary name in the destination's folder and then
`os.replace`s it onto the final name, so an interrupted process (Ctrl-C, SIGKILL, a crash)
leaves either the old file or the complete new one, never a partial file under the final name.
Temporary names start with "." and contain ".tmp-", so they are easy to recognise and clean.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

TEMP_MARKER = ".tmp-"
# A name (one path component) may hold 255 bytes on common filesystems; tempfile adds 8 random characters.
_NAME_MAX = 255
_RANDOM_CHARS = 8
_HASH_CHARS = 8  # of a shortened stem's tag
# mkstemp creates 0600 files; finished files get the mode a plain open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on normal exit move it onto `path`, else delete it.

    The temporary name keeps `path`'s suffix, so writers that pick a format from the
    extension (imageio, ffmpeg) behave as they would for the final name.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _temp_prefix(path: Path) -> str:
    """"." + `path`'s stem + TEMP_MARKER. Where the temporary name would be longer than a name may be
    (a final name of up to _NAME_MAX bytes must still be writable), the stem is shortened and ends in a
    hash of the whole name, so that two long names sharing their first bytes keep apart temporaries."""
    budget = _NAME_MAX - len(os.fsencode(f".{TEMP_MARKER}{path.suffix}")) - _RANDOM_CHARS
    if budget < 0:
        raise ValueError(f"{path}: a suffix of {len(os.fsencode(path.suffix))} bytes leaves no room for the temporary "
                         f"name of an atomic write (at most {_NAME_MAX - _RANDOM_CHARS - len(TEMP_MARKER) - 1})")
    stem = path.stem
    if len(os.fsencode(stem)) > budget:
        tag = "~" + hashlib.sha1(os.fsencode(path.name)).hexdigest()[:_HASH_CHARS]
        if len(tag) > budget:  # a suffix this long leaves room for part of the stem at most
            tag = ""
        while len(os.fsencode(stem + tag)) > budget:
            stem = stem[:-1]
        stem += tag
    return f".{stem}{TEMP_MARKER}"


def _temp_pattern(path: Path) -> str:
    """The glob of `atomic_output(path)`'s temporaries: the prefix, exactly the random characters, the suffix
    (so that "a.mp4" does not claim the temporaries of a file named "a.tmp-x.mp4")."""
    return glob.escape(_temp_prefix(path)) + "[a-z0-9_]" * _RANDOM_CHARS + glob.escape(path.suffix)


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries that an interrupted `atomic_output(path)` left beside `path`.

    Only call this while no other process may be writing `path`. Returns what was removed.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(_temp_pattern(path)))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create the output folder `path` if needed and check that a file can be written in it; raise
    ValueError naming `flag` otherwise. Commands call it before their work, so that a bad folder is
    refused at once and not after a long run."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{flag}: {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag}: cannot write to {out} ({e.strerror or e})") from None
    return out


def input_file_problem(path: str | os.PathLike, what: str) -> str | None:
    """Why `path` cannot be read as a `what` ("prompt file", "sparsity profile"): missing, a folder, or
    not a regular file (a device, a pipe); None when it is a regular file. Callers raise their own error."""
    path = Path(path)
    if not path.exists():
        return f"{path}: {what} not found"
    if path.is_dir():
        return f"{path}: is a directory, not a {what}"
    if not path.is_file():
        return f"{path}: not a regular file (a device or a pipe); give the path of a saved {what}"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (fsynced before the rename)."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write `obj` as strict JSON (NaN/inf refused) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] (clipped) or uint8 pixels -> uint8."""
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint8:
        return pixels
    if not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels: expected float in [0, 1] or uint8, got dtype {pixels.dtype}")
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad (F, H, W, C) frames by repeating the last row/column so H and W are even.

    H.264 in yuv420p subsamples chroma 2x2 and needs even sizes; padding (rather than
    cropping or letting ffmpeg rescale) keeps every rendered pixel unchanged.
    """
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def write_video_mp4(path: str | os.PathLike, frames: np.ndarray, fps: float, *, crf: int = 17) -> None:
    """Write (F, H, W, 3) frames (float in [0, 1] or uint8) as H.264/yuv420p MP4, atomically.

    Odd heights/widths are padded by one repeated row/column (see `pad_to_even`).
    `crf` is x264's constant rate factor (lower = better; 17 is visually near-lossless).
    """
    import imageio.v2 as imageio

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected shape (F, H, W, 3) with F >= 1, got {frames.shape}")
    if not fps > 0:
        raise ValueError(f"fps: must be positive, got {fps}")
    frames = pad_to_even(to_uint8(frames))
    with atomic_output(path) as tmp:
        writer = imageio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error", ffmpeg_params=["-crf", str(crf)],
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()


def mp4_writer_problem() -> str | None:
    """Why `write_video_mp4` cannot write here, or None: imageio's FFMPEG plugin needs the imageio-ffmpeg
    package and the ffmpeg binary it ships (or IMAGEIO_FFMPEG_EXE names)."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return "writing MP4 needs the imageio-ffmpeg package, which is not installed (pip install imageio-ffmpeg)"
    try:
        imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as e:
        return f"writing MP4 needs an ffmpeg binary, and none was found ({e})"
    return None


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an (H, W, 3) image (float in [0, 1] or uint8) as PNG, atomically."""
    import imageio.v3 as iio

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected shape (H, W, 3), got {image.shape}")
    with atomic_output(path) as tmp:
        iio.imwrite(tmp, to_uint8(image), extension=".png")
