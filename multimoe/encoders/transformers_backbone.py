"""Transformers backbones of the text and audio encoders: load one by id or path, or rebuild it from the
files a saved encoder keeps; choose which of its layers train."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_backbone(source: str, saved: Path | None) -> Any:
    """``AutoModel`` for a model id or local directory, with its pretrained weights in float32; or, with
    ``saved`` (a folder holding its config.json), the same architecture with fresh weights and no download.
    An encoder-decoder model (Whisper, T5) keeps only its encoder."""
    from transformers import AutoConfig, AutoModel

    if saved is None:
        model = AutoModel.from_pretrained(source, dtype=torch.float32)
    else:
        model = AutoModel.from_config(AutoConfig.from_pretrained(saved), dtype=torch.float32)
    return model.get_encoder() if model.config.is_encoder_decoder else model


def train_last_layers(model: nn.Module, count: int | None, field: str) -> None:
    """``None``: train every parameter; ``count``: only the last ``count`` layers of the model's layer stack
    (its longest ``ModuleList``) and whatever the model registers after them, such as a final norm."""
    if count is None:
        return
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    layers = max(stacks, key=len) if stacks else nn.ModuleList()
    if count > len(layers):
        raise ValueError(f"{field}: the backbone has {len(layers)} layers, got {count}")
    first = next(layers[len(layers) - count].parameters()) if count else None
    trainable = False
    for parameter in model.parameters():
        trainable = trainable or parameter is first
        parameter.requires_grad_(trainable)
