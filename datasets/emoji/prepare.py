#!/usr/bin/env python
"""Build Emoji: Noto Color Emoji glyphs -> their CLDR and Unicode names (caption) and emoji group (label).

Usage: python datasets/emoji/prepare.py [--font FILE] [--emoji-test FILE] [--out DIR] [--image-size 48]
           [--seed 0] [--force]

Reads Debian's fonts-noto-color-emoji and unicode-data packages by default (apt-get install
fonts-noto-color-emoji unicode-data). See README.md next to this file.
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_util import SPLITS, build_atomically, run_main, write_manifest

FORMAT_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_SIZE = 109  # the size of the font's bitmap strike (CBDT): other sizes are refused by FreeType
HOLDOUT = 0.1  # share of each group in val and in test
SKIN_TONES = range(0x1F3FB, 0x1F400)
ENTRIES = {f"{split}.jsonl" for split in SPLITS} | {"images"}
LINE = re.compile(r"^([0-9A-F ]+?)\s*; fully-qualified\s*# \S+ E\d+\.\d+ (.+)$")


@dataclass(frozen=True)
class Emoji:
    codepoints: tuple[int, ...]
    name: str  # the CLDR short name, e.g. "grinning face", "flag: France"
    group: str  # e.g. "Smileys & Emotion"

    @property
    def text(self) -> str:
        return "".join(map(chr, self.codepoints))

    @property
    def captions(self) -> list[str]:
        """The CLDR name, then the Unicode character name (one code point, lower case) if it differs."""
        base = [c for c in self.codepoints if c != 0xFE0F]  # the emoji presentation selector
        unicode_name = unicodedata.name(chr(base[0]), "").lower() if len(base) == 1 else ""
        return [self.name] + ([unicode_name] if unicode_name and unicode_name != self.name.lower() else [])


def parse_emoji_test(text: str) -> list[Emoji]:
    """Fully-qualified emoji of Unicode's emoji-test.txt, in its order, without skin-tone variants."""
    emoji, group = [], ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        match = LINE.match(line)
        if match:
            codepoints = tuple(int(c, 16) for c in match.group(1).split())
            if group != "Component" and not any(c in SKIN_TONES for c in codepoints):
                emoji.append(Emoji(codepoints, match.group(2).strip(), group))
    return emoji


def split_emoji(emoji: list[Emoji], seed: int) -> dict[str, list[Emoji]]:
    """Per group, a seeded 80/10/10 split."""
    splits: dict[str, list[Emoji]] = {split: [] for split in SPLITS}
    groups = sorted({e.group for e in emoji})
    for g, group in enumerate(groups):
        members = [e for e in emoji if e.group == group]
        members = [members[i] for i in np.random.default_rng([seed, g]).permutation(len(members))]
        n_hold = max(1, round(HOLDOUT * len(members)))
        splits["test"] += members[:n_hold]
        splits["val"] += members[n_hold : 2 * n_hold]
        splits["train"] += members[2 * n_hold :]
    return splits


class Renderer:
    """One emoji (a ZWJ sequence too, laid out by libraqm) on white, scaled to `size` x `size`."""

    def __init__(self, font: Path, size: int) -> None:
        from PIL import ImageFont, features

        if not features.check("raqm"):
            raise ValueError("Pillow was built without libraqm, needed to lay out emoji sequences")
        self.font = ImageFont.truetype(str(font), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        self.advance = self.font.getlength("\U0001f600")  # of one glyph: the grinning face
        self.size = size

    def __call__(self, text: str) -> Any:
        """The image, or None where the font has no glyph for `text`: nothing drawn, or a sequence that
        it lays out as several glyphs (parts of a newer ZWJ sequence, say)."""
        from PIL import Image, ImageDraw

        canvas = Image.new("RGBA", (3 * FONT_SIZE, 2 * FONT_SIZE), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((0, 0), text, font=self.font, embedded_color=True)
        box = canvas.getbbox()
        if box is None or self.font.getlength(text) > 1.5 * self.advance:
            return None
        glyph = canvas.crop(box)
        side = max(glyph.size)
        square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
        return square.convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)


def build(config: dict[str, Any], font: Path, emoji_test: Path, tmp: Path) -> dict[str, Any]:
    emoji = parse_emoji_test(emoji_test.read_text(encoding="utf-8"))
    render = Renderer(font, config["image_size"])
    (tmp / "images").mkdir()
    counts, missing = {}, []
    for split, members in split_emoji(emoji, config["seed"]).items():
        rows = []
        for e in members:
            image = render(e.text)
            if image is None:
                missing.append(e.name)
                continue
            row = {"id": "-".join(f"{c:04x}" for c in e.codepoints), "image": ""}
            row["image"] = f"images/{row['id']}.png"
            image.save(tmp / row["image"])
            captions = e.captions
            rows.append(row | {"label": e.group, "caption": captions[0] if len(captions) == 1 else captions})
        write_manifest(tmp / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    return {"counts": counts, "missing_glyphs": missing}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--font", type=Path, default=DEFAULT_FONT, help="a CBDT color emoji font (default: %(default)s)"
    )
    p.add_argument("--emoji-test", type=Path, default=DEFAULT_EMOJI_TEST, help="Unicode's emoji-test.txt")
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument("--image-size", type=int, default=48, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    args = p.parse_args(argv)
    if args.image_size < 8:
        p.error("--image-size must be >= 8")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    font, emoji_test = args.font.resolve(), args.emoji_test.resolve()
    for path, package in ((font, "fonts-noto-color-emoji"), (emoji_test, "unicode-data")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: apt-get install {package}, or pass its path")
    config = {
        "format_version": FORMAT_VERSION,
        "font": str(font),
        "emoji_test": str(emoji_test),
        "image_size": args.image_size,
        "seed": args.seed,
    }
    meta = build_atomically(
        args.out, config, lambda tmp: build(config, font, emoji_test, tmp), ENTRIES, args.force
    )
    if meta is None:
        print(f"{args.out} is up to date (remove it or pass --force to rebuild)")
        return 0
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    print(f"{counts} emoji; {len(meta['missing_glyphs'])} without a glyph in the font; wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
