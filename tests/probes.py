"""Running ``train.py fit`` as a real subprocess and watching it from outside: the Probe callback (put into
the run with ``--trainer.callbacks+=``) appends every step's loss, averaged over the ranks, and the step's
sample ids to a JSON-lines file, and can hold the run at a given step so that a test can kill it there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]


class Probe(Callback):
    def __init__(self, log: str, pause_at_step: int = 0) -> None:
        self.path = Path(log)
        self.pause_at_step = pause_at_step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.pause_at_step > 0:
            self.path.with_suffix(".paused").write_text(str(trainer.global_step))
            time.sleep(600)  # the test kills the process here

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean"))
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": loss, "ids": batch.ids}) + "\n")


def fit_command(root: Path, manifests: dict[str, Path], *extra: str, pause_at_step: int = 0) -> list[str]:
    """train.py fit on the tiny config, one validation batch, no test, the Probe logging to root/log.jsonl."""
    probe = {"class_path": "tests.probes.Probe", "init_args": {"log": str(root / "log.jsonl")}}
    probe["init_args"]["pause_at_step"] = pause_at_step  # type: ignore[index]
    return [
        sys.executable,
        "train.py",
        "fit",
        "--config=configs/tiny.yaml",
        *[f"--data.{k}_manifest={v}" for k, v in manifests.items()],
        f"--trainer.default_root_dir={root}",
        "--trainer.limit_val_batches=1",
        "--test_after_fit=false",
        f"--trainer.callbacks+={json.dumps(probe)}",
        *extra,
    ]


def start(command: list[str], out: Path) -> subprocess.Popen[bytes]:
    """One torch thread per process: the runs of a test share the machine's cores. The run leads a process
    group of its own."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with out.open("wb") as f:
        return subprocess.Popen(
            command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def kill_when_paused(process: subprocess.Popen[bytes], root: Path, timeout: float = 300) -> None:
    """Wait until the run in ``root`` holds at its Probe's ``pause_at_step``, then SIGKILL it (with the other
    ranks' processes, which it started)."""
    deadline = time.monotonic() + timeout
    while not (root / "log.paused").exists():
        assert process.poll() is None and time.monotonic() < deadline, (root / "out.txt").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def finish(process: subprocess.Popen[bytes], out: Path) -> str:
    assert process.wait(timeout=300) == 0, out.read_text()[-3000:]
    return out.read_text()


def losses(root: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (root / "log.jsonl").read_text().splitlines())]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' ``checkpoints/last.ckpt`` hold the same step and bit-identical weights."""
    x, y = (
        torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (a, b)
    )
    same = x["state_dict"].keys() == y["state_dict"].keys()
    return (
        same
        and x["global_step"] == y["global_step"]
        and all(torch.equal(v, y["state_dict"][k]) for k, v in x["state_dict"].items())
    )
