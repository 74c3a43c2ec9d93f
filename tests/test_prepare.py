"""The built-in dataset builder: real digits and speech, deterministic, idempotent, valid manifests."""

from __future__ import annotations

import filecmp
import gzip
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile
from PIL import Image

from multimoe.data.manifest import label_set, read_manifest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--train", "40", "--val", "12", "--test", "12", "--utterances-per-digit", "2", "1", "1"]


def prepare(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "datasets/mmdigits/prepare.py", "--out", str(out), *SMALL, *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("espeakng_loader")
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("mmdigits") / "data"
    prepare(out)
    return out


def test_manifests_are_valid_and_labels_are_sums(built: Path) -> None:
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for split, count in [("train", 40), ("val", 12), ("test", 12)]:
        rows = read_manifest(built / f"{split}.jsonl")  # every file exists, every field well typed
        assert len(rows) == count
        for row in rows:
            caption = row.captions[0]
            digits = [int(caption.split("handwritten ")[1][0])] if row.image else []
            digits += [words.index(caption.split("spoken ")[1].split()[0].strip(","))] if row.audio else []
            digits += [words.index(row.text)] if row.text else []
            assert row.label == str(sum(digits))
    assert set(label_set(read_manifest(built / "train.jsonl"))) <= {str(i) for i in range(28)}


def test_audio_is_real_speech_at_the_recorded_rate(built: Path) -> None:
    wav = sorted((built / "audio").glob("*.wav"))[0]
    data, rate = soundfile.read(wav)
    assert rate == 22050 and 0.1 < len(data) / rate < 2.0 and abs(data).max() > 0.05


def test_build_is_deterministic_and_idempotent(built: Path, tmp_path: Path) -> None:
    again = tmp_path / "data"
    prepare(again)
    comparison = filecmp.dircmp(built, again)
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in ("images", "audio"):
        sub_cmp = filecmp.dircmp(built / sub, again / sub)
        _, mismatch, errors = filecmp.cmpfiles(built / sub, again / sub, sub_cmp.common_files, shallow=False)
        assert not mismatch and not errors
    start = time.perf_counter()
    result = prepare(again)
    assert "up to date" in result.stdout and time.perf_counter() - start < 10


# ---- avmnist: real MNIST images + real FSDD speech, speaker-independent splits ---------------------------
SHARED_DATA = ROOT.parent / "shared" / "data"


def prepare_avmnist(out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "datasets/avmnist/prepare.py", "--source", str(SHARED_DATA), "--out", str(out)]
    command += ["--limit", "40", *extra]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=check, timeout=300)


@pytest.fixture(scope="module")
def avmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    out = tmp_path_factory.mktemp("avmnist") / "data"
    prepare_avmnist(out)
    return out


def test_avmnist_splits_by_speaker_and_image(avmnist: Path) -> None:
    speakers, images = {}, {}
    for split in ("train", "val", "test"):
        rows = read_manifest(avmnist / f"{split}.jsonl")
        assert len(rows) == 40
        for row in rows:
            assert row.image and row.audio and row.label
            digit = row.audio.stem.split("_")[0]  # FSDD names: <digit>_<speaker>_<n>.wav
            assert row.label == digit == row.image.name.split("_")[0]
            assert soundfile.info(row.audio).samplerate == 8000
        speakers[split] = {row.audio.stem.split("_")[1] for row in rows if row.audio}
        images[split] = {row.image.name for row in rows if row.image}
    assert speakers["val"] == {"lucas"} and speakers["test"] == {"yweweler"}
    assert not speakers["train"] & (speakers["val"] | speakers["test"]) and len(speakers["train"]) == 3
    assert not images["train"] & images["val"] and not images["train"] & images["test"]
    assert not images["val"] & images["test"]


def test_avmnist_build_is_deterministic_and_checks_speakers(avmnist: Path, tmp_path: Path) -> None:
    again = tmp_path / "data"
    prepare_avmnist(again)
    comparison = filecmp.dircmp(avmnist, again)
    assert not comparison.diff_files and not comparison.left_only and not comparison.right_only
    for sub in ("images", "audio"):
        names = sorted(p.name for p in (avmnist / sub).iterdir())
        _, mismatch, errors = filecmp.cmpfiles(avmnist / sub, again / sub, names, shallow=False)
        assert not mismatch and not errors
    assert "up to date" in prepare_avmnist(again).stdout
    bad = prepare_avmnist(tmp_path / "bad", "--test-speakers", "nobody", check=False)
    assert bad.returncode == 1 and "unknown speakers ['nobody']" in bad.stderr


# ---- tuxpaint: the parser and the build on tiny stamps written here; the installed package when present ----
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", ROOT / "datasets" / name / "prepare.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tuxpaint_description_parser() -> None:
    parse = load_script("tuxpaint").parse_description
    text = "A  colour   pencil.\nfr.utf8=Un crayon.\nen_GB.utf8=A colour pencil.\nen_AU.utf8=A pencil.\n"
    assert parse(text) == ["A colour pencil.", "A pencil."]
    assert parse("A calculator.  6x7=42\nde.utf8=Ein Taschenrechner.\n") == ["A calculator. 6x7=42"]
    assert parse("ca@valencia.utf8=Una bota.\n") == []


def write_stamp(folder: Path, name: str, caption: str, sound: bool = False, png: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text(f"{caption}\nfr.utf8=Traduction.\n")
    if png:
        image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent, a red bar in the middle
        image.paste((255, 0, 0, 255), (10, 5, 30, 15))
        image.save(folder / f"{name}.png")
    else:
        (folder / f"{name}.svg").write_text("<svg/>")
    if sound:
        rng = np.random.default_rng(0)
        soundfile.write(folder / f"{name}.ogg", rng.uniform(-0.5, 0.5, (11025, 2)), 11025)


def test_tuxpaint_build_on_tiny_stamps(tmp_path: Path) -> None:
    source = tmp_path / "stamps"
    write_stamp(source / "animals", "frog", "A frog.\nen_GB.utf8=A green frog.", sound=True)
    write_stamp(source / "animals", "frog-1", "A frog.")
    write_stamp(source / "food", "pear", "A pear.", png=False)  # SVG only: skipped
    for folder, name in [("food", "apple"), ("town", "house"), ("plants", "tree"), ("space", "moon")]:
        write_stamp(source / folder, name, f"A {name}.")
    out = tmp_path / "data"
    command = [sys.executable, "datasets/tuxpaint/prepare.py", "--source", str(source), "--out", str(out)]
    command += ["--image-size", "16", "--max-seconds", "0.5"]
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    rows = {
        row.id: (split, row)
        for split in ("train", "val", "test")
        for row in read_manifest(out / f"{split}.jsonl")
    }
    assert sorted(rows) == sorted(
        ["animals/frog", "animals/frog-1", "food/apple", "town/house", "plants/tree", "space/moon"]
    )
    assert rows["animals/frog"][0] == rows["animals/frog-1"][0]  # variants of a stamp share a split
    assert {split for split, _ in rows.values()} == {"train", "val", "test"}
    frog = rows["animals/frog"][1]
    assert frog.captions == ["A frog.", "A green frog."] and frog.label == "animals"
    assert frog.audio and rows["food/apple"][1].audio is None
    data, rate = soundfile.read(frog.audio)
    assert rate == 11025 and data.shape == (11025 // 2,)  # mono, cut at --max-seconds
    assert frog.image
    with Image.open(frog.image) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((8, 8))[0] > 200
    assert json.loads((out / "build.json").read_text())["skipped"]["no_png"] == 1


def test_tuxpaint_installed_descriptions_all_have_english() -> None:
    if not TUXPAINT_STAMPS.is_dir():
        pytest.skip(f"{TUXPAINT_STAMPS} not found: apt-get install tuxpaint-stamps-default to run this test")
    parse = load_script("tuxpaint").parse_description
    texts = sorted(TUXPAINT_STAMPS.rglob("*.txt"))
    captions = [parse(t.read_text(encoding="utf-8", errors="replace")) for t in texts]
    assert len(texts) > 900 and all(captions)
    assert not any(".utf8=" in c for caps in captions for c in caps)


# ---- emoji: Unicode's emoji-test.txt parser; a tiny build with the installed Noto Color Emoji font -------
NOTO_EMOJI = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = """\
# group: Smileys & Emotion
1F600                                      ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face
1F642 200D 2194 FE0F                       ; fully-qualified     # 🙂‍↔️ E15.1 head shaking horizontally
# group: People & Body
1F44D                                      ; fully-qualified     # 👍 E0.6 thumbs up
1F44D 1F3FD                                ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone
1F468 200D 1F469 200D 1F467                ; fully-qualified     # 👨‍👩‍👧 E2.0 family: man, woman, girl
# group: Component
1F3FB                                      ; component           # 🏻 E1.0 light skin tone
1F9B0                                      ; component           # 🦰 E11.0 red hair
# group: Flags
1F1EB 1F1F7                                ; fully-qualified     # 🇫🇷 E2.0 flag: France
# group: Objects
1FAE9                                      ; fully-qualified     # ? E16.0 face with bags under eyes
1F642 200D 1FAE9                           ; fully-qualified     # ? E99.0 made-up sequence
"""


def test_emoji_test_parser() -> None:
    emoji = load_script("emoji").parse_emoji_test(EMOJI_TEST)
    assert [e.name for e in emoji] == [
        "grinning face",
        "smiling face",
        "head shaking horizontally",
        "thumbs up",
        "family: man, woman, girl",
        "flag: France",
        "face with bags under eyes",
        "made-up sequence",
    ]  # unqualified, skin-tone and component lines skipped
    assert emoji[1].codepoints == (0x263A, 0xFE0F) and emoji[1].group == "Smileys & Emotion"
    assert emoji[1].captions == ["smiling face", "white smiling face"]  # CLDR name, then Unicode's
    assert emoji[0].captions == ["grinning face"] and emoji[5].captions == ["flag: France"]


def test_emoji_build_renders_the_installed_font(tmp_path: Path) -> None:
    if not NOTO_EMOJI.is_file():
        pytest.skip(f"{NOTO_EMOJI} not found: apt-get install fonts-noto-color-emoji to run this test")
    (tmp_path / "emoji-test.txt").write_text(EMOJI_TEST)
    out = tmp_path / "data"
    command = [sys.executable, "datasets/emoji/prepare.py", "--emoji-test", str(tmp_path / "emoji-test.txt")]
    command += ["--out", str(out), "--image-size", "16"]
    subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=120)
    rows = {
        row.id: row for split in ("train", "val", "test") for row in read_manifest(out / f"{split}.jsonl")
    }
    assert sorted(rows) == [
        "1f1eb-1f1f7",
        "1f44d",
        "1f468-200d-1f469-200d-1f467",
        "1f600",
        "1f642-200d-2194-fe0f",
        "263a-fe0f",
    ]
    missing = json.loads((out / "build.json").read_text())["missing_glyphs"]
    assert sorted(missing) == [
        "face with bags under eyes",
        "made-up sequence",
    ]  # not in the font (Emoji 15.1)
    assert rows["1f44d"].label == "People & Body" and rows["1f44d"].captions == [
        "thumbs up",
        "thumbs up sign",
    ]
    assert rows["1f600"].image
    with Image.open(rows["1f600"].image) as image:
        pixels = np.asarray(image)
    assert image.size == (16, 16) and image.mode == "RGB"
    assert pixels[0, 0].tolist() == [255, 255, 255]  # white background
    assert (pixels[..., 0].astype(int) - pixels[..., 2]).max() > 100  # the grinning face is yellow


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as Fashion-MNIST ships it: gzip of magic (0x08 ubyte, rank), sizes, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_build_reads_idx_files_into_pngs_and_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    source = tmp_path / "source"
    source.mkdir()
    data = {}
    for part, count in (("train", 60), ("t10k", 20)):
        data[part] = (rng.integers(0, 256, (count, 28, 28)), np.arange(count) % 10)
        write_idx(source / f"{part}-images-idx3-ubyte.gz", data[part][0])
        write_idx(source / f"{part}-labels-idx1-ubyte.gz", data[part][1])
    out = tmp_path / "data"
    command = [sys.executable, "datasets/fashion/prepare.py", "--source", str(source), "--out", str(out)]
    subprocess.run([*command, "--val", "20"], cwd=ROOT, check=True, capture_output=True, timeout=120)
    splits = ("train", "val", "test")
    rows = {split: [json.loads(line) for line in (out / f"{split}.jsonl").open()] for split in splits}
    assert [len(rows[s]) for s in splits] == [40, 20, 20]
    assert {r["id"] for r in rows["train"]}.isdisjoint(r["id"] for r in rows["val"])
    assert len({r["label"] for r in rows["val"]}) == 10  # two of every class
    for split, part in (("val", "train"), ("test", "t10k")):
        for row in rows[split]:
            index = int(row["id"].split("-")[1])
            assert np.array_equal(np.asarray(Image.open(out / row["image"])), data[part][0][index])
    read_manifest(out / "train.jsonl")  # a valid manifest

    (source / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + bytes(12)))
    bad = subprocess.run([*command, "--force"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "t10k-labels-idx1-ubyte.gz: not an IDX file of labels" in bad.stderr
