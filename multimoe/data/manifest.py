"""Manifest files: one JSON object per line, paths relative to the manifest (ARCHITECTURE.md section 5).

Every problem is reported as ``<manifest>:<line>: field '<name>': <what is wrong>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIELDS = ("id", "image", "audio", "text", "label", "caption")
MODALITY_FIELDS = ("text", "image", "audio")


class ManifestError(ValueError):
    """A manifest row is wrong; the message names the file, the line and the field."""

    @classmethod
    def at(cls, path: str | Path, line: int, field: str, message: str) -> ManifestError:
        return cls(f"{path}:{line}: field '{field}': {message}")


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


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Parse and check every row (types, files exist, ids unique); raise on the first bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = parse_row(line, path, line_no)
            if row.id in seen:
                raise ManifestError.at(
                    path, line_no, "id", f"duplicate id {row.id!r} (first on line {seen[row.id]})"
                )
            seen[row.id] = line_no
            rows.append(row)
    if not rows:
        raise ManifestError.at(path, 1, "id", "the manifest has no rows")
    return rows


def parse_row(line: str, path: Path, line_no: int) -> ManifestRow:
    def fail(name: str, message: str) -> ManifestError:
        return ManifestError.at(path, line_no, name, message)

    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        raise fail("<row>", f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise fail("<row>", f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise fail(unknown[0], f"unknown field; allowed: {', '.join(FIELDS)}")
    values = {name: value for name, value in obj.items() if value is not None}
    if not any(name in values for name in MODALITY_FIELDS):
        raise fail("<row>", f"has none of the modalities {', '.join(MODALITY_FIELDS)}")

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
    for name in ("image", "audio"):
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
