"""A callback that tests put into ``train.py`` runs (``--trainer.callbacks+=...``) to watch them from outside:
it appends every step's loss (averaged over the ranks) to a JSON-lines file, and can stop the run at a given
step and wait there, so that a test can kill it at a known point."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


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
