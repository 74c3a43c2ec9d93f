"""ONNX graphs (multimoe.portable) run in onnxruntime and compute what the eager model computes, on real
samples, at any batch size, text and audio length, and with modalities missing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from multimoe.data.datamodule import MultiModalDataModule
from multimoe.model import MultiMoE
from multimoe.portable import OnnxModel, StaticModel, export_onnx
from multimoe.tools.export import main as export_main
from tests.test_finetune import tiny_config, trained_like

TOLERANCE = 1e-4  # absolute, on logits: what docs/inference.md states


def batches(model: MultiMoE | OnnxModel, manifest: Path, size: int, drop: list[str] | None = None) -> list:
    data = MultiModalDataModule(
        test_manifest=str(manifest),
        batch_size=size,
        config=model.config,
        base_vocab=model.vocab,
        base_labels=model.labels,
        drop_modalities=drop,
    )
    data.setup("test")
    return list(data.test_dataloader())


def assert_same(model: MultiMoE, graph: OnnxModel, batch: object) -> None:
    inputs = batch.inputs  # type: ignore[attr-defined]
    with torch.no_grad():
        eager = model(inputs)
    out = graph(inputs)
    if model.classifier is not None:
        assert out.class_logits is not None and out.class_logits.shape == eager.class_logits.shape
        torch.testing.assert_close(out.class_logits, eager.class_logits, rtol=0, atol=TOLERANCE)
    if model.captioner is not None:
        assert out.memory is not None and out.memory_mask is not None
        # the same real tokens, in the same order; a modality absent from the whole batch adds masked slots
        real = eager.encoded.mask
        assert torch.equal(out.memory_mask.sum(dim=1), real.sum(dim=1))
        tokens = out.memory[out.memory_mask]
        torch.testing.assert_close(tokens, eager.trunk.tokens[real], rtol=0, atol=TOLERANCE)
        assert graph.generate(inputs) == model.generate(inputs)


def test_the_exported_graphs_match_the_checkpoint_on_real_samples(
    trained: tuple[Path, list[str]],
    digit_manifests: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint, _ = trained
    export_main([str(checkpoint), str(tmp_path / "onnx"), "--onnx"])
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["format"] == "onnx" and report["modalities"] == ["text", "image", "audio"]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "config.json",
        "decoder_step.onnx",
        "model.onnx",
    ]
    model = MultiMoE.from_pretrained(checkpoint).eval()
    graph = OnnxModel(tmp_path / "onnx")
    assert graph.labels == model.labels and graph.vocab == model.vocab
    test = digit_manifests["test"]  # every fifth sample lacks a modality
    for size in (1, 5, 16):  # other batch sizes, text and audio lengths than the graph was traced with
        for batch in batches(graph, test, size)[:3]:
            assert_same(model, graph, batch)
    for drop in (["audio"], ["text", "image"]):  # a modality absent from the whole batch
        assert_same(model, graph, batches(graph, test, 8, drop)[0])


def test_a_sliced_graph_with_shared_experts_a_routing_bias_and_grey_images(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    config = tiny_config(shared_experts=1, bias_update_rate=0.01, expert_activation="gelu", top_k=1)
    grey = dataclasses.replace(config.image, in_chans=1, mean=[0.5], std=[0.5])
    config = dataclasses.replace(config, image=grey)
    data = MultiModalDataModule(str(digit_manifests["train"]), batch_size=8, config=config)
    data.setup("fit")
    model = trained_like(config, data)
    with torch.no_grad():
        for layer in model.moe_layers():
            assert layer.router.bias is not None
            layer.router.bias.normal_()  # selection differs from the gates' ranking
    sliced = model.sliced(["image", "audio"], caption=False).eval()
    export_onnx(sliced, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "decoder_step.onnx").exists()
    graph = OnnxModel(tmp_path / "onnx")
    for batch in batches(graph, digit_manifests["test"], 6, drop=["text"]):
        assert_same(sliced, graph, batch)


@pytest.mark.parametrize(
    "moe",
    [{"router": "expert_choice", "capacity_factor": 1.5}, {"eval_capacity_factor": 1.0}],
    ids=["expert-choice", "eval-capacity"],
)
def test_routing_that_depends_on_the_batch_is_refused(
    digit_manifests: dict[str, Path], moe: dict[str, object]
) -> None:
    config = tiny_config(**moe)
    data = MultiModalDataModule(str(digit_manifests["train"]), batch_size=8, config=config)
    data.setup("fit")
    with pytest.raises(ValueError, match=r"expert-choice routing .* do not export"):
        StaticModel(trained_like(config, data))
