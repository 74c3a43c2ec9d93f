"""Routing diagnostics: the mutual information against hand-computed cases, identical tokens counted once,
collapse told from imbalance, and in training: a planted collapsed router is reported with its step, the
sanity check's untrained router gets no verdict, and validation logs the bits of specialization."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from multimoe.data.datamodule import MultiModalDataModule
from multimoe.moe.diagnostics import (
    RoutingTally,
    content_weights,
    mutual_information,
    token_positions,
    verdicts,
)
from multimoe.moe.layer import modality_expert_mask
from multimoe.training.module import MultiMoEModule
from tests.test_model import tiny_config


def test_mutual_information_equals_hand_computed_cases() -> None:
    assert mutual_information(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)  # one bit
    assert mutual_information(torch.tensor([[3, 3], [1, 1]])) == pytest.approx(0.0)  # independent
    # p = [[1/2, 0], [1/4, 1/4]]: I = 1/2 log2(2/(3/4)) + 1/4 log2(1/(3/4)) + 1/4 log2(1/(1/4)... by hand:
    # rows (1/2, 1/2), columns (3/4, 1/4); I = 1/2 log2(4/3) + 1/4 log2(2/3) + 1/4 log2(2) = 0.3113 bits
    expected = 0.5 * math.log2(4 / 3) + 0.25 * math.log2(2 / 3) + 0.25 * math.log2(2)
    assert mutual_information(torch.tensor([[2, 0], [1, 1]])) == pytest.approx(expected)
    assert expected == pytest.approx(0.3113, abs=1e-4)


def test_identical_tokens_weigh_one_together() -> None:
    blank, a, b = torch.zeros(4), torch.ones(4), torch.arange(4.0)
    tokens = torch.stack([blank, blank, blank, a, b, blank])
    groups = torch.tensor([1, 1, 1, 1, 1, 2])  # the last blank is another modality's
    torch.testing.assert_close(content_weights(tokens, groups), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1, 1, 1]))


def test_positions_count_from_each_modalitys_first_column() -> None:
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 1, 2]])
    mask = torch.tensor([[True, False, True, True, False, True], [True, True, False, False, False, True]])
    assert token_positions(mask, ids).tolist() == [0, 0, 1, 0, 0, 1, 0]


def test_a_heap_of_blank_patches_is_one_decision_not_a_collapse() -> None:
    """60 identical blank patches all sent to expert 0 and 8 distinct patches spread over experts 0-3:
    by token expert 0 takes 62 of 68 and looks collapsed, by content the shares are near even."""
    allowed = modality_expert_mask([1], 3, 4, 0)  # image: 4 experts, top-1
    tally = RoutingTally.empty(3, 4, 2, torch.device("cpu"))
    tokens = torch.cat([torch.zeros(60, 8), torch.randn(8, 8)])
    chosen = torch.tensor([0] * 60 + [0, 1, 2, 3, 0, 1, 2, 3])[:, None]
    modality = torch.ones(68, dtype=torch.long)
    weight = content_weights(tokens, modality)
    tally.add(modality, chosen[:, 0], chosen, weight, torch.zeros(68, dtype=torch.long), torch.arange(68))
    shares = tally.shares(allowed)
    assert shares[1].tolist() == pytest.approx([1 / 3, 2 / 9, 2 / 9, 2 / 9])
    assert verdicts(shares, allowed, top_k=1) == []
    by_token = RoutingTally.empty(3, 4, 2, torch.device("cpu"))
    by_token.add(
        modality, chosen[:, 0], chosen, torch.ones(68), torch.zeros(68, dtype=torch.long), torch.arange(68)
    )
    [verdict] = verdicts(by_token.shares(allowed), allowed, top_k=1)
    assert (verdict.kind, verdict.expert) == ("collapse", 0)  # 62 of 68 tokens: what counting tokens says


@pytest.mark.parametrize(
    ("shares", "kind", "expert"),
    [
        ([0.47, 0.20, 0.18, 0.15], "collapse", 0),  # top-2: picked by 94% of the tokens
        ([0.40, 0.38, 0.20, 0.02], "collapse", 3),  # an expert left unused
        ([0.38, 0.37, 0.20, 0.05], "imbalance", 3),  # uneven, all used
        ([0.30, 0.22, 0.20, 0.28], None, None),  # balanced enough
    ],
)
def test_collapse_is_told_from_imbalance(shares: list[float], kind: str | None, expert: int | None) -> None:
    allowed = modality_expert_mask([2], 3, 2, 2)  # the model reads audio only: experts 0, 1 and cross 2, 3
    table = torch.full((3, 4), float("nan"))
    table[2] = torch.tensor(shares)
    found = verdicts(table, allowed, top_k=2)
    assert [(v.kind, v.expert) for v in found] == ([] if kind is None else [(kind, expert)])
    two = modality_expert_mask([2], 3, 1, 1)  # two experts, top-2: every token uses both, no verdict
    assert verdicts(torch.tensor([[0, 0], [0, 0], [0.9, 0.1]]), two, top_k=2) == []


def test_a_cross_modal_expert_one_modality_leaves_to_another_is_not_a_collapse() -> None:
    allowed = modality_expert_mask([1, 2], 3, 2, 2)  # image: experts 0, 1; audio: 2, 3; cross-modal 4, 5
    table = torch.full((3, 6), float("nan"))
    table[1, [0, 1, 4, 5]] = torch.tensor([0.30, 0.25, 0.25, 0.20])
    table[2, [2, 3, 4, 5]] = torch.tensor([0.40, 0.38, 0.20, 0.02])  # audio leaves expert 5 to the image
    [verdict] = verdicts(table, allowed, top_k=2)
    assert (verdict.kind, verdict.modality, verdict.expert) == ("imbalance", 2, 5)
    assert verdict.what.endswith("but used by another modality")
    table[1, [0, 1, 4, 5]] = torch.tensor([0.40, 0.35, 0.24, 0.01])  # and the image leaves it too
    found = verdicts(table, allowed, top_k=2)
    assert [(v.kind, v.modality, v.expert) for v in found] == [("collapse", 1, 5), ("collapse", 2, 5)]


def planted(
    config_moe: dict[str, object], digit_manifests: dict[str, Path]
) -> tuple[MultiMoEModule, MultiModalDataModule]:
    """A tiny model whose routers send every image token first to image expert 2 (a large selection bias)."""
    config = tiny_config(bias_update_rate=1e-9, **config_moe)  # a selection bias that training barely moves
    config = dataclasses.replace(config, caption=dataclasses.replace(config.caption, max_length=24))
    data = MultiModalDataModule(
        str(digit_manifests["train"]), val_manifest=str(digit_manifests["val"]), config=config, batch_size=8
    )
    module = MultiMoEModule(config, data.labels, data.vocab)
    for layer in module.model.moe_layers():
        assert layer.router.bias is not None
        with torch.no_grad():
            layer.router.bias[1, 2] = 100.0
    return module, data


def messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "routing" in str(w.message)]


def test_a_planted_collapse_is_reported_with_its_step_and_the_sanity_check_gives_no_verdict(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    module, data = planted({}, digit_manifests)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=2,
        num_sanity_val_steps=2,
        check_val_every_n_epoch=5,
        **quiet,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)  # the sanity check sees the planted router; no validation after
    assert messages(record) == []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        L.Trainer(default_root_dir=tmp_path, limit_val_batches=2, **quiet).validate(module, datamodule=data)
    [message] = messages(record)
    assert message.startswith("routing collapse in val at step 0, ")  # the validating trainer's step
    assert "MoE layer 0, image: expert 2 picked by 100% of the tokens" in message
    assert "MoE layer 1, image: expert 2 picked by 100% of the tokens" in message


@pytest.mark.parametrize(
    ("groups", "remedy"),
    [("modality", "raise moe.load_balance_coef"), ("batch", "balance per modality (moe.balance_groups")],
)
def test_the_remedy_named_fits_how_the_loss_groups_tokens(
    groups: str, remedy: str, digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    module, data = planted({"balance_groups": groups}, digit_manifests)
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        L.Trainer(default_root_dir=tmp_path, limit_val_batches=1, **quiet).validate(module, datamodule=data)
    [message] = messages(record)
    assert remedy in message, message


def test_validation_logs_the_bits_of_specialization(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    module, data = planted({}, digit_manifests)
    trainer = L.Trainer(
        default_root_dir=tmp_path, limit_val_batches=2, enable_progress_bar=False, logger=False
    )
    trainer.validate(module, datamodule=data, verbose=False)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if "specialization" in k}
    assert logged["val_specialization/layer0/image/expert_bits"] == 0.0  # every image token: expert 2
    assert logged["val_specialization/layer0/image/label_bits"] == 0.0  # so it tells nothing
    assert logged["val_specialization/layer0/text/expert_bits"] > 0.0
    assert (
        0.0
        <= logged["val_specialization/layer0/text/label_bits"]
        <= logged["val_specialization/layer0/text/expert_bits"] + 1e-9
    )
    assert "val_specialization/layer0/cross_modality_bits" in logged
