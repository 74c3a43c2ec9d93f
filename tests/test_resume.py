"""Fault tolerance with real processes: a run killed with SIGKILL mid-epoch and restarted with
``--ckpt_path last`` ends exactly where the uninterrupted run ends; a kill during a save leaves the old
checkpoint whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def fit_command(root: Path, manifests: dict[str, Path], *extra: str, pause_at_step: int = 0) -> list[str]:
    """train.py fit on the tiny config: 48 rows, batch 8 = 6 steps per epoch, 2 epochs, ``last.ckpt`` every 2
    steps; the Probe callback logs each step's loss and can hold the run at a step."""
    probe = {"class_path": "tests.probes.Probe", "init_args": {"log": str(root / "log.jsonl")}}
    probe["init_args"]["pause_at_step"] = pause_at_step  # type: ignore[index]
    return [
        sys.executable,
        "train.py",
        "fit",
        "--config=configs/tiny.yaml",
        *[f"--data.{k}_manifest={v}" for k, v in manifests.items()],
        f"--trainer.default_root_dir={root}",
        "--trainer.max_epochs=2",
        "--trainer.limit_val_batches=1",
        "--trainer.deterministic=true",
        "--checkpoint.last_every_n_steps=2",
        "--test_after_fit=false",
        f"--trainer.callbacks+={json.dumps(probe)}",
        *extra,
    ]


def start(command: list[str], out: Path) -> subprocess.Popen[bytes]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        return subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen[bytes], out: Path) -> str:
    assert process.wait(timeout=300) == 0, out.read_text()[-3000:]
    return out.read_text()


def losses(root: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (root / "log.jsonl").read_text().splitlines())]


def summary(stdout: str) -> dict[str, str]:
    """The metric lines of the multimoe summary that fit prints."""
    lines = stdout.split("multimoe summary")[1].splitlines()
    return dict(line.split() for line in lines if line.startswith("  ") and "checkpoint" not in line)


def test_run_killed_mid_epoch_resumes_exactly(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, digit_manifests), full / "out.txt")
    killed = start(fit_command(cut, digit_manifests, pause_at_step=9), cut / "out.txt")
    deadline = time.monotonic() + 300
    while not (cut / "log.paused").exists():  # steps 1..9 done, last.ckpt written at step 8
        assert killed.poll() is None and time.monotonic() < deadline, (cut / "out.txt").read_text()[-3000:]
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 8)  # two batches into the second epoch

    resumed = finish(
        start([*fit_command(cut, digit_manifests), "--ckpt_path=last"], cut / "out2.txt"), cut / "out2.txt"
    )
    expected = finish(uninterrupted, full / "out.txt")

    reference, before_kill = losses(full), losses(cut)
    assert [s for s, _ in reference] == list(range(1, 13))
    assert before_kill[:9] == reference[:9]
    assert before_kill[9:] == reference[8:]  # step 9 is redone from the step-8 checkpoint, then 10..12
    assert summary(resumed) == summary(expected)  # val metrics and the epoch's train accuracy
    a = torch.load(full / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["global_step"] == b["global_step"] == 12
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


SAVE_SCRIPT = """
import sys, torch
from pathlib import Path
from multimoe.checkpoint_io import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(48_000_000), "step": 2}, Path(sys.argv[1]))
"""


def test_kill_during_save_leaves_the_old_checkpoint_whole(tmp_path: Path) -> None:
    from multimoe.checkpoint_io import AtomicCheckpointIO

    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3), "step": 1}, last)
    size = last.stat().st_size
    saver = subprocess.Popen([sys.executable, "-c", SAVE_SCRIPT, str(last)], cwd=ROOT)
    writing = False
    while saver.poll() is None and not writing:  # kill as soon as anything is being written
        writing = last.stat().st_size != size or any(p.name != last.name for p in tmp_path.iterdir())
        time.sleep(0.001)
    os.kill(saver.pid, signal.SIGKILL)
    saver.wait()
    assert writing, "the save ended before the kill; the test did not test anything"
    assert torch.load(last, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.glob("last*.ckpt")] == ["last.ckpt"]
