"""Fine-tuning: a grown model computes what the checkpoint did; freezing really freezes; a new label set and
vocabulary keep what the checkpoint knew; train.py fine-tunes in one command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from multimoe.config import MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.finetune import FinetuneConfig, grown_config, transfer
from multimoe.model import MultiMoE, build_model
from tests.conftest import ROOT


def tiny_config(**moe: object) -> MultiMoEConfig:
    config = MultiMoEConfig.from_dict(
        yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]["config"]
    )
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **moe))  # type: ignore[arg-type]


def batch_of(digit_manifests: dict[str, Path], config: MultiMoEConfig) -> tuple[MultiModalDataModule, object]:
    dm = MultiModalDataModule(
        str(digit_manifests["train"]), val_manifest=str(digit_manifests["val"]), batch_size=16, config=config
    )
    dm.setup("validate")
    return dm, next(iter(dm.val_dataloader()))


def trained_like(config: MultiMoEConfig, dm: MultiModalDataModule, seed: int = 0) -> MultiMoE:
    """A model with random weights, and router and layer-norm weights far from their init."""
    torch.manual_seed(seed)
    sized = dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=len(dm.vocab)),
        classifier=dataclasses.replace(config.classifier, num_classes=len(dm.labels)),
        caption=dataclasses.replace(config.caption, vocab_size=len(dm.vocab)),
    )
    model = build_model(sized, dm.labels, dm.vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".router." in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("moe", "grow"),
    [
        ({}, FinetuneConfig(add_experts=2)),
        ({"bias_update_rate": 0.01, "cross_modal_experts": 0}, FinetuneConfig(add_experts=1)),
        ({}, FinetuneConfig(add_modalities=["audio"])),
    ],
    ids=["experts", "experts-with-bias-no-cross", "modality"],
)
def test_a_grown_model_computes_what_it_computed_before(
    digit_manifests: dict[str, Path], moe: dict[str, object], grow: FinetuneConfig
) -> None:
    config = tiny_config(**moe)
    if grow.add_modalities:
        config = dataclasses.replace(config, modalities=["text", "image"])
    dm, batch = batch_of(digit_manifests, config)
    base = trained_like(config, dm)
    grown = build_model(grown_config(base.config, grow), base.labels, base.vocab).eval()
    new = transfer(base, grown)
    layers, old_layers = grown.moe_layers(), base.moe_layers()
    added = len(config.modalities) * grow.add_experts + config.moe.experts_per_modality * len(
        grow.add_modalities
    )
    assert [
        layer.experts.num_experts - old.experts.num_experts
        for layer, old in zip(layers, old_layers, strict=True)
    ] == [added] * len(layers)
    assert len(new) == len(config.modalities) * grow.add_experts * len(layers)  # each starts out of reach
    with torch.no_grad():
        before, after = base(batch.inputs), grown(batch.inputs)  # type: ignore[attr-defined]
    assert after.class_logits is not None and before.class_logits is not None
    torch.testing.assert_close(after.class_logits, before.class_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.trunk.tokens, before.trunk.tokens, rtol=1e-5, atol=1e-6)
    # the copies are real copies: each new expert holds the weights of an expert of its modality
    for n in new:
        layer = next(layer for layer in layers if layer.router is n.router)
        same = [
            e
            for e in range(layer.experts.num_experts)
            if e != n.expert and torch.equal(layer.experts.down_proj[e], layer.experts.down_proj[n.expert])
        ]
        assert same and all(layer.router.allowed[n.modality, e] for e in same)


def test_new_labels_and_words_keep_what_the_checkpoint_knew(digit_manifests: dict[str, Path]) -> None:
    config = tiny_config()
    dm, _ = batch_of(digit_manifests, config)
    base = trained_like(config, dm)
    labels, vocab = ["even", "odd", "zero"], [*base.vocab, "brand", "new"]
    sized = dataclasses.replace(
        base.config,
        text=dataclasses.replace(base.config.text, vocab_size=len(vocab)),
        classifier=dataclasses.replace(base.config.classifier, num_classes=3),
        caption=dataclasses.replace(base.config.caption, vocab_size=len(vocab)),
    )
    torch.manual_seed(1)
    model = build_model(sized, labels, vocab)
    assert transfer(base, model) == []
    old, new = base.state_dict(), model.state_dict()
    assert torch.equal(new["classifier.out.weight"][:2], old["classifier.out.weight"])
    assert not torch.equal(new["classifier.out.weight"][2], torch.zeros_like(new["classifier.out.weight"][2]))
    grew = [k for k in new if new[k].shape != old[k].shape]
    assert {k for k in grew if "classifier" not in k} == {
        k for k in new if new[k].shape[:1] == (len(vocab),) and old[k].shape[:1] == (len(base.vocab),)
    }
    assert len(grew) >= 4  # text embeddings, caption embeddings, caption output weight and bias
    for k in grew:
        n = old[k].shape[0]
        assert torch.equal(new[k][:n], old[k]), k
    for k in set(new) - set(grew):
        assert torch.equal(new[k], old[k]), k


def test_train_py_fine_tunes_with_frozen_parts_new_labels_and_more_experts(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    from multimoe.cli import main

    checkpoint, _ = trained
    rows = [json.loads(line) for line in digit_manifests["train"].read_text().splitlines()]
    for i, row in enumerate(rows):  # a new label set, and caption words the checkpoint never saw
        row["label"] = ["even", "odd", "zero"][i % 3]
        row["caption"] = f"brand new words {i % 4}"
    train = digit_manifests["train"].parent / "finetune.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            "configs/tiny.yaml",
            f"--data.train_manifest={train}",
            f"--data.val_manifest={train}",
            "--data.test_manifest=null",
            f"--finetune.checkpoint={checkpoint}",
            "--finetune.freeze=[encoders, router]",
            "--finetune.add_experts=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}",
        ]
    )
    base = torch.load(checkpoint, weights_only=False)
    tuned = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    assert tuned["hyper_parameters"]["labels"] == ["even", "odd", "zero"]
    vocab = tuned["hyper_parameters"]["vocab"]
    assert vocab[: len(base["hyper_parameters"]["vocab"])] == base["hyper_parameters"]["vocab"]
    assert {"brand", "new"} <= set(vocab)
    old, new = base["state_dict"], tuned["state_dict"]
    encoders = [k for k in old if k.startswith("model.encoders.") and "word_embeddings" not in k]
    assert encoders and all(torch.equal(new[k], old[k]) for k in encoders)  # frozen: bit-identical
    # router rows: the old experts' (text 0-1, image 2-3, audio 4-5, cross 6) moved to 0-1, 3-4, 6-7, 9
    routers = [k for k in old if k.endswith("router.proj.weight")]
    moved = [0, 1, 3, 4, 6, 7, 9]
    assert routers and all(torch.equal(new[k][moved], old[k]) for k in routers)
    experts = [k for k in old if ".experts." in k]
    assert experts and all(not torch.equal(new[k][moved], old[k]) for k in experts)  # trained
    heads = [k for k in old if k.startswith("model.captioner.") and new[k].shape == old[k].shape]
    assert heads and any(not torch.equal(new[k], old[k]) for k in heads)
