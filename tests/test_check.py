"""Manifests as users write them (JSONL and CSV over real files), the checker, and bad rows before and
during training: a located error, or a counted skip with data.skip_bad_rows."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from multimoe.config import MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.data.manifest import ManifestError, read_manifest
from multimoe.tools.check import check_manifest, main
from tests.conftest import ROOT, SHARED_DATA

IMAGE = SHARED_DATA / "mnist/3/0000.png"
AUDIO = SHARED_DATA / "fsdd/recordings/7_jackson_0.wav"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Real files copied into a user's folder, plus broken ones made from them."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    (tmp_path / "img").mkdir()
    (tmp_path / "wav").mkdir()
    for i, digit in enumerate([3, 5, 8]):
        shutil.copy(SHARED_DATA / f"mnist/{digit}/0000.png", tmp_path / f"img/{i}.png")
        shutil.copy(SHARED_DATA / f"fsdd/recordings/{digit}_george_{i}.wav", tmp_path / f"wav/{i}.wav")
    png, wav = IMAGE.read_bytes(), AUDIO.read_bytes()
    (tmp_path / "img/cut.png").write_bytes(png[: len(png) // 2])  # header fine, pixel data cut
    (tmp_path / "img/garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "wav/cut.wav").write_bytes(wav[: len(wav) // 2])  # data chunk cut short
    return tmp_path


def good(i: int, **extra: object) -> dict[str, object]:
    return (
        {"id": f"g{i}", "image": f"img/{i}.png", "audio": f"wav/{i}.wav", "text": "three", "label": "odd"}
        | {"caption": ["a three", "the digit three"]}
        | extra
    )


# (row, field the checker must name) for every kind of bad row, planted between good rows.
PLANTED = [
    ({"id": "b1", "image": "img/cut.png", "label": "odd"}, "image"),  # corrupt PNG: decodes only in part
    ({"id": "b2", "image": "img/garbage.png", "label": "odd"}, "image"),  # not a PNG at all
    ({"id": "b3", "audio": "wav/cut.wav", "label": "even"}, "audio"),  # truncated WAV
    ({"id": "b4", "image": "wav/0.wav", "label": "odd"}, "image"),  # wrong type of file
    ({"id": "b5", "text": "four", "label": ["odd"]}, "label"),  # wrong type of value
    ({"id": "b6", "text": "  ", "label": "odd"}, "text"),  # empty text
    ({"id": "b7", "audio": "wav/gone.wav", "label": "odd"}, "audio"),  # missing file
    ({"id": "b8", "text": "four", "label": "prime"}, "label"),  # unknown label
    ({"id": "g0", "text": "again", "label": "odd"}, "id"),  # duplicate id
]


def planted_manifest(folder: Path) -> tuple[Path, dict[int, str]]:
    """Good rows with every planted bad row between them: (manifest, {line: field})."""
    rows: list[object] = [good(0)]
    expected = {}
    for i, (row, field) in enumerate(PLANTED):
        rows.append(row)
        expected[len(rows)] = field
        rows.append(good(i + 1 if i < 2 else 0, id=f"ok{i}"))
    rows.insert(3, "{not json")
    expected = {line + (line > 3): field for line, field in expected.items()} | {4: "<row>"}
    path = folder / "planted.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path, expected


def test_checker_finds_every_planted_bad_row_with_its_line(folder: Path) -> None:
    path, expected = planted_manifest(folder)
    count, errors = check_manifest(path, labels=["even", "odd"])
    found = {e.line: str(e).split("field '")[1].split("'")[0] for e in errors}
    assert found == expected
    assert count == len(path.read_text().splitlines())
    assert all(str(e).startswith(f"{path}:{e.line}: field ") for e in errors)
    messages = "\n".join(map(str, errors))
    for words in ("cannot decode the image", "truncated: the data chunk", "file not found", "prime"):
        assert words in messages


def test_checker_command_prints_every_bad_row_and_exits_non_zero(folder: Path) -> None:
    path, expected = planted_manifest(folder)
    result = subprocess.run(
        [sys.executable, "-m", "multimoe.tools.check", str(path), "--labels", "even,odd"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert [int(line.split(":")[1]) for line in result.stdout.splitlines()] == sorted(expected)
    assert f"{path}: {len(path.read_text().splitlines())} rows, {len(expected)} bad" in result.stderr
    clean = folder / "clean.jsonl"
    clean.write_text(json.dumps(good(0)) + "\n")
    assert main([str(clean), "--labels", "even,odd"]) == 0


def test_csv_has_the_same_columns_and_several_references(folder: Path) -> None:
    path = folder / "m.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image", "audio", "text", "label", "caption"])
        writer.writerow(["a", "img/0.png", "wav/0.wav", "three", "3", "a three|the digit three"])
        writer.writerow(["b", "", "wav/1.wav", "", "7", ""])  # empty cells: absent fields
        writer.writerow(["c", "img/nowhere.png", "", "x", "7", "a, quoted caption"])
    with pytest.raises(ManifestError, match=r"m.csv:4: field 'image': file not found"):
        read_manifest(path)
    rows = read_manifest(path, skip_bad_rows=True)
    assert [r.id for r in rows] == ["a", "b"]
    assert rows[0].captions == ["a three", "the digit three"] and rows[0].label == "3"
    assert rows[1].image is None and rows[1].text is None and rows[1].captions == []
    jsonl = folder / "m.jsonl"
    jsonl.write_text(json.dumps(good(0, label=3, caption=["a three", "the digit three"])) + "\n")
    assert read_manifest(jsonl)[0].captions == rows[0].captions and read_manifest(jsonl)[0].label == "3"

    bad_header = folder / "bad.csv"
    bad_header.write_text("id,picture\na,img/0.png\n")
    with pytest.raises(ManifestError, match=r"bad.csv:1: field 'picture': unknown column"):
        read_manifest(bad_header)


def test_training_refuses_a_bad_manifest_or_skips_and_counts_its_rows(folder: Path) -> None:
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(good(i, label=["odd", "even"][i % 2])) + "\n" for i in range(3)))
    path, expected = planted_manifest(folder)
    header_found = len(expected) - 1  # the pixel data cut short shows only when the image is decoded
    with pytest.raises(ManifestError) as error:
        MultiModalDataModule(str(train), val_manifest=str(path), config=MultiMoEConfig())
    assert str(error.value).startswith(f"{path}:4: field '<row>': not valid JSON")  # line 2's cut PNG
    # passes the header check: its pixels are read when the sample is loaded
    assert f"(and {header_found - 1} more bad rows)" in str(error.value)

    with pytest.warns(UserWarning, match=rf"skipped {header_found} bad rows of {len(expected) + 10}"):
        dm = MultiModalDataModule(
            str(train), val_manifest=str(path), config=MultiMoEConfig(), skip_bad_rows=True, batch_size=32
        )
    dm.setup("validate")
    with pytest.warns(UserWarning, match=r"skipped: .*planted.jsonl:2: field 'image': cannot read"):
        batch = next(iter(dm.val_dataloader()))
    assert batch.skipped == 1 and "b1" not in batch.ids and len(batch) == 10


def test_a_file_that_breaks_mid_epoch_names_its_row(folder: Path) -> None:
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(good(i, label=["odd", "even"][i % 2])) + "\n" for i in range(3)))
    dm = MultiModalDataModule(str(train), config=MultiMoEConfig(), batch_size=3, cache=False)
    dm.setup("fit")
    assert len(next(iter(dm.train_dataloader()))) == 3
    (folder / "img/1.png").unlink()  # gone after the check, in the middle of training
    (folder / "wav/2.wav").write_bytes(b"RIFF")  # and another one corrupt
    with pytest.raises(ManifestError, match=r"train.jsonl:(2: field 'image'|3: field 'audio'): cannot read"):
        list(dm.train_dataloader())


class BreakFile(Callback):
    """Deletes ``path`` when epoch ``epoch`` starts: a file that disappears mid-training."""

    def __init__(self, path: str, epoch: int = 1) -> None:
        self.path, self.epoch = Path(path), epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.path.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("skip", [False, True], ids=["error", "skip"])
def test_train_py_on_a_file_gone_mid_training(
    folder: Path, tmp_path: Path, skip: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    from multimoe.training.cli import main

    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(good(i, label=["odd", "even"][i % 2])) + "\n" for i in range(3)))
    root = tmp_path / "run"
    args = ["fit", "--config", "configs/tiny.yaml", f"--data.train_manifest={train}"]
    args += [f"--data.val_manifest={train}", "--data.test_manifest=null", "--data.cache=false"]
    args += [f"--data.skip_bad_rows={skip}", "--data.batch_size=2", f"--trainer.max_epochs={2 - skip}"]
    args += [f"--trainer.default_root_dir={root}", "--trainer.callbacks+=tests.test_check.BreakFile"]
    args += [f"--trainer.callbacks.path={folder / 'img/1.png'}", f"--trainer.callbacks.epoch={1 - skip}"]
    if skip:
        main(args)
        out = capsys.readouterr().out
        assert "train/skipped_rows" in out and "val/skipped_rows" in out
        assert (root / "checkpoints/last.ckpt").is_file()
        return
    with pytest.raises(SystemExit) as exit_code:
        main(args)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2
    assert f"error: {train}:2: field 'image': cannot read {folder / 'img/1.png'}" in err
    assert "crash.ckpt" in err and "Traceback" not in err
    last = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and (root / "checkpoints/crash.ckpt").is_file()
