"""Shared fixtures: small manifests of real data from ../shared/data (MNIST digits and FSDD recordings), and a
model trained on them by train.py."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing may download in tests: a hub access fails at once instead of reaching for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digit_manifest(path: Path, count: int, seed: int) -> Path:
    """Rows of a real MNIST image, a real FSDD recording and a digit word; label = parity of their sum.

    Files are referenced from ../shared/data through relative paths, as a user's manifest would.
    """
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    rng = random.Random(seed)
    recordings = sorted((SHARED_DATA / "fsdd" / "recordings").glob("*.wav"))
    rows = []
    for i in range(count):
        a, b, c = rng.randrange(10), rng.randrange(10), rng.randrange(10)
        image = sorted((SHARED_DATA / "mnist" / str(a)).glob("*.png"))[rng.randrange(50)]
        audio = [r for r in recordings if r.name.startswith(f"{b}_")][rng.randrange(50)]
        row = {
            "id": f"s{seed}-{i}",
            "image": _relative(image, path.parent),
            "audio": _relative(audio, path.parent),
            "text": WORDS[c],
            "label": ["even", "odd"][(a + b + c) % 2],
            "caption": f"a handwritten {a}, a spoken {WORDS[b]} and the word {WORDS[c]}",
        }
        if i % 5 == 4:  # some samples lack a modality
            del row[["image", "audio", "text"][i % 3]]
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _relative(target: Path, start: Path) -> str:
    import os

    return os.path.relpath(target, start)


@pytest.fixture(scope="session")
def digit_manifests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("manifests")
    return {
        "train": write_digit_manifest(folder / "train.jsonl", 48, seed=0),
        "val": write_digit_manifest(folder / "val.jsonl", 16, seed=1),
        "test": write_digit_manifest(folder / "test.jsonl", 16, seed=2),
    }


@pytest.fixture(scope="session")
def trained(
    digit_manifests: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    """``train.py fit`` with configs/tiny.yaml for a few steps: (last checkpoint, the data arguments)."""
    root = tmp_path_factory.mktemp("run")
    data = [f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()]
    command = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", *data]
    command += [f"--trainer.default_root_dir={root}", "--trainer.limit_train_batches=3"]
    command += ["--trainer.limit_val_batches=1"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "multimoe summary" in result.stdout and "test/acc" in result.stdout
    checkpoints = sorted((root / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} >= {"last.ckpt"} and len(checkpoints) == 2
    return root / "checkpoints" / "last.ckpt", data
