"""Classification head: a learned query reads the trunk tokens through a few cross-attention blocks."""

from __future__ import annotations

import torch
from torch import nn

from multimoe.trunk import MLP, Attention


class PoolingBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = MLP(d_model, d_ff)

    def forward(self, query: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        query = query + self.attn(self.attn_norm(query), key_mask=mask, context=x)
        return query + self.ffn(self.ffn_norm(query))


class ClassificationHead(nn.Module):
    """``forward(x (B, N, d), mask (B, N)) -> logits (B, num_classes)``."""

    def __init__(self, d_model: int, num_classes: int, depth: int, num_heads: int, d_ff: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, d_model) * 0.02)
        self.blocks = nn.ModuleList([PoolingBlock(d_model, num_heads, d_ff) for _ in range(depth)])
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pooled = self.query.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, 1, d)
        for block in self.blocks:
            pooled = block(pooled, x, mask)
        return self.out(self.norm(pooled[:, 0]))  # (B, num_classes)
