"""Callbacks of the training system: frequent ``last.ckpt`` saves, randomness that a resumed run reproduces,
a guard against non-finite losses and gradients, and the fine-tuning ones (frozen parts stay in eval mode,
grown experts join the routing gradually)."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from multimoe.pretrained import CheckpointError
from multimoe.surgery import NewExpert


class Checkpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also rewrites ``last.ckpt`` every ``last_every_n_steps`` optimizer steps
    (0: only when ModelCheckpoint itself saves), so a killed run loses at most that many steps."""

    def __init__(self, *args: Any, last_every_n_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_every_n_steps = last_every_n_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before the first step of ``fit``: the checkpoint folder must take a file, or the run stops here
        with one line instead of at its first save."""
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or not trainer.is_global_zero or self.dirpath is None or "://" in str(self.dirpath):
            return
        folder = Path(self.dirpath)
        probe = folder / f".write-test.{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise CheckpointError(
                f"checkpoint folder {folder}: cannot write there ({error.strerror or error})"
            ) from None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_steps
        due = n > 0 and self.save_last and trainer.global_step % n == 0
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        saved = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved  # a best-model save after validation at this step still runs


class StopAtStepEnd(Callback):
    """Ctrl-C (SIGINT) during ``fit`` stops the run at the next step boundary, on every rank, not in the
    middle of a step, so that the crash checkpoint holds exactly the state after the last finished step
    (weights, optimizer, data position and step count agree). A second Ctrl-C stops at once. (Lightning
    handles SIGTERM the same way itself.)"""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = {
                sig: signal.signal(sig, self._receive) for sig in (signal.SIGINT, signal.SIGTERM)
            }

    def _receive(self, signum: int, frame: Any) -> None:
        self.received = signum
        self._restore()  # the next one acts at once
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step", file=sys.stderr, flush=True
        )

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            raise KeyboardInterrupt("SIGINT")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        if self.received is not None:  # came during the last validation: the run is done, say it stopped
            raise KeyboardInterrupt("SIGINT")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class SeedEveryStep(Callback):
    """Seeds Python, NumPy and torch (CPU and CUDA) before every training batch from (run seed, batch number,
    rank). Dropout, SpecAugment and router jitter then depend only on the batch, so a run resumed from a
    checkpoint draws exactly what the uninterrupted run drew, whatever ran in between (validation, a
    DataLoader's seed draw)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        batch_number = trainer.fit_loop.epoch_loop.total_batch_idx
        seed = int(np.random.SeedSequence([run_seed, batch_number, trainer.global_rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class NonFiniteError(FloatingPointError):
    """A training step produced a non-finite loss or gradient (the message names the step and the samples)."""


class NonFiniteGuard(Callback):
    """Checks the loss and the gradients of every training step before the optimizer uses them.

    A non-finite value is reported with the global step and the ids of the step's samples (each rank names its
    own); then the run stops with ``NonFiniteError``, or with ``skip=True`` the step is skipped (gradients
    dropped, so the optimizer leaves the weights and its state alone) and training goes on. The decision is
    taken on all ranks together. fp16 mixed precision is left to its gradient scaler, which skips such steps.
    """

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped: list[int] = []  # global steps skipped in this process
        self._ids: list[str] = []
        self._losses: list[torch.Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ids += list(getattr(batch, "ids", []))

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._losses.append(loss.detach().float().reshape(1))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        ids, losses = self._ids, self._losses
        self._ids, self._losses = [], []
        precision = trainer.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is not None:
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=pl_module.device)
        loss = torch.cat(losses) if losses else norm.new_zeros(1)
        bad = (~norm.isfinite()).float() + (~loss.isfinite()).any().float()  # one host sync below
        if float(trainer.strategy.reduce(bad, reduce_op="sum")) == 0:
            return
        what = f"loss {loss.tolist()}" if not loss.isfinite().all() else f"gradient norm {float(norm)}"
        message = (
            f"non-finite training step at global step {trainer.global_step} (rank {trainer.global_rank}: "
            f"{what}); sample ids: {ids}"
        )
        if not self.skip:
            raise NonFiniteError(message + "; set nonfinite.skip=true to skip such steps")
        print(f"warning: {message}; step skipped", flush=True)
        self.skipped.append(trainer.global_step)
        optimizer.zero_grad(set_to_none=True)


class KeepFrozen(Callback):
    """Frozen modules stay in eval mode in training (batch-norm statistics, dropout, SpecAugment)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for module in self.modules:
            module.eval()


class GrowIn(Callback):
    """Raises each new expert's selection bias from its start to the mean of its modality's other experts
    over ``steps`` training steps, so the grown model moves away from the checkpoint's function gradually.
    The steps done travel in the checkpoint: a resumed run goes on with the ramp where it was."""

    def __init__(self, experts: list[NewExpert], steps: int) -> None:
        self.experts, self.steps, self.done = experts, steps, 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.done >= self.steps:
            return
        self.done += 1
        for new in self.experts:
            bias = new.router.bias
            assert bias is not None
            others = new.router.allowed[new.modality].clone()
            others[[e.expert for e in self.experts if e.router is new.router]] = False
            target = float(bias[new.modality][others].mean())
            bias[new.modality, new.expert] = new.start + (target - new.start) * self.done / self.steps

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = state_dict["done"]
