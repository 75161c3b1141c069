"""Prompt files for batch rendering: .txt, .jsonl or .csv.

- .txt: one prompt per line; blank lines and lines starting with "#" are skipped.
- .jsonl: one JSON object per line (blank lines skipped) with "prompt" and optionally
  "negative_prompt", "seed", "height", "width", "frames", "steps".
- .csv: a header row naming the same fields ("prompt" required); empty cells mean "not set".

Any problem raises `PromptFileError` naming the file (and the line, where there is one).
"""
from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsediff.io import input_file_problem

INT_FIELDS = ("seed", "height", "width", "frames", "steps")
FIELDS = ("prompt", "negative_prompt", *INT_FIELDS)
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes unsigned 64-bit seeds


class PromptFileError(ValueError):
    """A prompt file that is missing, empty or malformed."""


@dataclass(frozen=True)
class PromptSpec:
    """One item of a batch; None fields fall back to the command line / recipe defaults."""

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None
    line: int = 0  # 1-based line in the source file (for messages)


def _spec(fields: dict[str, Any], where: str, line: int) -> PromptSpec:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise PromptFileError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(FIELDS)}")
    prompt = fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptFileError(f"{where}: 'prompt' must be a non-empty string")
    negative = fields.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise PromptFileError(f"{where}: 'negative_prompt' must be a string")
    for name, text in (("prompt", prompt), ("negative_prompt", negative or "")):
        try:  # JSON's "\ud800" escapes decode to lone surrogates, which no file (sidecar, summary) can hold
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise PromptFileError(f"{where}: {name!r} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                                  "which is not text") from None
    ints: dict[str, int | None] = {}
    for name in INT_FIELDS:
        value = fields.get(name)
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise PromptFileError(f"{where}: {name!r} must be an integer, got {value!r}") from None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise PromptFileError(f"{where}: {name!r} must be an integer, got {value!r}")
        if value is not None and (value < 0 if name == "seed" else value < 1):
            raise PromptFileError(f"{where}: {name!r} must be {'>= 0' if name == 'seed' else '>= 1'}, got {value}")
        if name == "seed" and value is not None and value > MAX_SEED:
            raise PromptFileError(f"{where}: 'seed' must be <= {MAX_SEED} (64 bits), got {value}")
        ints[name] = value
    return PromptSpec(prompt=prompt.strip(), negative_prompt=negative, line=line, **ints)


def _lines(text: str) -> list[str]:
    """The file's lines: split at "\\n" only (str.splitlines also splits at U+2028, U+0085, form feeds...,
    which a prompt or a JSON string may hold); a "\\r" of CRLF is stripped as whitespace."""
    return text.split("\n")


def _read_txt(path: Path, text: str) -> list[PromptSpec]:
    specs = []
    for number, raw in enumerate(_lines(text), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            specs.append(PromptSpec(prompt=line, line=number))
    return specs


class _DuplicateKey(ValueError):
    pass


def _repeated(names: list[str]) -> str:
    """The names given more than once, quoted and comma-separated ("" when none is)."""
    return ", ".join(repr(name) for name in sorted({name for name in names if names.count(name) > 1}))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    repeated = _repeated([key for key, _ in pairs])
    if repeated:
        raise _DuplicateKey(repeated)
    return dict(pairs)


def _read_jsonl(path: Path, text: str) -> list[PromptSpec]:
    specs = []
    for number, raw in enumerate(_lines(text), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(raw, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{where}: not valid JSON ({e.msg}; column {e.colno})") from None
        except _DuplicateKey as e:
            raise PromptFileError(f"{where}: key(s) {e} given more than once") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        specs.append(_spec(obj, where, number))
    return specs


def _read_csv(path: Path, text: str) -> list[PromptSpec]:
    # Blank lines before the header are skipped, as the csv module skips them between rows (the header was
    # taken to be the blank line). `lead` of them: reader.line_num + lead is the file's line.
    lines = _lines(text)
    lead = next((i for i, line in enumerate(lines) if line.strip()), len(lines))
    # newline="": the csv module finds the rows, quoted cells may hold line breaks
    reader = csv.DictReader(io.StringIO("\n".join(lines[lead:]), newline=""), strict=True)
    if reader.fieldnames is None:
        return []
    header = [name.strip() for name in reader.fieldnames]
    if "prompt" not in header:
        raise PromptFileError(f"{path}:{lead + 1}: the header has no 'prompt' column (got {', '.join(header)})")
    repeated = _repeated(header)
    if repeated:
        raise PromptFileError(f"{path}:{lead + 1}: column(s) {repeated} given more than once")
    specs = []
    try:
        for row in reader:
            where = f"{path}:{reader.line_num + lead}"
            if None in row:
                raise PromptFileError(f"{where}: more cells than header columns")
            if any(v is None for v in row.values()):
                raise PromptFileError(f"{where}: fewer cells than header columns")
            cells = {k.strip(): v for k, v in row.items() if v.strip() != ""}
            if not cells:
                continue
            specs.append(_spec(cells, where, reader.line_num + lead))
    except csv.Error as e:
        raise PromptFileError(f"{path}:{reader.line_num + lead}: malformed CSV ({e})") from None
    return specs


READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}


def load_prompts(path: str | Path) -> list[PromptSpec]:
    """Read a prompt file; raise `PromptFileError` if it is missing, empty or malformed."""
    path = Path(path)
    problem = input_file_problem(path, "prompt file")
    if problem is not None:
        raise PromptFileError(problem)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(f"{path}: unsupported prompt file type {path.suffix!r}; use one of {', '.join(READERS)}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text ({e})") from None
    specs = reader(path, text)
    if not specs:
        raise PromptFileError(f"{path}: no prompts in the file")
    return specs


def slugify(text: str, max_len: int = 40) -> str:
    """A short filesystem-safe ASCII slug of `text` ("A red ball!" -> "a-red-ball")."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "prompt"
