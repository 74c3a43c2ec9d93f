"""Training learns, through the real CLI: a tiny model with the default ResNet image encoder memorises a small
batch of real samples whose labels only memorising can fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.probes import finish, fit_command, losses, start
from tests.test_resume import summary

DEFAULT_IMAGE = {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 128], "output_stride": 8}  # default.yaml's
EPOCHS = 80  # one step each


@pytest.mark.slow
def test_a_tiny_model_memorises_a_small_real_batch(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    rows = [json.loads(line) for line in digit_manifests["train"].read_text().splitlines()][:16]
    batch = digit_manifests["train"].parent / "memorise.jsonl"
    batch.write_text("".join(json.dumps(r | {"label": "abcd"[i % 4]}) + "\n" for i, r in enumerate(rows)))
    command = fit_command(
        tmp_path,
        {"train": batch, "val": batch},
        "--data.batch_size=16",
        "--data.test_manifest=null",
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.check_val_every_n_epoch={EPOCHS}",
        "--trainer.num_sanity_val_steps=0",
        "--model.lr=0.01",
        "--model.warmup_steps=5",
        "--model.config.text.dropout=0",
        "--model.config.audio.spec_augment=false",
        "--model.config.image.backbone=resnet18",
        "--model.config.image.image_size=32",
        f"--model.config.image.timm_kwargs={json.dumps(DEFAULT_IMAGE)}",
    )
    out = finish(start(command, tmp_path / "out.txt"), tmp_path / "out.txt")
    trajectory = [loss for _, loss in losses(tmp_path)]
    assert len(trajectory) == EPOCHS
    assert trajectory[-1] < trajectory[0] / 10  # classification, caption and MoE losses together (~16x here)
    metrics = summary(out)
    assert float(metrics["val/acc"]) == 1.0  # every arbitrary label, in evaluation mode
    assert float(metrics["val/cls_loss"]) < 0.05
