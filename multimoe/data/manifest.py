"""Manifest files (ARCHITECTURE.md section 5): JSONL (one JSON object per line) or CSV with the same columns.
Paths are relative to the manifest; every modality is optional per row.

In CSV an empty cell means the field is absent and several caption references are separated by ``|``
(``a seven|the digit seven``). Labels are class names or integers, in both formats.

Every problem is reported as ``<manifest>:<line>: field '<name>': <what is wrong>``.
"""

from __future__ import annotations

import csv
import json
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
        raise ManifestError.at(path, 1, "id", "the manifest has no rows")
    return rows


def scan_manifest(
    path: str | Path, labels: list[str] | None = None
) -> tuple[list[ManifestRow], list[ManifestError]]:
    """Parse every row and check it: types, files exist and their headers read, ids unique, and, when
    ``labels`` is given, labels in that set. Returns the good rows and one error per bad row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
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
    return rows, errors


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any] | ManifestError]]:
    """``(line, field values)`` per row of a JSONL or CSV file, or the error that row's syntax gives."""
    with path.open(encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            unknown = sorted(set(reader.fieldnames or []) - set(FIELDS))
            if unknown:
                yield (
                    1,
                    ManifestError.at(path, 1, unknown[0], f"unknown column; allowed: {', '.join(FIELDS)}"),
                )
                return
            for record in reader:
                if None in record:
                    yield (
                        reader.line_num,
                        ManifestError.at(path, reader.line_num, "<row>", "more cells than columns"),
                    )
                    continue
                values = {k: v for k, v in record.items() if v not in (None, "")}
                if "caption" in values:
                    values["caption"] = values["caption"].split(CAPTION_SEPARATOR)
                if values:
                    yield reader.line_num, values
            return
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                yield (
                    line_no,
                    ManifestError.at(path, line_no, "<row>", f"not valid JSON ({e.msg} at column {e.colno})"),
                )
                continue
            if not isinstance(obj, dict):
                yield (
                    line_no,
                    ManifestError.at(
                        path, line_no, "<row>", f"expected a JSON object, got {type(obj).__name__}"
                    ),
                )
                continue
            yield line_no, obj


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
        if not file.is_file():
            raise fail(name, f"file not found: {file}")
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
