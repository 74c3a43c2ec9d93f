"""Fault tolerance with real processes: a run killed with SIGKILL mid-epoch and restarted with
``--ckpt_path last`` ends exactly where the uninterrupted run ends; a kill during a save leaves the old
checkpoint whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.probes import ROOT, finish, fit_command, kill_when_paused, losses, same_weights, start

RESUMABLE = ["--trainer.max_epochs=2", "--trainer.deterministic=true", "--checkpoint.last_every_n_steps=2"]


def summary(stdout: str) -> dict[str, str]:
    """The metric lines of the multimoe summary that fit prints."""
    lines = stdout.split("multimoe summary")[1].splitlines()
    return dict(line.split() for line in lines if line.startswith("  ") and "checkpoint" not in line)


def test_run_killed_mid_epoch_resumes_exactly(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    """48 rows, batch 8: 6 steps per epoch, 2 epochs; last.ckpt every 2 steps; killed after step 9."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, digit_manifests, *RESUMABLE), full / "out.txt")
    killed = start(fit_command(cut, digit_manifests, *RESUMABLE, pause_at_step=9), cut / "out.txt")
    kill_when_paused(killed, cut)  # steps 1..9 done, last.ckpt written at step 8
    saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 8)  # two batches into the second epoch

    restart = fit_command(cut, digit_manifests, *RESUMABLE, "--ckpt_path=last")
    resumed = finish(start(restart, cut / "out2.txt"), cut / "out2.txt")
    expected = finish(uninterrupted, full / "out.txt")

    reference, before_kill = losses(full), losses(cut)
    assert [s for s, _ in reference] == list(range(1, 13))
    assert before_kill[:9] == reference[:9]
    assert before_kill[9:] == reference[8:]  # step 9 is redone from the step-8 checkpoint, then 10..12
    assert summary(resumed) == summary(expected)  # val metrics and the epoch's train accuracy
    assert same_weights(full, cut)
    assert torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


SAVE_SCRIPT = """
import sys, torch
from pathlib import Path
from multimoe.training.checkpoint_io import AtomicCheckpointIO
AtomicCheckpointIO().save_checkpoint({"w": torch.ones(48_000_000), "step": 2}, Path(sys.argv[1]))
"""


def test_kill_during_save_leaves_the_old_checkpoint_whole(tmp_path: Path) -> None:
    from multimoe.training.checkpoint_io import AtomicCheckpointIO

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
