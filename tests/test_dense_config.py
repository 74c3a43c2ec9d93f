"""configs/default_dense.yaml: configs/default.yaml with MoE off and the same active FFN weights per token."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from multimoe.config import MultiMoEConfig
from multimoe.model import build_model
from multimoe.moe.layer import MoELayer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def active_ffn_weights(config: MultiMoEConfig) -> int:
    """Trunk FFN weights one token passes through: every dense FFN, and top_k experts of each MoE block."""
    model = build_model(dataclasses.replace(config, text=dataclasses.replace(config.text, vocab_size=40)))
    total = 0
    for block in model.trunk.blocks:
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            per_expert = sum(p.numel() for p in ffn.experts.parameters()) // ffn.experts.num_experts
            total += ffn.router.top_k * per_expert
        else:
            total += sum(p.numel() for p in ffn.parameters())
    return total


def test_dense_twin_differs_only_in_moe_and_matches_active_weights() -> None:
    moe, dense = load("default.yaml"), load("default_dense.yaml")
    assert dense["model"]["config"]["moe"] == {"every": 0}
    for part in (moe, dense):
        del part["model"]["config"]["moe"], part["trainer"]["default_root_dir"]
    assert dense == moe  # the same model otherwise, the same training and data
    moe_config = MultiMoEConfig.from_dict(load("default.yaml")["model"]["config"])
    dense_config = MultiMoEConfig.from_dict(load("default_dense.yaml")["model"]["config"])
    assert moe_config.moe.enabled and not dense_config.moe.enabled
    assert active_ffn_weights(dense_config) == active_ffn_weights(moe_config)
