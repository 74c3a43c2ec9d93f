"""Manifest files (ARCHITECTURE.md section 5): JSONL (one JSON object per line) or CSV with the same columns.
Paths are relative to the manifest; every modality is optional per row.

In CSV an empty cell means the field is absent and several caption references are separated by ``|``
(``a seven|the digit seven``). Labels are class names or integers, in both formats.

Every problem is reported as ``<manifest>:<line>: field '<name>': <what is wrong>``.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimoe.config import MODALITY_NAMES
from multimoe.data.files import header_problem

FILE_FIELDS = tuple(m for m in MODALITY_NAMES if m != "text")  # modalities given as a file path
FIELDS = ("id", *MODALITY_NAMES, "label", "caption")
CAPTION_SEPARATOR = "|"


class ManifestError(ValueError):
    """A manifest row is wrong; the message names the file, the line and the field."""

    line: int = 0  # the row's line, when the error is about one row

    @classmethod
    def at(cls, path: str | Path, line: int, field: str, message: str) -> ManifestError:
        error = cls(f"{path}:{line}: field '{field}': {message}")
        error.line = line
        return error


@dataclass(frozen=True)
class ManifestRow:
    id: str
    source: Path  # the manifest file
    line: int  # 1-based line in that file
    text: str | None = None
    image: Path | None = None
    audio: Path | None = None
    label: str | None = None
    captions: list[str] = field(default_factory=list)

    def error(self, field: str, message: str) -> ManifestError:
        return ManifestError.at(self.source, self.line, field, message)


def read_manifest(
    path: str | Path, labels: list[str] | None = None, skip_bad_rows: bool = False
) -> list[ManifestRow]:
    """The good rows of a manifest (``scan_manifest``). A bad row raises, naming it and counting the others,
    unless ``skip_bad_rows``: then bad rows are left out with a warning that says how many."""
    path = Path(path)
    rows, errors = scan_manifest(path, labels)
    if errors and not skip_bad_rows:
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise ManifestError(f"{errors[0]}{more}")
    if errors:
        warnings.warn(
            f"{path}: skipped {len(errors)} bad rows of {len(rows) + len(errors)}; the first: {errors[0]}",
            stacklevel=2,
        )
    if not rows:
        raise ManifestError.at(path, 1, "<row>", "no good rows left")
    return rows


def scan_manifest(
    path: str | Path, labels: list[str] | None = None
) -> tuple[list[ManifestRow], list[ManifestError]]:
    """Parse every row and check it: types, files exist and their headers read, ids unique, and, when
    ``labels`` is given, labels in that set. Returns the good rows and one error per bad row."""
    path = Path(path)
    if (problem := path_problem(path)) is not None:
        raise FileNotFoundError(f"manifest {path}: {problem}")
    rows: list[ManifestRow] = []
    errors: list[ManifestError] = []
    seen: dict[str, int] = {}
    checked: dict[
        tuple[str, Path], str | None
    ] = {}  # header check of each file once (rows often share files)
    known = set(labels) if labels else None
    for line_no, values in _records(path):
        try:
            row = parse_row(values, path, line_no)
            if row.id in seen:
                raise row.error("id", f"duplicate id {row.id!r} (first on line {seen[row.id]})")
            for name in FILE_FIELDS:
                file = getattr(row, name)
                if file is not None:
                    if (name, file) not in checked:
                        checked[name, file] = header_problem(name, file)
                    if checked[name, file] is not None:
                        raise row.error(name, f"{file}: {checked[name, file]}")
            if known is not None and row.label is not None and row.label not in known:
                shown = ", ".join(labels[:20] if labels else [])
                raise row.error("label", f"unknown label {row.label!r}; the model's labels are: {shown}")
        except ManifestError as error:
            errors.append(error)
            continue
        seen[row.id] = line_no
        rows.append(row)
    if not rows and not errors:
        errors.append(ManifestError.at(path, 1, "<row>", "the manifest has no rows"))
    return rows, errors


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | ManifestError]]:
    """``(line, field values)`` per row of a JSONL or CSV file (UTF-8, with or without a byte-order mark), or
    the error that row's syntax gives."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        yield line, ManifestError.at(path, line, "<row>", f"not UTF-8 text (byte {data[error.start]:#04x})")
        return
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path, text)
    else:
        yield from _jsonl_records(path, text)


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | ManifestError]]:
    """A header of known, distinct columns, then rows of exactly as many cells. A cell never holds a line
    break: a quote left open would otherwise swallow the rows after it."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None:
        return
    names = [name.strip() for name in header]
    unknown = [name for name in names if name not in FIELDS]
    twice = sorted({name for name in names if names.count(name) > 1})
    if unknown or twice or reader.line_num > 1:
        problem = (
            f"unknown column; allowed: {', '.join(FIELDS)}"
            if unknown
            else "the header spans several lines (a quote left open?)"
            if reader.line_num > 1
            else "the column appears twice in the header"
        )
        yield 1, ManifestError.at(path, 1, (unknown or twice or ["<header>"])[0], problem)
        return
    line = 1
    while True:
        start = line + 1
        try:
            cells = next(reader, None)
        except csv.Error as error:
            yield start, ManifestError.at(path, start, "<row>", f"not valid CSV ({error})")
            return
        if cells is None:
            return
        line = reader.line_num
        if line > start:
            yield (
                start,
                ManifestError.at(
                    path, start, "<row>", f"a quoted cell runs over lines {start}-{line} (a quote left open?)"
                ),
            )
            continue
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        if len(cells) != len(names):
            yield (
                start,
                ManifestError.at(
                    path, start, "<row>", f"{len(cells)} cells, but the header has {len(names)} columns"
                ),
            )
            continue
        values: dict[str, Any] = {k: v for k, v in zip(names, cells, strict=True) if v != ""}
        if "caption" in values:
            values["caption"] = values["caption"].split(CAPTION_SEPARATOR)
        yield start, values


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | ManifestError]]:
    if text.lstrip().startswith("["):
        yield 1, ManifestError.at(path, 1, "<row>", "a JSON array: a manifest holds one JSON object per line")
        return
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line, object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError as e:
            yield (
                line_no,
                ManifestError.at(path, line_no, "<row>", f"not valid JSON ({e.msg} at column {e.colno})"),
            )
            continue
        except _RepeatedKey as e:
            yield line_no, ManifestError.at(path, line_no, str(e), "the field appears twice in the row")
            continue
        if not isinstance(obj, dict):
            problem = f"expected a JSON object, got {type(obj).__name__}"
            yield line_no, ManifestError.at(path, line_no, "<row>", problem)
            continue
        yield line_no, obj


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _RepeatedKey(key)
    return dict(pairs)


def path_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable file (``None`` if it is): missing, a folder, a broken symlink or a
    symlink loop, each named as what it is."""
    try:
        if path.is_file():
            return None
        if path.is_dir():
            return "a folder, not a file"
        if path.is_symlink():
            try:
                os.stat(path)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    return "a symlink loop"
            return f"a broken symlink (to {os.readlink(path)})"
    except OSError as error:  # ELOOP and the like
        return f"cannot be opened ({error.strerror or error})"
    hint = " (a Windows path? use /)" if "\\" in str(path) else ""
    return f"file not found{hint}"


def parse_row(obj: dict[str, Any] | ManifestError, path: Path, line_no: int) -> ManifestRow:
    """One row's field values (parsed JSON, or CSV cells) -> a checked ``ManifestRow``."""
    if isinstance(obj, ManifestError):
        raise obj

    def fail(name: str, message: str) -> ManifestError:
        return ManifestError.at(path, line_no, name, message)

    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field; allowed: {', '.join(FIELDS)}")
    values = {name: value for name, value in obj.items() if value is not None}
    if not any(name in values for name in MODALITY_NAMES):
        raise fail("<row>", f"has none of the modalities {', '.join(MODALITY_NAMES)}")

    row_id = values.get("id", f"{path.stem}-{line_no}")
    if not isinstance(row_id, str | int) or isinstance(row_id, bool) or str(row_id) == "":
        raise fail("id", f"expected a non-empty string, got {row_id!r}")
    text = values.get("text")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise fail("text", f"expected a non-empty string, got {text!r}")
    label = values.get("label")
    if label is not None and (
        not isinstance(label, str | int) or isinstance(label, bool) or str(label) == ""
    ):
        raise fail("label", f"expected a class name (string) or integer, got {label!r}")
    if label is not None and str(label) != str(label).strip():
        raise fail("label", f"{label!r} has spaces around it (cells written with ', ' between them?)")
    captions = values.get("caption", [])
    captions = [captions] if isinstance(captions, str) else captions
    if not isinstance(captions, list) or not all(isinstance(c, str) and c.strip() for c in captions):
        raise fail("caption", "expected a non-empty string or a list of non-empty strings")
    files = {}
    for name in FILE_FIELDS:
        if name not in values:
            continue
        if not isinstance(values[name], str) or not values[name]:
            raise fail(name, f"expected a file path relative to the manifest, got {values[name]!r}")
        file = path.parent / values[name]
        if (problem := path_problem(file)) is not None:
            raise fail(name, f"{problem}: {file}")
        files[name] = file
    return ManifestRow(
        id=str(row_id),
        source=path,
        line=line_no,
        text=text,
        image=files.get("image"),
        audio=files.get("audio"),
        label=None if label is None else str(label),
        captions=list(captions),
    )


def label_set(rows: list[ManifestRow]) -> list[str]:
    """Sorted class names (integers in numeric order), as stored with the model."""
    names = {row.label for row in rows if row.label is not None}
    return sorted(names, key=lambda n: (0, int(n), "") if n.lstrip("-").isdigit() else (1, 0, n))
