"""The training system: losses, metrics, logging and optimisation around a MultiMoE (no architecture here)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from multimoe.config import ConfigError, GenerationConfig, MultiMoEConfig
from multimoe.data.collate import Batch
from multimoe.data.dataset import IGNORE_INDEX
from multimoe.modality import Modality
from multimoe.model import MultiMoE, MultiMoEOutput, build_model
from multimoe.moe.diagnostics import RoutingTally, tally_batch, verdicts
from multimoe.moe.parallel import clip_grad_norm_
from multimoe.training.metrics import caption_metrics, classification_report

# logged name -> RouterStats field, averaged over the MoE layers
ROUTER_LOGS = {
    "load_balance": "load_balance_loss",
    "router_z": "z_loss",
    "router_entropy": "entropy",
    "dropped": "dropped_fraction",
}


class MultiMoEModule(L.LightningModule):
    """Args:
    config: the model's architecture (typed, see ``multimoe.config``).
    labels: class names, in class-index order (the CLI fills them in from the training manifest).
    vocab: the word vocabulary of the tokenizer (likewise filled in from the training manifest).
    lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to zero.
    caption_loss_weight: weight of the caption loss against the classification loss.
    generation: how captions are generated in validation, test and predict (greedy by default).
    """

    def __init__(
        self,
        config: MultiMoEConfig | None = None,
        labels: list[str] | None = None,
        vocab: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        caption_loss_weight: float = 1.0,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__()
        for name, value, ok in [
            ("lr", lr, lr > 0),
            ("weight_decay", weight_decay, weight_decay >= 0),
            ("warmup_steps", warmup_steps, warmup_steps >= 0),
            ("caption_loss_weight", caption_loss_weight, caption_loss_weight >= 0),
        ]:
            if not ok:
                raise ConfigError(f"model.{name}: must be {'> 0' if name == 'lr' else '>= 0'}, got {value}")
        if isinstance(config, dict):  # from a checkpoint's hyper-parameters
            config = MultiMoEConfig.from_dict(config)
        self.labels = list(labels or [])
        self.config = _sized(config or MultiMoEConfig(), len(self.labels), len(vocab or []))
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.caption_loss_weight = caption_loss_weight
        # Not a saved hyper-parameter: the CLI applies a checkpoint's over the command line's, and how to
        # generate is chosen per command (``--model.generation.strategy beam``).
        self.generation = generation or GenerationConfig()
        self.save_hyperparameters(
            {"config": self.config.to_dict(), "labels": self.labels, "vocab": vocab, "lr": lr}
            | {
                "weight_decay": weight_decay,
                "warmup_steps": warmup_steps,
                "caption_loss_weight": caption_loss_weight,
            }
        )
        self.model: MultiMoE = build_model(self.config, self.labels, vocab)
        self.words = self.model.words
        num_classes = max(len(self.labels), 2)
        self.metrics = torch.nn.ModuleDict(
            {f"{s}_acc": MulticlassAccuracy(num_classes, average="micro") for s in ("train", "val", "test")}
            | {f"{s}_caption_exact": MeanMetric() for s in ("val", "test")}
            | {f"{s}_macro_f1": MulticlassF1Score(num_classes, average="macro") for s in ("val", "test")}
            | {"test_confusion": MulticlassConfusionMatrix(num_classes)}
        )
        self._metric("train_acc").persistent(True)  # checkpointed: a resume mid-epoch keeps the epoch's count
        # Generated captions and their references over an eval epoch: corpus metrics need them all.
        self.captions: tuple[list[str], list[list[str]]] = ([], [])
        self.test_report: dict[str, Any] = {}  # classification report and caption metrics of the last test
        self.test_captions: tuple[list[str], list[list[str]]] = ([], [])  # and its captions, references
        self.tallies: list[RoutingTally] = []  # per MoE layer, over an eval epoch (moe.diagnostics)
        self.imbalance = ""  # what the last validation found uneven

    # ---- steps -------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> MultiMoEOutput:
        caption_in = None if batch.caption_ids is None else batch.caption_ids[:, :-1]
        return self.model(batch.inputs, caption_in)

    def _losses(self, batch: Batch, out: MultiMoEOutput) -> dict[str, torch.Tensor]:
        losses = {"aux": out.aux_loss}
        if out.class_logits is not None:
            count = (batch.labels != IGNORE_INDEX).sum().clamp_min(1)
            ce = F.cross_entropy(
                out.class_logits.float(), batch.labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            losses["cls"] = ce / count
        if out.caption_logits is not None and batch.caption_ids is not None and self.words is not None:
            target = batch.caption_ids[:, 1:]
            count = (target != self.words.pad_id).sum().clamp_min(1)
            ce = F.cross_entropy(
                out.caption_logits.flatten(0, 1).float(),
                target.flatten(),
                ignore_index=self.words.pad_id,
                label_smoothing=self.config.caption.label_smoothing,
                reduction="sum",
            )
            losses["caption"] = ce / count
        losses["loss"] = (
            losses["aux"] + losses.get("cls", 0.0) + self.caption_loss_weight * losses.get("caption", 0.0)
        )
        return losses

    def training_step(self, batch: Batch, batch_idx: int) -> dict[str, Any] | None:
        if self._count_skipped("train", batch):
            return None  # every sample of the batch was skipped: no step
        out = self(batch)
        losses = self._losses(batch, out)
        self._log_losses("train", losses, out, len(batch))
        if out.class_logits is not None:
            self._update_accuracy("train", out.class_logits, batch.labels)
            self.log(
                "train/acc", self._metric("train_acc"), on_step=False, on_epoch=True, batch_size=len(batch)
            )
        return {"loss": losses["loss"], "tokens_per_expert": [s.tokens_per_expert for s in out.router_stats]}

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        """After the optimizer step: the auxiliary-loss-free bias step, on the routing counts of all ranks."""
        if self.config.moe.bias_update_rate > 0 and outputs is not None:
            reduce = self.trainer.strategy.reduce
            self.model.update_routing_bias([reduce(c, reduce_op="sum") for c in outputs["tokens_per_expert"]])

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_step(self, stage: str, batch: Batch) -> None:
        if self._count_skipped(stage, batch):
            return
        out = self(batch)
        self._log_losses(stage, self._losses(batch, out), out, len(batch))
        if out.router_stats and not self.tallies:
            m, e = out.router_stats[0].tokens_per_expert.shape
            self.tallies = [RoutingTally.empty(m, e, len(self.labels), self.device) for _ in out.router_stats]
        tally_batch(self.tallies, out.router_stats, out.encoded, batch.labels)
        if out.class_logits is not None:
            self._update_accuracy(stage, out.class_logits, batch.labels)
            self.log(
                f"{stage}/acc",
                self._metric(f"{stage}_acc"),
                on_epoch=True,
                prog_bar=True,
                batch_size=len(batch),
            )
            keep = batch.labels != IGNORE_INDEX
            for name in [f"{stage}_macro_f1"] + ["test_confusion"] * (stage == "test"):
                self._metric(name).update(out.class_logits[keep], batch.labels[keep])
            f1 = self._metric(f"{stage}_macro_f1")
            self.log(f"{stage}/macro_f1", f1, on_epoch=True, batch_size=len(batch))
        if self.model.captioner is not None and any(batch.references):
            self._eval_captions(stage, batch)

    def _eval_captions(self, stage: str, batch: Batch) -> None:
        captions = self.model.generate(batch.inputs, self.generation)
        have = [i for i, refs in enumerate(batch.references) if refs]
        assert self.words is not None
        refs = [[self.words.normalize(r) for r in batch.references[i]] for i in have]
        preds = [captions[i] for i in have]
        matches = torch.tensor([float(p in r) for p, r in zip(preds, refs, strict=True)], device=self.device)
        metric = self._metric(f"{stage}_caption_exact")
        metric.update(matches)
        self.log(f"{stage}/caption_exact", metric, on_epoch=True, prog_bar=True, batch_size=len(have))
        self.captions[0].extend(preds)
        self.captions[1].extend(refs)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        if len(batch) == 0:
            return []
        rows = self.model.predict(batch.inputs, self.generation)
        return [{"id": i} | row for i, row in zip(batch.ids, rows, strict=True)]

    # ---- logging -----------------------------------------------------------------------------------------
    def _count_skipped(self, stage: str, batch: Batch) -> bool:
        """Log ``<stage>/skipped_rows`` (samples whose files failed to load, summed per epoch); True when
        nothing is left of the batch."""
        if batch.skipped:
            self.log(
                f"{stage}/skipped_rows",
                float(batch.skipped),
                on_step=False,
                on_epoch=True,
                reduce_fx="sum",
                batch_size=1,
            )
        return len(batch) == 0

    def _metric(self, name: str) -> Metric:
        return cast(Metric, self.metrics[name])

    def _update_accuracy(self, stage: str, logits: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels != IGNORE_INDEX
        self._metric(f"{stage}_acc").update(logits[keep], labels[keep])

    def _log_losses(
        self, stage: str, losses: dict[str, torch.Tensor], out: MultiMoEOutput, size: int
    ) -> None:
        values = {
            f"{stage}/{name}_loss" if name != "loss" else f"{stage}/loss": v for name, v in losses.items()
        }
        if stats := out.router_stats:  # means over the MoE layers
            for name, field in ROUTER_LOGS.items():
                values[f"{stage}/{name}"] = sum(getattr(s, field) for s in stats) / len(stats)
        on_step = stage == "train"
        for name, value in values.items():
            self.log(
                name,
                value,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == f"{stage}/loss",
                batch_size=size,
                sync_dist=not on_step,  # an eval epoch's loss: the mean over every rank's samples
            )

    def on_validation_epoch_end(self) -> None:
        self._log_routing("val")
        self._log_caption_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_routing("test")
        self.test_captions = self.captions
        self.test_report = {"captions": self._log_caption_metrics("test")}
        if self.model.classifier is not None:
            confusion = self._metric("test_confusion")
            self.test_report["classification"] = classification_report(confusion.compute(), self.labels)
            confusion.reset()

    def _log_caption_metrics(self, stage: str) -> dict[str, float]:
        """BLEU-1..4, CIDEr-D and ROUGE-L of the epoch's captions (gathered from every process)."""
        preds, refs = self.captions
        self.captions = ([], [])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(parts, (preds, refs))
            preds, refs = [p for part in parts for p in part[0]], [r for part in parts for r in part[1]]
        scores = caption_metrics(preds, refs)
        for name, value in scores.items():
            self.log(f"{stage}/{name}", value, sync_dist=True)  # the same on every rank: from all captions
        return scores

    def _log_routing(self, stage: str) -> None:
        """Per MoE layer, over the tokens of all ranks (tokens identical in content counted once): each
        expert's share of its modality's assignments, the bits of specialization, and a warning on collapse.
        The sanity check's untrained router gets no verdict."""
        tallies, self.tallies = self.tallies, []
        if self.trainer.sanity_checking or not tallies:
            return
        tallies = [t.reduce(lambda x: self.trainer.strategy.reduce(x, reduce_op="sum")) for t in tallies]
        layers = self.model.moe_layers()
        names = self.config.modalities
        tokens = int(tallies[0].top.sum())
        log = functools.partial(self.log, sync_dist=True)  # the same on every rank: from all ranks' tallies
        found = []
        for index, (layer, tally) in enumerate(zip(layers, tallies, strict=True)):
            allowed = layer.router.allowed
            shares = tally.shares(allowed)
            cross = [e for e in range(allowed.shape[1]) if int(allowed[:, e].sum()) > 1]
            for name in names:
                m = Modality.from_name(name)
                for e in allowed[m].nonzero().flatten().tolist():
                    log(f"{stage}_routing/layer{index}/{name}/expert{e}", float(shares[m, e]))
                for key, bits in tally.specialization(m).items():
                    log(f"{stage}_specialization/layer{index}/{name}/{key}", bits)
            if cross:
                bits = tally.cross_modality_bits(cross)
                log(f"{stage}_specialization/layer{index}/cross_modality_bits", bits)
            found += [(index, v) for v in verdicts(shares, allowed, layer.router.top_k)]
        if isinstance(self.logger, TensorBoardLogger):
            from multimoe.tools.figures import share_heatmap  # matplotlib, only when drawing

            allowed_all = [layer.router.allowed for layer in layers]
            figure = share_heatmap([t.assigned for t in tallies], allowed_all, names)
            self.logger.experiment.add_figure(f"{stage}_routing/shares", figure, self.global_step)
        where = f"{stage} at step {self.global_step}, {tokens:,} tokens (identical ones counted once)"
        lines = [
            f"MoE layer {index}, {Modality(v.modality).key}: expert {v.expert} {v.what} (even: {v.even:.2f})"
            for index, v in found
        ]
        collapse = [line for line, (_, v) in zip(lines, found, strict=True) if v.kind == "collapse"]
        if collapse:
            remedy = "raise moe.load_balance_coef or set moe.bias_update_rate"
            if self.config.moe.balance_groups == "batch":  # the loss cannot see a modality's own experts
                remedy = "to keep every expert in use, balance per modality (moe.balance_groups: modality)"
            rank_zero_warn(f"routing collapse in {where}: " + "; ".join(collapse) + f"; {remedy}")
        uneven = [line for line, (_, v) in zip(lines, found, strict=True) if v.kind == "imbalance"]
        if stage == "val":
            self.imbalance = f"{where}: " + "; ".join(uneven) if uneven else ""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint taken after an epoch's last batch (at its validation) resumes into the next epoch: its
        train accuracy starts from zero there, as the uninterrupted run's does."""
        loop = self.trainer.fit_loop.epoch_loop
        if (
            loop.batch_progress.current.ready >= self.trainer.num_training_batches
            or loop.batch_progress.is_last_batch
        ):
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("metrics.train_acc.")]:
                state[key] = torch.zeros_like(state[key])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints from before the train accuracy was saved load with a fresh one."""
        for key, value in self.state_dict().items():
            if key.startswith("metrics."):
                checkpoint["state_dict"].setdefault(key, value)

    # ---- optimisation ------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Several ranks: each MoE layer's load-balancing loss counts the global batch's assignments."""
        for layer in self.model.moe_layers():
            layer.global_balance = self.trainer.world_size > 1

    def on_fit_end(self) -> None:
        for layer in self.model.moe_layers():
            layer.global_balance = False
        if self.imbalance:  # still there at the last validation: reported once, at the end
            rank_zero_warn(f"lasting routing imbalance in {self.imbalance}")

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's, except with experts split over ranks: then the norm is the whole model's."""
        sharded = [layer for layer in self.model.moe_layers() if layer.expert_parallel]
        if not (sharded and gradient_clip_val and gradient_clip_algorithm in (None, "norm")):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        experts = [p for layer in sharded for p in layer.experts.parameters()]
        mine = {id(p) for p in experts}
        replicated = [p for p in self.parameters() if id(p) not in mine]
        clip_grad_norm_(replicated, experts, gradient_clip_val, sharded[0].expert_group)

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _sized(config: MultiMoEConfig, num_classes: int, vocab_size: int) -> MultiMoEConfig:
    """The config with head and vocabulary sizes taken from the data."""
    text = config.text
    if text.backbone == "scratch" and vocab_size:
        text = dataclasses.replace(text, vocab_size=vocab_size)
    classify = config.classifier.enabled and num_classes >= 2
    caption = config.caption.enabled and vocab_size > 0
    return dataclasses.replace(
        config,
        text=text,
        classifier=dataclasses.replace(config.classifier, num_classes=num_classes if classify else 0),
        caption=dataclasses.replace(config.caption, vocab_size=vocab_size if caption else 0),
    )
