"""train.py as a user runs it: train, evaluate a hand-written manifest; bad input ends with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_test_command_evaluates_a_hand_written_manifest(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    checkpoint, data = trained
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text(
        json.dumps(
            {
                "id": "a",
                "image": str(SHARED_DATA / "mnist/3/0000.png"),
                "text": "four",
                "label": "odd",
                "caption": "a handwritten 3 and the word four",
            }
        )
        + "\n"
        + json.dumps(
            {"id": "b", "audio": str(SHARED_DATA / "fsdd/recordings/2_jackson_0.wav"), "label": "even"}
        )
        + "\n"
    )
    result = run(
        "test",
        "--config",
        "configs/tiny.yaml",
        *data,
        f"--ckpt_path={checkpoint}",
        f"--data.test_manifest={manifest}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in result.stdout and "test/caption_exact" in result.stdout


@pytest.mark.slow
def test_bad_manifest_row_ends_with_file_line_and_field(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = digit_manifests["val"].read_text().splitlines()
    lines[2] = json.dumps({"id": "oops", "image": "nowhere.png", "label": "odd"})
    bad.write_text("\n".join(lines) + "\n")
    result = run(
        "fit",
        "--config",
        "configs/tiny.yaml",
        f"--data.train_manifest={digit_manifests['train']}",
        f"--data.val_manifest={bad}",
    )
    assert result.returncode == 2
    assert f"error: {bad}:3: field 'image': file not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_predict_writes_one_line_per_sample(trained: tuple[Path, list[str]], tmp_path: Path) -> None:
    checkpoint, data = trained
    result = run(
        "predict",
        "--config",
        "configs/tiny.yaml",
        *data,
        f"--ckpt_path={checkpoint}",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and {"id", "label", "probability", "caption"} <= set(lines[0])


def test_checkpoint_loads_as_a_library_model(trained: tuple[Path, list[str]]) -> None:
    from multimoe.lit_module import MultiMoEModule

    checkpoint, _ = trained
    module = MultiMoEModule.load_from_checkpoint(checkpoint)
    assert module.labels == ["even", "odd"] and module.model.classifier is not None
