"""The built-in dataset builder: real digits and speech, deterministic, idempotent, valid manifests."""

from __future__ import annotations

import filecmp
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

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
