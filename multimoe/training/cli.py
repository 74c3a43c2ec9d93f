"""The command line: ``python train.py fit|validate|test|predict --config configs/<x>.yaml [--key value]``."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from multimoe.config import ConfigError, MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.data.manifest import ManifestError
from multimoe.pretrained import CheckpointError, read_checkpoint, saved_form
from multimoe.training import finetune
from multimoe.training.callbacks import (
    Checkpoint,
    NonFiniteError,
    NonFiniteGuard,
    SeedEveryStep,
    StopAtStepEnd,
)
from multimoe.training.checkpoint_io import AtomicCheckpointIO
from multimoe.training.finetune import FinetuneConfig
from multimoe.training.metrics import meteor_score
from multimoe.training.module import MultiMoEModule


class MultiMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.last_every_n_steps": 50,
                "checkpoint.filename": "best-{epoch:02d}-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="test the best checkpoint after fit"
        )
        parser.add_argument(
            "--metrics_file",
            type=str | None,
            default=None,
            help="where test writes its metrics JSON (default: <checkpoint>.metrics.json)",
        )
        parser.add_argument(
            "--meteor", type=bool, default=False, help="add METEOR to the test metrics (needs Java)"
        )
        parser.add_class_arguments(FinetuneConfig, "finetune")
        parser.link_arguments("model.config", "data.config")
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.vocab", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # local saves become atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """As Lightning's: a ``--ckpt_path`` checkpoint's hyper-parameters go over the command line's.
        The file is read here once, as data (``read_checkpoint``: anything else gets one line)."""
        self.checkpoint: dict[str, Any] | None = None
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (ckpt_path and Path(ckpt_path).is_file()):
            return
        self.checkpoint = read_checkpoint(ckpt_path)
        saved_form(self.checkpoint, ckpt_path)  # a multimoe checkpoint, or one line saying it is not
        hparams = {k: v for k, v in self.checkpoint["hyper_parameters"].items() if k != "_instantiator"}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.base = None
        if self.subcommand == "fit":
            self.base = finetune.prepare(config)
        elif self.subcommand in EVALUATE:
            evaluate_only(config, self.subcommand, self.checkpoint)
        if (values := config.model.get("config")) is not None:  # checked here for one line: inside
            MultiMoEConfig.from_dict(values.get("init_args", values).as_dict())  # jsonargparse it is reworded

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.base is not None:
            print(finetune.apply(*self.base, self.model.model, self.trainer), file=sys.stderr)

    def before_fit(self) -> None:
        self.trainer.callbacks += [StopAtStepEnd(), SaveOnCrash()]  # type: ignore[attr-defined]

    def after_fit(self) -> None:
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        metrics = _scalars(self.trainer.callback_metrics)
        if self.config_init[self.subcommand].get("test_after_fit") and "test" in self.datamodule.rows:
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            metrics |= _scalars(results[0]) if results else {}
            self._write_metrics(metrics, best)
        paths = {"best checkpoint": best, "last checkpoint": getattr(checkpoint, "last_model_path", None)}
        self._summary(metrics, paths)

    def after_test(self) -> None:
        metrics = _scalars(self.trainer.callback_metrics)
        self._write_metrics(metrics, str(self.trainer.ckpt_path or "") or None)
        self._summary(metrics, {"checkpoint": self.config_init["test"].get("ckpt_path")})

    def _write_metrics(self, metrics: dict[str, float], checkpoint: str | None) -> None:
        """The test metrics as JSON: scalars, the classification report and the caption scores."""
        folder = self.trainer.log_dir or self.trainer.default_root_dir  # a collective: on every rank
        if not self.trainer.is_global_zero:
            return
        config = self.config_init[self.subcommand]
        path = Path(
            config.get("metrics_file")
            or (f"{checkpoint}.metrics.json" if checkpoint else f"{folder}/metrics.json")
        )
        report = dict(self.model.test_report)
        if config.get("meteor") and (meteor := meteor_score(*self.model.test_captions)) is not None:
            report["captions"] = report.get("captions", {}) | {"meteor": meteor}
        keys = [k for k in sorted(metrics) if k.startswith("test/") and "routing/" not in k]
        summary = {
            "checkpoint": checkpoint,
            "manifest": self.config[self.subcommand].get("data.test_manifest"),
            "generation": dataclasses.asdict(self.model.generation),
            "metrics": {k: metrics[k] for k in keys},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary | report, indent=2) + "\n")
        print(f"wrote test metrics to {path}")

    def after_validate(self) -> None:
        checkpoint = self.config_init["validate"].get("ckpt_path")
        self._summary(_scalars(self.trainer.callback_metrics), {"checkpoint": checkpoint})

    def after_predict(self) -> None:
        predictions = self.trainer.predict_loop.predictions
        out = Path(self.trainer.log_dir or ".") / "predictions.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for batch in predictions:
                for row in batch:
                    f.write(json.dumps(row) + "\n")
        print(f"wrote {sum(len(b) for b in predictions)} predictions to {out}")

    def _summary(self, metrics: dict[str, float], paths: dict[str, str | None]) -> None:
        if not self.trainer.is_global_zero:
            return
        keys = [k for k in sorted(metrics) if "routing/" not in k and not k.endswith("_step")]
        lines = ["", "=" * 60, "multimoe summary"]
        lines += [f"  {k:<28} {metrics[k]:.4f}" for k in keys]
        lines += [f"  {name}: {path}" for name, path in paths.items() if path]
        lines.append("=" * 60)
        print("\n".join(lines))


EVALUATE = {"validate": "val_manifest", "test": "test_manifest", "predict": "predict_manifest"}


def evaluate_only(cfg: Any, subcommand: str, checkpoint: dict[str, Any] | None) -> None:
    """``validate``, ``test`` and ``predict`` read only the manifest they evaluate (``predict`` falls back to
    the test manifest). With a ``--ckpt_path`` file (its contents: ``checkpoint``) they build the model that
    checkpoint holds (a fine-tuned one, say) whatever the YAML says, with its labels and vocabulary, and never
    read the training manifest."""
    if subcommand == "predict":
        cfg.data.predict_manifest = cfg.data.predict_manifest or cfg.data.test_manifest
    for stage, key in EVALUATE.items():
        if stage != subcommand:
            cfg.data[key] = None
    if checkpoint is not None:
        saved, _ = saved_form(checkpoint, cfg.ckpt_path)
        finetune.set_model_config(cfg, saved["config"], saved["vocab"])
        cfg.data.base_labels = saved["labels"]
        cfg.data.train_manifest = None


class SaveOnCrash(Callback):
    """When fit stops on an exception (a file that breaks mid-epoch, Ctrl-C), save the training state after
    the last finished step as ``crash.ckpt`` beside the other checkpoints; ``last.ckpt`` stays as it was."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath and trainer.global_step > 0:
            # A batch fetched or started but not trained (Ctrl-C at its start, an error in its step) never
            # happened: Lightning then resumes with it, as after a save at the previous step's end.
            progress = trainer.fit_loop.epoch_loop.batch_progress
            for tracker in (progress.total, progress.current):
                tracker.ready = tracker.started = tracker.processed  # type: ignore[attr-defined]
            path = Path(dirpath) / "crash.ckpt"
            trainer.save_checkpoint(path)
            print(f"fit stopped: saved the training state to {path}", file=sys.stderr)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if getattr(v, "numel", lambda: 1)() == 1}


def main(args: list[str] | None = None) -> None:
    """Entry point of train.py; bad manifests, configs and Trainer settings end with one clear line, not a
    stack trace."""
    try:
        MultiMoECLI(
            MultiMoEModule,
            MultiModalDataModule,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [SeedEveryStep()]},
            args=args,
        )
    except (
        ManifestError,
        ConfigError,
        CheckpointError,
        FileNotFoundError,
        NonFiniteError,
        MisconfigurationException,  # Lightning's word on Trainer settings that do not go together
    ) as error:
        # From a DataLoader worker the message holds the worker's traceback; its last line is the error.
        message = (
            str(error).strip().splitlines()[-1].removeprefix(f"{ManifestError.__module__}.ManifestError: ")
        )
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
