"""Routing analysis: the command writes real PNG figures from a trained checkpoint, its counts add up, and
validation logs the routing heatmap to TensorBoard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning as L
import pytest
from PIL import Image

from multimoe.data.datamodule import MultiModalDataModule
from multimoe.model import MultiMoE, build_model
from multimoe.tools.analysis import main as analysis_main
from multimoe.tools.analysis import summarize
from multimoe.training.module import MultiMoEModule
from tests.test_model import tiny_config


def test_analysis_writes_png_figures(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint, _ = trained
    out = tmp_path / "figures"
    analysis_main([str(checkpoint), str(digit_manifests["test"]), "--out", str(out), "--samples", "2"])
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "router_entropy_drop.png",
        "routing.json",
        "routing_shares.png",
        "sample_s2-0.png",
        "sample_s2-1.png",
    ]
    report = json.loads((out / "routing.json").read_text())
    [layer] = report["layers"]  # tiny.yaml: one MoE layer
    for m in layer["modalities"].values():
        assert sum(m["shares"].values()) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= m["label_bits"] <= m["expert_bits"] + 1e-9 and m["position_bits"] >= 0.0
    assert layer["cross_modal_experts"] == [6] and report["tokens"] > 0
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.verify()  # a complete, valid PNG
            assert image.format == "PNG" and min(image.size) > 100


def test_routing_summary_counts_every_token(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path]
) -> None:
    checkpoint, _ = trained
    model = MultiMoE.from_checkpoint(checkpoint)
    data = MultiModalDataModule(
        test_manifest=str(digit_manifests["test"]),
        config=model.config,
        base_labels=model.labels,
        base_vocab=model.vocab,
    )
    data.setup()
    summary = summarize(model, data.datasets["test"], keep=3, batch_size=5)
    top_k = model.config.moe.top_k
    for counts in summary.counts:  # dropless token choice: every real token makes top_k assignments
        assert int(counts.sum()) == top_k * summary.tokens
    assert all(d == 0.0 for d in summary.dropped) and all(e > 0.0 for e in summary.entropy)
    assert len(summary.samples) == 3
    first = next(iter(summary.samples.values()))  # s2-0 has all three modalities
    assert set(first) == {"text", "image", "audio"} and first["image"].shape[0] == len(summary.counts)


def test_dense_model_has_no_routing_to_draw() -> None:
    config = tiny_config()
    dense = build_model(dataclasses.replace(config, moe=dataclasses.replace(config.moe, every=0)), ["a", "b"])
    with pytest.raises(ValueError, match="no MoE layer"):
        summarize(dense, [])  # type: ignore[arg-type]


def test_validation_logs_the_routing_heatmap_to_tensorboard(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config()
    config = dataclasses.replace(config, caption=dataclasses.replace(config.caption, max_length=24))
    data = MultiModalDataModule(
        str(digit_manifests["train"]), val_manifest=str(digit_manifests["val"]), config=config, batch_size=8
    )
    module = MultiMoEModule(config, data.labels, data.vocab)
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path)
    trainer = L.Trainer(
        logger=logger, limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule=data, verbose=False)
    events = EventAccumulator(logger.log_dir).Reload()
    assert events.Tags()["images"] == ["val_routing/shares"]
