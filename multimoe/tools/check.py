"""Check manifests before training: ``python -m multimoe.tools.check <manifest> [...] [--labels SOURCE]``.

Reports every bad row at once, one line each (``<manifest>:<line>: field '<name>': <what>``): bad JSON or
CSV, wrong types, empty text, unknown fields, duplicate ids, missing files, images and audio that do not
decode (corrupt, truncated, not an image or audio at all) and, with ``--labels``, labels the model does not
know. Exits 1 when it found a bad row, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multimoe.data.files import decode_problem
from multimoe.data.manifest import FILE_FIELDS, ManifestError, label_set, read_manifest, scan_manifest
from multimoe.pretrained import CheckpointError, read_checkpoint, saved_form


def check_manifest(path: str | Path, labels: list[str] | None = None) -> tuple[int, list[ManifestError]]:
    """``(number of rows, one error per bad row in line order)``; every image and audio file is decoded."""
    rows, errors = scan_manifest(path, labels)
    count = len(rows) + len(errors)
    decoded: dict[tuple[str, Path], str | None] = {}
    for row in rows:
        for name in FILE_FIELDS:
            file = getattr(row, name)
            if file is None:
                continue
            if (name, file) not in decoded:
                decoded[name, file] = decode_problem(name, file)
            if decoded[name, file] is not None:
                errors.append(row.error(name, f"{file}: {decoded[name, file]}"))
                break
    return count, sorted(errors, key=lambda e: e.line)


def load_labels(source: str) -> list[str]:
    """Class names from a training checkpoint (``.ckpt``), a saved model folder, a manifest (its label set) or
    a comma-separated list."""
    path = Path(source)
    if path.is_dir():
        return list(json.loads((path / "config.json").read_text())["labels"])
    if path.suffix == ".ckpt":
        saved, _ = saved_form(read_checkpoint(path), path)
        return list(saved["labels"])
    if path.is_file():
        return label_set(read_manifest(path))
    return [name.strip() for name in source.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("manifests", nargs="+", help="JSONL or CSV manifests")
    parser.add_argument(
        "--labels",
        help="the known labels: a checkpoint (.ckpt), a saved model folder, a training manifest, or a,b,c",
    )
    args = parser.parse_args(argv)
    try:
        labels = load_labels(args.labels) if args.labels else None
        bad = 0
        for manifest in args.manifests:
            count, errors = check_manifest(manifest, labels)
            for error in errors:
                print(error)
            print(f"{manifest}: {count} rows, {len(errors)} bad", file=sys.stderr)
            bad += len(errors)
    except (FileNotFoundError, ManifestError, CheckpointError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
