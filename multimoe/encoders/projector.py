"""Projection of an encoder's tokens into the trunk's width, plus a learned modality embedding."""

from __future__ import annotations

import torch
from torch import nn


class Projector(nn.Module):
    """``(B, N, in_dim) -> (B, N, d_model)``: Linear + the modality's embedding."""

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, d_model)
        self.modality_embedding = nn.Parameter(torch.zeros(d_model))
        nn.init.normal_(self.modality_embedding, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(tokens) + self.modality_embedding
