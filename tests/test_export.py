"""Modality-sliced export: the slice keeps only what its inputs can reach and, on inputs of those modalities,
computes exactly what the whole model computes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from multimoe.config import LoraConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.model import MultiMoE, build_model
from multimoe.surgery import transfer
from multimoe.tools.export import main as export_main
from tests.test_finetune import tiny_config, trained_like


@pytest.mark.parametrize(
    ("moe", "keep", "heads"),
    [
        ({"shared_experts": 1, "bias_update_rate": 0.01}, ["image", "audio"], "classify"),
        ({}, ["image"], "both"),
        ({"router": "expert_choice", "capacity_factor": 1.5}, ["text", "audio"], "caption"),
    ],
    ids=["image-audio-classify-shared-bias", "image-both", "text-audio-caption-expert-choice"],
)
def test_a_slice_computes_what_the_whole_model_does_on_its_modalities(
    digit_manifests: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    moe: dict[str, object],
    keep: list[str],
    heads: str,
) -> None:
    config = tiny_config(**moe)
    dropped = [m for m in config.modalities if m not in keep]
    dm = MultiModalDataModule(
        str(digit_manifests["train"]),
        val_manifest=str(digit_manifests["val"]),
        batch_size=16,
        config=config,
        drop_modalities=dropped,
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    model = trained_like(config, dm)
    with torch.no_grad():
        for layer in model.moe_layers():  # a routing bias far from zero, so its columns must line up
            if layer.router.bias is not None:
                layer.router.bias.normal_()
    model.save_pretrained(tmp_path / "whole")

    export_main(
        [
            str(tmp_path / "whole"),
            str(tmp_path / "slice"),
            f"--modalities={','.join(keep)}",
            f"--heads={heads}",
        ]
    )
    report = json.loads(capsys.readouterr().out.splitlines()[0])
    assert report["bytes"]["after"] < report["bytes"]["before"]
    sliced = MultiMoE.from_pretrained(tmp_path / "slice").eval()
    assert list(sliced.encoders) == keep and sliced.config.modalities == keep
    assert (sliced.classifier is not None) == (heads != "caption")
    assert (sliced.captioner is not None) == (heads != "classify")
    epm, cross = config.moe.experts_per_modality, config.moe.cross_modal_experts
    assert all(layer.experts.num_experts == len(keep) * epm + cross for layer in sliced.moe_layers())

    with torch.no_grad():
        whole = model.eval()(batch.inputs)  # type: ignore[attr-defined]
        part = sliced(batch.inputs)  # type: ignore[attr-defined]
        torch.testing.assert_close(part.trunk.tokens, whole.trunk.tokens, rtol=1e-6, atol=1e-6)
        if sliced.classifier is not None:
            torch.testing.assert_close(part.class_logits, whole.class_logits, rtol=1e-6, atol=1e-6)
        if sliced.captioner is not None:
            assert sliced.generate(batch.inputs) == model.generate(batch.inputs)  # type: ignore[attr-defined]


def test_a_slice_of_a_modality_the_model_does_not_read_is_one_line(
    digit_manifests: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny_config()
    dm = MultiModalDataModule(str(digit_manifests["train"]), batch_size=4, config=config)
    dm.setup("fit")
    trained_like(config, dm).save_pretrained(tmp_path / "whole")
    with pytest.raises(SystemExit) as stop:
        export_main([str(tmp_path / "whole"), str(tmp_path / "slice"), "--modalities=image,video"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: slice: the model reads text, image, audio; it cannot keep 'video'"
    )
    assert not (tmp_path / "slice").exists()


def test_a_model_with_lora_adapters_slices_with_them_folded_in(digit_manifests: dict[str, Path]) -> None:
    config = tiny_config()
    dm = MultiModalDataModule(
        str(digit_manifests["train"]),
        val_manifest=str(digit_manifests["val"]),
        batch_size=16,
        config=config,
        drop_modalities=["text"],
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    base = trained_like(config, dm)
    lora = LoraConfig(r=2, targets=["image", "experts"])
    adapted = build_model(dataclasses.replace(base.config, lora=lora), base.labels, base.vocab)
    transfer(base, adapted)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)
    sliced = adapted.eval().sliced(["image", "audio"])
    assert sliced.config.lora.r == 0 and adapted.config.lora.r == 2  # the source keeps its adapters
    with torch.no_grad():
        want = adapted(batch.inputs).class_logits  # type: ignore[attr-defined]
        torch.testing.assert_close(sliced(batch.inputs).class_logits, want, rtol=1e-5, atol=1e-5)  # type: ignore[attr-defined]
