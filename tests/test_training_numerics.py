"""Numerics of a training step, in-process with a real Trainer on the tiny config: a planted NaN is caught
with its step and sample ids (stop, or skip the step); bf16-mixed trains with the router in fp32;
activation checkpointing leaves the gradients unchanged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from multimoe.config import MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.modality import Modality
from multimoe.training.callbacks import NonFiniteError, NonFiniteGuard
from multimoe.training.module import MultiMoEModule

ROOT = Path(__file__).resolve().parents[1]


def tiny(manifests: dict[str, Path], **trunk: Any) -> tuple[MultiMoEModule, MultiModalDataModule]:
    values = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["model"]["config"]
    values["trunk"] |= trunk
    config = MultiMoEConfig.from_dict(values)
    data = MultiModalDataModule(str(manifests["train"]), config=config, batch_size=8)
    torch.manual_seed(0)
    return MultiMoEModule(config, data.labels, data.vocab, warmup_steps=2), data


def trainer(steps: int, *callbacks: L.Callback, accelerator: str = "cpu", **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator=accelerator,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **kwargs,
    )


class PlantNaN(L.Callback):
    """Puts a NaN into the first image of the batch of step ``step`` and notes that sample and the weights."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.planted = ""
        self.unchanged_by_step: bool | None = None

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            image = batch.inputs.parts[Modality.IMAGE]
            image.tensors["pixels"][0, 0, 0, 0] = math.nan
            self.planted = batch.ids[int(image.rows[0])]
            self.before = [p.detach().clone() for p in module.parameters()]

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, i: int) -> None:
        if self.planted and self.unchanged_by_step is None:
            after = list(module.parameters())
            self.unchanged_by_step = all(torch.equal(a, b) for a, b in zip(self.before, after, strict=True))


def test_non_finite_loss_stops_with_step_and_sample_ids(digit_manifests: dict[str, Path]) -> None:
    module, data = tiny(digit_manifests)
    plant = PlantNaN(step=1)
    with pytest.raises(NonFiniteError, match="global step 1") as error:
        trainer(3, NonFiniteGuard(), plant).fit(module, datamodule=data)
    assert plant.planted and repr(plant.planted) in str(error.value)


def test_non_finite_step_is_skipped_and_training_goes_on(digit_manifests: dict[str, Path]) -> None:
    module, data = tiny(digit_manifests)
    guard, plant = NonFiniteGuard(skip=True), PlantNaN(step=1)
    run = trainer(3, guard, plant)
    run.fit(module, datamodule=data)
    assert guard.skipped == [1] and run.global_step == 3
    assert plant.unchanged_by_step  # the optimizer did not touch the weights (nor AdamW's decay)
    assert all(p.isfinite().all() for p in module.parameters())


def test_bf16_mixed_trains_with_the_router_in_fp32(digit_manifests: dict[str, Path]) -> None:
    module, data = tiny(digit_manifests)
    router: list[torch.dtype] = []
    trunk: list[torch.dtype] = []
    moe = module.model.moe_layers()[0]
    moe.router.register_forward_hook(lambda _m, _i, out: router.append(out.logits.dtype))
    module.model.trunk.blocks[0].attn.q.register_forward_hook(lambda _m, _i, out: trunk.append(out.dtype))
    losses: list[float] = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, m: Any, outputs: Any, b: Any, i: int) -> None:
            losses.append(float(outputs["loss"]))

    trainer(2, NonFiniteGuard(), Losses(), precision="bf16-mixed").fit(module, datamodule=data)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert set(trunk) == {torch.bfloat16} and set(router) == {torch.float32}
    assert module.model.trunk.blocks[0].attn.q.weight.dtype == torch.float32  # fp32 master weights


def test_activation_checkpointing_gives_the_same_gradients(digit_manifests: dict[str, Path]) -> None:
    plain, data = tiny(digit_manifests)
    checkpointed, _ = tiny(digit_manifests, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    data.setup()
    batch = next(iter(data.train_dataloader()))
    grads = []
    for module in (plain, checkpointed):
        module.train()
        torch.manual_seed(1)  # the same SpecAugment masks in both
        module._losses(batch, module(batch))["loss"].backward()
        grads.append({n: p.grad for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
