#!/usr/bin/env python
"""Build Tux Paint stamps: real clip art + the stamp's sound effect -> its hand-written English description.

Usage: python datasets/tuxpaint/prepare.py [--source DIR] [--out DIR] [--image-size 64] [--max-seconds 4]
           [--seed 0] [--force]

Reads the stamps of Debian's tuxpaint-stamps-default package (apt-get install tuxpaint-stamps-default), which
installs them under /usr/share/tuxpaint/stamps. See README.md next to this file.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_util import SPLITS, build_atomically, run_main, write_manifest

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = Path("/usr/share/tuxpaint/stamps")
HOLDOUT = 0.1  # share of the stamps in val and in test
ENTRIES = {f"{split}.jsonl" for split in SPLITS} | {"images", "audio"}
VARIANT_SUFFIX = re.compile(r"[-_ ]*\d+$")
LOCALE_LINE = re.compile(r"^([a-z]{2,3}(?:_[A-Z]{2})?(?:@[a-z]+)?)\.utf8=(.*)$")


@dataclass(frozen=True)
class Stamp:
    name: str  # path below the source folder without suffix, e.g. "animals/amphibians/frog"
    image: Path
    sound: Path | None
    captions: list[str]

    @property
    def category(self) -> str:
        return self.name.split("/")[0]

    @property
    def family(self) -> str:
        """Variants of one stamp (frog, frog-1; tux-yes1, tux-yes2) share a family and a split."""
        folder, _, stem = self.name.rpartition("/")
        return f"{folder}/{VARIANT_SUFFIX.sub('', stem) or stem}"


def parse_description(text: str) -> list[str]:
    """English captions of a stamp's .txt: the first line (untagged English) then the `en_XX.utf8=` lines,
    whitespace collapsed, duplicates dropped. Other `xx.utf8=` lines are translations and are skipped."""
    captions: list[str] = []
    for index, line in enumerate(text.splitlines()):
        tagged = LOCALE_LINE.match(line)
        if tagged and tagged.group(1).split("_")[0] == "en":
            line = tagged.group(2)
        elif tagged or index > 0:
            continue
        caption = " ".join(line.split())
        if caption and caption not in captions:
            captions.append(caption)
    return captions


def find_stamps(source: Path) -> tuple[list[Stamp], dict[str, int]]:
    """Every stamp with a description and a PNG image, sorted by name; counts of the ones skipped."""
    stamps, skipped = [], {"no_png": 0, "no_english_caption": 0}
    for txt in sorted(source.rglob("*.txt")):
        image = txt.with_suffix(".png")
        if not image.is_file():
            skipped["no_png"] += 1  # SVG-only stamps: reading SVG needs a renderer we don't depend on
            continue
        captions = parse_description(txt.read_text(encoding="utf-8", errors="replace"))
        if not captions:
            skipped["no_english_caption"] += 1
            continue
        sounds = [p for p in (txt.with_suffix(".ogg"), txt.with_suffix(".wav")) if p.is_file()]
        name = txt.relative_to(source).with_suffix("").as_posix()
        stamps.append(Stamp(name, image, sounds[0] if sounds else None, captions))
    if not stamps:
        raise FileNotFoundError(f"{source}: no stamps (<name>.txt next to <name>.png) found")
    return stamps, skipped


def split_stamps(stamps: list[Stamp], seed: int) -> dict[str, list[Stamp]]:
    """Seeded split by family: about 10% of the stamps in test, 10% in val, the rest in train."""
    families = sorted({s.family for s in stamps})
    order = [families[i] for i in np.random.default_rng([seed, 0]).permutation(len(families))]
    target = HOLDOUT * len(stamps)
    assigned: dict[str, str] = {}
    counts = {split: 0 for split in SPLITS}
    size = {f: sum(s.family == f for s in stamps) for f in families}
    for family in order:
        split = "test" if counts["test"] < target else "val" if counts["val"] < target else "train"
        assigned[family] = split
        counts[split] += size[family]
    splits = {split: [s for s in stamps if assigned[s.family] == split] for split in SPLITS}
    empty = [split for split, members in splits.items() if not members]
    if empty:
        raise ValueError(f"too few stamp families ({len(families)}) for non-empty splits {empty}")
    return splits


def write_image(src: Path, dst: Path, size: int) -> None:
    """RGBA clip art over white, scaled to fit `size` x `size` (aspect kept), centred on a white square."""
    from PIL import Image

    with Image.open(src) as file:
        image = file.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image).convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    square = Image.new("RGB", (size, size), (255, 255, 255))
    square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    square.save(dst)


def write_audio(src: Path, dst: Path, max_seconds: float) -> float:
    """The sound as mono 16-bit WAV at its own rate, cut at `max_seconds`; returns its duration."""
    import soundfile

    data, rate = soundfile.read(str(src), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)[: int(max_seconds * rate)]
    soundfile.write(str(dst), mono, rate, subtype="PCM_16")
    return len(mono) / rate


def build(config: dict[str, Any], source: Path, tmp: Path) -> dict[str, Any]:
    stamps, skipped = find_stamps(source)
    (tmp / "images").mkdir()
    (tmp / "audio").mkdir()
    counts = {}
    for split, members in split_stamps(stamps, config["seed"]).items():
        rows = []
        for stamp in members:
            file = stamp.name.replace("/", "__")
            row: dict[str, Any] = {"id": stamp.name, "image": f"images/{file}.png"}
            write_image(stamp.image, tmp / row["image"], config["image_size"])
            if stamp.sound is not None:
                row["audio"] = f"audio/{file}.wav"
                write_audio(stamp.sound, tmp / row["audio"], config["max_seconds"])
            captions = stamp.captions
            rows.append(
                row | {"label": stamp.category, "caption": captions[0] if len(captions) == 1 else captions}
            )
        write_manifest(tmp / f"{split}.jsonl", rows)
        counts[split] = {"stamps": len(rows), "with_sound": sum("audio" in r for r in rows)}
    return {"counts": counts, "skipped": skipped}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="stamps folder (default: %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels")
    p.add_argument("--max-seconds", type=float, default=4.0, help="cut longer sounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    args = p.parse_args(argv)
    if args.image_size < 8 or args.max_seconds <= 0:
        p.error("--image-size must be >= 8 and --max-seconds > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source: Path = args.source.resolve()
    if not source.is_dir():
        raise FileNotFoundError(
            f"stamps folder {source} not found: install Debian's tuxpaint-stamps-default "
            "(apt-get install tuxpaint-stamps-default) or pass --source DIR"
        )
    config = {
        "format_version": FORMAT_VERSION,
        "source": str(source),
        "image_size": args.image_size,
        "max_seconds": args.max_seconds,
        "seed": args.seed,
    }
    meta = build_atomically(args.out, config, lambda tmp: build(config, source, tmp), ENTRIES, args.force)
    if meta is None:
        print(f"{args.out} is up to date (remove it or pass --force to rebuild)")
        return 0
    for split, c in meta["counts"].items():
        print(f"{split:>5}: {c['stamps']:4d} stamps, {c['with_sound']} with a sound")
    print(f"skipped: {meta['skipped']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
