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
