"""train.py as a user runs it: train, evaluate a hand-written manifest; bad input ends with one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from multimoe.tokenizer import SPECIALS
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
    from multimoe.model import MultiMoE

    checkpoint, _ = trained
    model = MultiMoE.from_checkpoint(checkpoint)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert (
        model.labels == ["even", "odd"] and model.classifier is not None and model.vocab[:4] == list(SPECIALS)
    )
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in model.state_dict().items())
    assert MultiMoE.from_pretrained(checkpoint).labels == model.labels  # the one door takes a .ckpt too


def relabel(source: Path, target: Path, label: Callable[[dict], str]) -> Path:
    """``source``'s rows with other labels, in a manifest beside it (its relative paths still hold)."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.write_text("".join(json.dumps(r | {"label": label(r)}) + "\n" for r in rows))
    return target


def size(row: dict) -> str:
    return "big" if int(row["caption"].split()[2].rstrip(",")) >= 5 else "small"  # the handwritten digit


@pytest.mark.slow
def test_evaluation_needs_only_the_checkpoint_and_the_data_it_evaluates(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """Trained on a custom label set whose manifest is then moved away; test and predict with another
    manifest read labels and vocabulary from the checkpoint, even when a training manifest of another label
    set of the same size is named (its labels would give wrong class names)."""
    folder = digit_manifests["train"].parent
    train = relabel(digit_manifests["train"], folder / "sizes-train.jsonl", size)
    other = relabel(digit_manifests["test"], folder / "sizes-test.jsonl", size)
    fit = run(
        "fit",
        "--config=configs/tiny.yaml",
        f"--data.train_manifest={train}",
        f"--data.val_manifest={train}",
        "--data.test_manifest=null",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    moved = train.rename(tmp_path / "elsewhere.jsonl")
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    for train_manifest in [str(train), str(digit_manifests["train"])]:  # gone; even/odd labels
        common = ["--config=configs/tiny.yaml", f"--data.train_manifest={train_manifest}"]
        common += [f"--ckpt_path={checkpoint}", f"--data.test_manifest={other}"]
        metrics = tmp_path / "metrics.json"
        test = run("test", *common, f"--metrics_file={metrics}")
        assert test.returncode == 0, test.stderr[-3000:]
        assert json.loads(metrics.read_text())["classification"]["labels"] == ["big", "small"]
        if train_manifest != str(train):
            continue
        predict = run("predict", *common, f"--trainer.default_root_dir={tmp_path}")
        assert predict.returncode == 0, predict.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
        truth = {r["id"]: r["label"] for r in map(json.loads, other.read_text().splitlines())}
        assert {r["label"] for r in rows} <= {"big", "small"} and len(rows) == len(truth)
        accuracy = sum(r["label"] == truth[r["id"]] for r in rows) / len(rows)
        assert accuracy == pytest.approx(json.loads(metrics.read_text())["metrics"]["test/acc"], abs=1e-6)
    assert moved.is_file() and not train.exists()
