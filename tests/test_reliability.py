"""Hostile and careless input, and faults (docs/reliability.md lists every case): files never run code,
manifests never lose rows, bad values and odd files get one line that names them, and an interrupted run
resumes exactly."""

from __future__ import annotations

import json
import random
import signal
import time
import tracemalloc
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio.functional

from multimoe.config import AudioEncoderConfig, ConfigError, MoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.data.files import decode_problem
from multimoe.data.manifest import ManifestError, read_manifest, scan_manifest
from multimoe.data.processors import AudioProcessor
from multimoe.tools import analysis, check, convert, infer
from multimoe.training import cli
from tests.conftest import ROOT, SHARED_DATA
from tests.probes import finish, fit_command, losses, same_weights, start
from tests.test_resume import RESUMABLE, summary

IMAGE = SHARED_DATA / "mnist/3/0000.png"
AUDIO = SHARED_DATA / "fsdd/recordings/7_jackson_0.wav"


def one_line_error(
    command: Callable[[list[str]], object], args: list[str], capsys: pytest.CaptureFixture[str]
) -> str:
    """Run a command's ``main`` in this process: it must stop with exit code 2 (1 for the checker) and one
    ``error: ...`` line, no traceback. Returns that line."""
    with pytest.raises(SystemExit) as stop:
        code = command(args)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert stop.value.code in (1, 2), err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    return line


# ---- checkpoints are data, not code ------------------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.marker,))


def crafted(folder: Path, marker: Path) -> Path:
    """A checkpoint that looks like train.py's and runs code when unpickled."""
    path = folder / "crafted.ckpt"
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {}, "payload": Payload(marker)}, path)
    return path


def every_command(
    checkpoint: Path, manifests: dict[str, Path], out: Path
) -> dict[str, tuple[Callable, list[str]]]:
    data = [f"--data.{k}_manifest={v}" for k, v in manifests.items()]
    train = ["--config=configs/tiny.yaml", *data, f"--trainer.default_root_dir={out}"]
    return {
        "fit --ckpt_path": (cli.main, ["fit", *train, f"--ckpt_path={checkpoint}"]),
        "fit --finetune.checkpoint": (cli.main, ["fit", *train, f"--finetune.checkpoint={checkpoint}"]),
        "validate": (cli.main, ["validate", *train, f"--ckpt_path={checkpoint}"]),
        "test": (cli.main, ["test", *train, f"--ckpt_path={checkpoint}"]),
        "predict": (cli.main, ["predict", *train, f"--ckpt_path={checkpoint}"]),
        "infer": (infer.main, [str(checkpoint), "--text", "four"]),
        "analysis": (analysis.main, [str(checkpoint), str(manifests["test"]), "--out", str(out)]),
        "convert": (convert.main, [str(checkpoint), str(out / "converted")]),
        "check --labels": (check.main, [str(manifests["test"]), "--labels", str(checkpoint)]),
    }


def test_a_crafted_checkpoint_runs_nowhere(
    digit_manifests: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    marker = tmp_path / "payload-ran"
    checkpoint = crafted(tmp_path, marker)
    for name, (command, args) in every_command(checkpoint, digit_manifests, tmp_path / "out").items():
        line = one_line_error(command, args, capsys)
        assert str(checkpoint) in line and "refused" in line, (name, line)
        assert not marker.exists(), f"{name} ran the checkpoint's code"


# Random files that fail in different places of torch's unpickler (seeds found by trying 300)
RANDOM = {"unpickling": 0, "index": 2, "key": 20, "unicode": 195}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        *[(random.Random(seed).randbytes(4096), "not a readable checkpoint") for seed in RANDOM.values()],
        (b"", "not a readable checkpoint"),
        (None, "not a train.py checkpoint"),  # a torch file of something else
    ],
    ids=[*[f"random-bytes-{name}-error" for name in RANDOM], "empty", "not-lightning"],
)
def test_a_file_that_is_not_a_checkpoint_gets_one_line(
    content: bytes | None, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.write_bytes(content)
    for command, args in [
        (infer.main, [str(path), "--text", "four"]),
        (convert.main, [str(path), str(tmp_path)]),
    ]:
        line = one_line_error(command, args, capsys)
        assert line.startswith(f"error: {path}: {message}"), line


def test_a_folder_that_holds_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """convert takes a checkpoint, a saved model folder or an adapter folder; an empty folder is none."""
    line = one_line_error(convert.main, [str(tmp_path), str(tmp_path / "out")], capsys)
    assert line == f"error: {tmp_path}: no config.json, not a folder saved by MultiMoE"


# ---- Ctrl-C, and a checkpoint folder that cannot be written ------------------------------------------------


@pytest.mark.slow
def test_a_run_stopped_with_ctrl_c_resumes_exactly(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    """SIGINT lands wherever the run is; it stops after that step with crash.ckpt, and the resumed run ends as
    the uninterrupted one (losses, metrics, weights). 3 epochs of 6 steps."""
    args = [*RESUMABLE, "--trainer.max_epochs=3"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, digit_manifests, *args), full / "out.txt")
    stopped = start(fit_command(cut, digit_manifests, *args), cut / "out.txt")
    deadline = time.monotonic() + 300
    while not (cut / "log.jsonl").exists() or len(losses(cut)) < 8:
        assert stopped.poll() is None and time.monotonic() < deadline, (cut / "out.txt").read_text()[-3000:]
        time.sleep(0.05)
    stopped.send_signal(signal.SIGINT)
    assert stopped.wait(timeout=120) == 1
    out = (cut / "out.txt").read_text()
    assert "SIGINT: stopping after the current step" in out and "Traceback" not in out
    crash = torch.load(cut / "checkpoints" / "crash.ckpt", map_location="cpu", weights_only=True)
    step = crash["global_step"]
    assert [s for s, _ in losses(cut)][-1] == step < 18  # the checkpoint holds the last step trained
    position = crash["MultiModalDataModule"]["train_position"]
    assert position == {"epoch": step // 6, "samples": (step % 6) * 8}

    resumed = finish(
        start(
            fit_command(cut, digit_manifests, *args, f"--ckpt_path={cut / 'checkpoints/crash.ckpt'}"),
            cut / "out2.txt",
        ),
        cut / "out2.txt",
    )
    expected = finish(uninterrupted, full / "out.txt")
    assert losses(cut) == losses(full)  # every step once, none lost or repeated
    assert summary(resumed) == summary(expected)
    assert same_weights(full, cut)


def test_a_checkpoint_folder_that_cannot_be_written_stops_before_the_first_step(
    digit_manifests: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    data = [f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()]
    args = ["fit", "--config=configs/tiny.yaml", *data, f"--checkpoint.dirpath={blocker / 'checkpoints'}"]
    args.append(f"--trainer.default_root_dir={tmp_path}")
    line = one_line_error(cli.main, args, capsys)
    assert line.startswith(f"error: checkpoint folder {blocker / 'checkpoints'}: cannot write there")


# ---- manifests never lose rows ----------------------------------------------------------------------


def csv_manifest(folder: Path, body: str, name: str = "m.csv", encoding: str = "utf-8") -> Path:
    path = folder / name
    path.write_bytes(body.encode(encoding))
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    (tmp_path / "a.png").write_bytes(IMAGE.read_bytes())
    (tmp_path / "a.wav").write_bytes(AUDIO.read_bytes())
    return tmp_path


HEADER = "id,image,audio,text,label,caption\n"
CSV_CASES = {
    # a quote opened in a text cell and never closed would swallow the rows after it
    "stray-quote": (
        HEADER + 'r1,a.png,,"oops,seven,c1\nr2,a.png,,fine,seven,c2\nr3,a.png,,x,six,c3\n',
        2,
        "<row>",
        "a quoted cell runs over lines 2-4",
    ),
    "fewer-cells": (HEADER + "r1,a.png,,seven\n", 2, "<row>", "4 cells, but the header has 6 columns"),
    "more-cells": (
        HEADER + "r1,a.png,,text,seven,cap,extra\n",
        2,
        "<row>",
        "7 cells, but the header has 6 columns",
    ),
    "duplicate-column": (
        "id,image,label,label\nr1,a.png,seven,six\n",
        1,
        "label",
        "the column appears twice",
    ),
    "unknown-column": ("id,picture\nr1,a.png\n", 1, "picture", "unknown column"),
    "no-rows": (HEADER, 1, "<row>", "the manifest has no rows"),
    "latin-1": (HEADER + "r1,a.png,,café,seven,c\n", 2, "<row>", "not UTF-8 text (byte 0xe9)"),
    "spaces-after-commas": ("id,image,label\nr1,a.png, seven\n", 2, "label", "' seven' has spaces around it"),
}


@pytest.mark.parametrize(("body", "line", "field", "message"), list(CSV_CASES.values()), ids=list(CSV_CASES))
def test_a_csv_row_is_never_lost_or_misread(
    files: Path, body: str, line: int, field: str, message: str
) -> None:
    """The checker and training see the same error for the same row."""
    path = csv_manifest(files, body, encoding="latin-1" if "é" in body else "utf-8")
    _, errors = scan_manifest(path)
    assert errors and str(errors[0]).startswith(f"{path}:{line}: field '{field}': {message}"), errors
    with pytest.raises(ManifestError, match=f"{path}:{line}: field '{field}'"):
        read_manifest(path)


def test_a_byte_order_mark_and_windows_line_ends_are_fine(files: Path) -> None:
    path = csv_manifest(files, "\ufeff" + (HEADER + "r1,a.png,a.wav,hi,seven,a|b\n").replace("\n", "\r\n"))
    [row] = read_manifest(path)
    assert (row.id, row.label, row.captions, row.audio) == ("r1", "seven", ["a", "b"], files / "a.wav")


@pytest.mark.parametrize(
    ("lines", "line", "field", "message"),
    [
        (['[{"id": "r1", "text": "hi"}]'], 1, "<row>", "a JSON array"),
        (['{"id": "r1", "text": "hi", "label": "a", "label": "b"}'], 1, "label", "the field appears twice"),
        (['{"id": "r1", "text": "hi", "label": 3.5}'], 1, "label", "expected a class name"),
        (['{"id": "r1", "text": "hi", "label": NaN}'], 1, "label", "expected a class name"),
    ],
    ids=["array", "repeated-key", "float-label", "nan-label"],
)
def test_a_jsonl_row_is_never_misread(
    files: Path, lines: list[str], line: int, field: str, message: str
) -> None:
    path = files / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, errors = scan_manifest(path)
    assert str(errors[0]).startswith(f"{path}:{line}: field '{field}': {message}")


def test_the_checker_and_training_agree_on_an_empty_manifest(
    files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = csv_manifest(files, HEADER)
    assert check.main([str(path)]) == 1
    assert f"{path}:1: field '<row>': the manifest has no rows" in capsys.readouterr().out
    with pytest.raises(ManifestError, match="no rows"):
        MultiModalDataModule(str(path))


# ---- files that are not what they claim --------------------------------------------------------------------


def test_folders_and_links_given_as_files_are_named_as_what_they_are(files: Path) -> None:
    (files / "folder.png").mkdir()
    (files / "loop.wav").symlink_to(files / "loop.wav")
    (files / "dangling.png").symlink_to(files / "gone.png")
    rows = [
        {"id": "r1", "image": "folder.png"},
        {"id": "r2", "audio": "loop.wav"},
        {"id": "r3", "image": "dangling.png"},
        {"id": "r4", "image": "img\\a.png"},
    ]
    path = files / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, errors = scan_manifest(path)
    windows = files / "img\\a.png"
    assert [str(e).split(": ", 2)[2] for e in errors] == [
        f"a folder, not a file: {files / 'folder.png'}",
        f"a symlink loop: {files / 'loop.wav'}",
        f"a broken symlink (to {files / 'gone.png'}): {files / 'dangling.png'}",
        f"file not found (a Windows path? use /): {windows}",
    ]


def long_wav(path: Path, minutes: float, rate: int = 8000) -> Path:
    samples = (np.sin(np.arange(int(minutes * 60 * rate)) / 7.0) * 20000).astype(np.int16)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(samples.tobytes())
    return path


def test_a_long_recording_is_not_decoded_whole(tmp_path: Path) -> None:
    """A 20-minute WAV (19 MB of int16, 77 MB as float32) cut to 2 s: reading it and checking it stay within
    a few MB, and the samples kept are the file's first 2 s, resampled."""
    path = long_wav(tmp_path / "long.wav", minutes=20)
    processor = AudioProcessor(AudioEncoderConfig(sample_rate=16000, max_seconds=2.0))
    tracemalloc.start()
    with pytest.warns(UserWarning, match=r"1200.00 s cut to max_seconds=2.0"):
        waveform = processor(path)
    assert decode_problem("audio", path) is None
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8e6 and waveform.shape == (32000,)
    head, _ = soundfile.read(str(path), frames=4 * 8000, dtype="float32")  # twice what is kept
    expected = torchaudio.functional.resample(torch.from_numpy(head), 8000, 16000)[:32000]
    torch.testing.assert_close(waveform, expected, atol=1e-3, rtol=0)


def test_audio_with_nan_samples_is_refused(files: Path) -> None:
    soundfile.write(
        str(files / "nan.wav"), np.array([0.1, np.nan, 0.2] * 1000, dtype=np.float32), 8000, subtype="FLOAT"
    )
    assert decode_problem("audio", files / "nan.wav") == "the audio holds NaN or infinite samples"
    with pytest.raises(ValueError, match="NaN or infinite"):
        AudioProcessor(AudioEncoderConfig())(files / "nan.wav")


# ---- bad values on the command line ----------------------------------------------------------------


EXPERT_PARALLEL = "multimoe.training.parallel.ExpertParallelStrategy"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.config.moe.top_k=0"], "MoEConfig.top_k: must be > 0, got 0"),
        (["--model.config.moe.top_k=4"], "MoEConfig.top_k: is 4, but a modality may use at most 3 experts"),
        (["--model.lr=-0.001"], "model.lr: must be > 0, got -0.001"),
        (["--data.batch_size=0"], "data: batch_size must be >= 1"),
        (["--data.modality_dropout=1.5"], "data.modality_dropout must be in [0, 1]"),
        (
            [f"--trainer.strategy={EXPERT_PARALLEL}", "--trainer.strategy.expert_parallel=0"],
            "trainer.strategy.expert_parallel=0: must be at least 1 and divide the 1 processes",
        ),
        (
            [f"--trainer.strategy={EXPERT_PARALLEL}", "--trainer.strategy.expert_parallel=2"],
            "trainer.strategy.expert_parallel=2: must be at least 1 and divide the 1 processes",
        ),
        (
            ["--trainer.enable_checkpointing=false"],
            "`enable_checkpointing=False` but found `ModelCheckpoint`",
        ),
    ],
    ids=[
        "top_k-0",
        "top_k-too-big",
        "negative-lr",
        "batch-size-0",
        "dropout-1.5",
        "ep-0",
        "ep-too-many",
        "checkpointing-off",
    ],
)
def test_a_bad_value_gets_one_line_naming_it(
    tmp_path: Path,
    args: list[str],
    message: str,
    digit_manifests: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(ROOT)
    data = [f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()]
    root = f"--trainer.default_root_dir={tmp_path}"
    line = one_line_error(cli.main, ["fit", "--config=configs/tiny.yaml", *data, root, *args], capsys)
    assert message in line, line


def test_evaluating_without_a_manifest_says_which_to_set(
    trained: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    line = one_line_error(
        cli.main, ["test", f"--ckpt_path={trained[0]}", "--data.test_manifest=null"], capsys
    )
    assert line == "error: no manifest given for 'test': set data.test_manifest"


def test_top_k_above_a_lower_blocks_experts_is_stated() -> None:
    from multimoe.model import build_model
    from tests.test_model import tiny_config

    config = tiny_config(top_k=2, experts_per_modality=1, cross_modal_experts=2, cross_modal_from_layer=1)
    with pytest.warns(UserWarning, match=r"MoE block 0 .*may use 1 experts there, fewer than top_k=2"):
        model = build_model(config)
    assert [layer.router.top_k for layer in model.moe_layers()] == [1, 2]
    with pytest.raises(ConfigError, match="top_k: is 3, but a modality may use at most 2 experts"):
        MoEConfig(top_k=3, experts_per_modality=1, cross_modal_experts=1)


def test_a_modality_the_model_does_not_read_is_said_to_be_left_out(digit_manifests: dict[str, Path]) -> None:
    from multimoe.config import MultiMoEConfig
    from multimoe.data.dataset import ManifestDataset
    from multimoe.tokenizer import WordTokenizer

    config = MultiMoEConfig(modalities=["image", "audio"])
    rows = read_manifest(digit_manifests["test"])
    with pytest.warns(
        UserWarning, match=r"test.jsonl: 1[0-9] rows hold text, which this model does not read"
    ):
        ManifestDataset.for_model(rows, config, ["even", "odd"], WordTokenizer.build([]))


def test_a_checkpoint_whose_weights_do_not_fit_its_config(
    trained: tuple[Path, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith("router.proj.weight"))
    checkpoint["state_dict"][key] = torch.zeros(3, 3)
    path = tmp_path / "mismatch.ckpt"
    torch.save(checkpoint, path)
    line = one_line_error(convert.main, [str(path), str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: {path}: does not load: ") and "router.proj.weight" in line


def test_infer_says_which_input_the_model_does_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multimoe.config import MultiMoEConfig
    from multimoe.model import build_model
    from multimoe.tokenizer import SPECIALS

    build_model(MultiMoEConfig(modalities=["image", "audio"]), ["a", "b"], list(SPECIALS)).save_pretrained(
        tmp_path
    )
    line = one_line_error(infer.main, [str(tmp_path), "--image", str(IMAGE), "--text", "four"], capsys)
    assert line == "error: this model reads no text"
