"""Evaluation commands on a model trained by train.py: the metrics JSON of fit/test, predictions, and
``python -m multimoe.tools.infer`` on real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multimoe.data.collate import Collator
from multimoe.data.dataset import ManifestDataset
from multimoe.data.manifest import read_manifest
from multimoe.model import MultiMoE
from multimoe.tools.infer import main as infer_main
from tests.conftest import ROOT, SHARED_DATA

IMAGE = SHARED_DATA / "mnist" / "3" / "0000.png"
AUDIO = SHARED_DATA / "fsdd" / "recordings" / "7_jackson_0.wav"


def test_fit_writes_the_test_metrics_beside_the_best_checkpoint(trained: tuple[Path, list[str]]) -> None:
    checkpoint, _ = trained
    [path] = checkpoint.parent.glob("best-*.ckpt.metrics.json")
    report = json.loads(path.read_text())
    classification = report["classification"]
    assert classification["labels"] == ["even", "odd"]
    assert classification["accuracy"] == pytest.approx(report["metrics"]["test/acc"], abs=1e-6)
    assert classification["macro_f1"] == pytest.approx(report["metrics"]["test/macro_f1"], abs=1e-6)
    confusion = classification["confusion_matrix"]
    support = {name: c["support"] for name, c in classification["per_class"].items()}
    assert sum(map(sum, confusion)) == sum(support.values()) == 16  # every test row is labelled
    assert set(report["captions"]) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider_d", "rouge_l"}
    assert report["generation"]["strategy"] == "greedy"


@pytest.mark.slow
def test_test_command_writes_metrics_where_asked_with_beam_search(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    checkpoint, data = trained
    out = tmp_path / "deep" / "beam.json"
    command = [sys.executable, "train.py", "test", "--config", "configs/tiny.yaml", *data]
    command += [f"--ckpt_path={checkpoint}", f"--metrics_file={out}"]
    command += ["--model.generation.strategy=beam", "--model.generation.num_beams=2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(checkpoint)
    assert report["generation"]["strategy"] == "beam" and report["generation"]["num_beams"] == 2
    assert 0.0 <= report["captions"]["bleu4"] <= 1.0 and report["metrics"]["test/bleu4"] == pytest.approx(
        report["captions"]["bleu4"]
    )


def test_infer_prints_label_probability_and_caption(
    trained: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """What infer prints is what the model gives the same files read through a manifest."""
    checkpoint, _ = trained
    args = [str(checkpoint), "--image", str(IMAGE), "--audio", str(AUDIO), "--text", "four"]
    infer_main(args)
    greedy = json.loads(capsys.readouterr().out)
    model = MultiMoE.from_checkpoint(checkpoint).eval()
    manifest = tmp_path / "one.jsonl"
    manifest.write_text(
        json.dumps({"id": "x", "image": str(IMAGE), "audio": str(AUDIO), "text": "four"}) + "\n"
    )
    assert model.words is not None
    dataset = ManifestDataset.for_model(read_manifest(manifest), model.config, model.labels, model.words)
    batch = Collator.for_model(model.config, model.words)([dataset[0]])
    assert greedy == model.predict(batch.inputs)[0] and greedy["label"] in ("even", "odd")
    infer_main([*args, "--strategy", "sample", "--seed", "1", "--top_k", "1"])  # top-1 sampling is greedy
    assert json.loads(capsys.readouterr().out) == greedy
    infer_main([str(checkpoint), "--text", "four"])  # one modality is enough
    assert json.loads(capsys.readouterr().out)["label"] in ("even", "odd")


def test_infer_names_the_bad_input(
    trained: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, _ = trained
    for args, message in [
        (["--image", "nowhere.png"], "error: --image nowhere.png: file not found"),
        (["--audio", str(IMAGE)], f"error: --audio {IMAGE}: cannot read it"),
        ([], "error: give at least one of the model's inputs"),
        (["--text", " \t"], "error: --text: expected non-empty text"),  # no answer from no input
        (["--text", "four", "--top_p", "0"], "error: GenerationConfig.top_p"),
    ]:
        with pytest.raises(SystemExit) as stop:
            infer_main([str(checkpoint), *args])
        assert stop.value.code == 2 and capsys.readouterr().err.startswith(message)
