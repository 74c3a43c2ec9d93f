"""Missing modalities: modality dropout in training and evaluation with a modality removed, end to end through
the data pipeline and the model (absent, never zeros)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from multimoe.config import ConfigError, MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.data.dataset import SamplingOptions
from multimoe.modality import Modality
from multimoe.training.module import MultiMoEModule
from tests.conftest import ROOT

ALL = ["text", "image", "audio"]


def test_modality_dropout_drops_at_the_rate_and_never_empties_a_sample() -> None:
    torch.manual_seed(0)
    half = SamplingOptions(modality_dropout=0.5)
    kept = [half.choose(ALL) for _ in range(4000)]
    assert all(k and set(k) <= set(ALL) for k in kept)
    # Each of 3 modalities stays with p = 0.5; the 1/8 of samples that would lose all keep one.
    mean = sum(len(k) for k in kept) / len(kept)
    assert abs(mean - (1.5 + 1 / 8)) < 0.05
    assert {m: sum(m in k for k in kept) / len(kept) for m in ALL} == pytest.approx(
        dict.fromkeys(ALL, 0.5 + 1 / 24), abs=0.03
    )
    always = SamplingOptions(modality_dropout=1.0)
    assert all(len(always.choose(ALL)) == 1 for _ in range(50))
    assert always.choose(["audio"]) == ["audio"] and SamplingOptions().choose(ALL) == ALL
    with pytest.raises(ConfigError, match=r"data\.drop_modalities: unknown modality 'video'"):
        SamplingOptions(drop=["video"])


def test_modality_dropout_applies_to_training_only(digit_manifests: dict[str, Path]) -> None:
    torch.manual_seed(0)
    dm = MultiModalDataModule(
        str(digit_manifests["train"]),
        val_manifest=str(digit_manifests["val"]),
        batch_size=48,
        config=MultiMoEConfig(),
        modality_dropout=0.5,
    )
    dm.setup("fit")

    def present(loader: object) -> int:
        batch = next(iter(loader))  # type: ignore[call-overload]
        assert all(  # every sample keeps at least one modality
            any(i in part.rows.tolist() for part in batch.inputs.parts.values()) for i in range(len(batch))
        )
        return sum(len(part.rows) for part in batch.inputs.parts.values())

    rows = dm.rows["fit"]
    written = sum(getattr(r, m) is not None for r in rows for m in ALL)
    assert present(dm.train_dataloader()) < 0.75 * written
    val_written = sum(getattr(r, m) is not None for r in dm.rows["validate"] for m in ALL)
    assert present(dm.val_dataloader()) == val_written


def test_drop_modalities_equals_writing_the_rows_without_them(digit_manifests: dict[str, Path]) -> None:
    """Evaluating with --data.drop_modalities [audio, text] gives exactly the outputs of a manifest written
    without them; rows that had only those are left out and counted."""
    rows = [json.loads(line) for line in digit_manifests["val"].read_text().splitlines()]
    without = digit_manifests["val"].parent / "val_images_only.jsonl"  # relative paths still resolve
    image_rows = [{k: v for k, v in r.items() if k not in ("audio", "text")} for r in rows if "image" in r]
    without.write_text("".join(json.dumps(r) + "\n" for r in image_rows))
    tiny = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]["config"]
    config = MultiMoEConfig.from_dict(tiny)

    def outputs(manifest: Path, drop: list[str] | None) -> tuple[list[str], torch.Tensor, set[Modality]]:
        dm = MultiModalDataModule(
            str(digit_manifests["train"]),
            val_manifest=str(manifest),
            batch_size=64,
            config=config,
            drop_modalities=drop,
        )
        dm.setup("validate")
        torch.manual_seed(0)
        module = MultiMoEModule(config, dm.labels, dm.vocab).eval()
        batch = next(iter(dm.val_dataloader()))
        with torch.no_grad():
            logits = module(batch).class_logits
        assert logits is not None
        return batch.ids, logits, set(batch.inputs.parts)

    left_out = len(rows) - len(image_rows)
    assert left_out > 0
    with pytest.warns(UserWarning, match=f"{left_out} rows have only the dropped modalities"):
        ids, dropped, parts = outputs(digit_manifests["val"], ["audio", "text"])
    assert parts == {Modality.IMAGE}
    ids_without, written, _ = outputs(without, None)
    assert ids == ids_without == [r["id"] for r in image_rows]
    torch.testing.assert_close(dropped, written, rtol=0, atol=0)
    all_ids, full, _ = outputs(digit_manifests["val"], None)
    full = full[[all_ids.index(i) for i in ids]]
    assert not torch.allclose(full, dropped)  # audio and text mattered before they were dropped
