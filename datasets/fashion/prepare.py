#!/usr/bin/env python
"""Build Fashion-MNIST as a manifest: 70,000 real 28x28 grey photos of clothing in 10 classes.

Usage: python datasets/fashion/prepare.py [--source DIR] [--out DIR] [--val N] [--limit N] [--seed 0]
           [--force]

``--source`` holds the four original files (``train-images-idx3-ubyte.gz`` and the others), as Debian's
``dataset-fashion-mnist`` package installs them (the default folder) or as github.com/zalandoresearch/
fashion-mnist publishes them. The original test set is the test split; ``--val`` images of the original
training set, drawn per class with ``--seed``, are the val split. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_util import build_atomically, run_main, write_manifest

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
ENTRIES = {"train.jsonl", "val.jsonl", "test.jsonl", "images"}


def read_idx(path: Path, kind: int) -> np.ndarray:
    """An IDX file (``kind`` 1: labels, 3: images) as uint8, checked against its own header."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (see --source)")
    data = gzip.decompress(path.read_bytes())
    magic, count = int.from_bytes(data[:4], "big"), int.from_bytes(data[4:8], "big")
    if magic != 0x800 + kind:
        raise ValueError(
            f"{path}: not an IDX file of {'labels' if kind == 1 else 'images'} (magic {magic:#x})"
        )
    shape = (
        (count,)
        if kind == 1
        else (count, int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big"))
    )
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * kind)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: holds {body.size} bytes of data, its header says {int(np.prod(shape))}")
    return body.reshape(shape)


def build(config: dict[str, Any], source: Path, tmp: Path) -> dict[str, Any]:
    splits: dict[str, list[dict[str, str]]] = {}
    for part in ("train", "t10k"):
        images = read_idx(source / f"{part}-images-idx3-ubyte.gz", 3)
        labels = read_idx(source / f"{part}-labels-idx1-ubyte.gz", 1)
        if len(images) != len(labels) or labels.max() >= len(CLASSES):
            raise ValueError(
                f"{source}: {part} has {len(images)} images and {len(labels)} labels in 0..{labels.max()}"
            )
        keep = np.arange(len(images))
        if config["limit"]:
            keep = keep[: config["limit"]]
        (tmp / "images" / part).mkdir(parents=True)
        rows = []
        for i in keep:
            name = f"images/{part}/{i:05d}.png"
            Image.fromarray(images[i]).save(tmp / name, optimize=False)
            rows.append({"id": f"{part}-{i:05d}", "image": name, "label": CLASSES[labels[i]]})
        if part == "t10k":
            splits["test"] = rows
            continue
        rng = np.random.default_rng(config["seed"])
        per_class = config["val"] // len(CLASSES)
        val = set()
        for c in range(len(CLASSES)):
            members = [j for j, row in enumerate(rows) if row["label"] == CLASSES[c]]
            val |= set(rng.permutation(members)[:per_class].tolist())
        splits["train"] = [row for j, row in enumerate(rows) if j not in val]
        splits["val"] = [row for j, row in enumerate(rows) if j in val]
    for split, rows in splits.items():
        write_manifest(tmp / f"{split}.jsonl", rows)
    return {"counts": {split: len(rows) for split, rows in splits.items()}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=DEBIAN, help="folder of the four .gz files")
    parser.add_argument("--out", type=Path, default=HERE / "data")
    parser.add_argument("--val", type=int, default=5000, help="val images drawn from the training set")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of each file (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = {"format": FORMAT_VERSION, "val": args.val, "limit": args.limit, "seed": args.seed}
    meta = build_atomically(
        args.out, config, lambda tmp: build(config, args.source, tmp), ENTRIES, args.force
    )
    print(f"{args.out}: " + ("up to date" if meta is None else f"{meta['counts']}"))
    return 0


if __name__ == "__main__":
    run_main(main)
