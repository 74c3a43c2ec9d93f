"""Caption decoder: causal transformer cross-attending to the trunk tokens, with tied embeddings."""

from __future__ import annotations

import torch
from torch import nn

from multimoe.trunk import MLP, Attention


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_ff: int) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, num_heads)
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = Attention(d_model, num_heads)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = MLP(d_model, d_ff)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_norm(x), is_causal=True)
        x = x + self.cross_attn(self.cross_norm(x), key_mask=memory_mask, context=memory)
        return x + self.ffn(self.ffn_norm(x))


class CaptionDecoder(nn.Module):
    """``forward(ids (B, L), memory (B, N, d), memory_mask (B, N)) -> logits (B, L, vocab)``.

    Right-padded inputs need no padding mask: causal attention never lets a real token see a later pad.
    """

    def __init__(
        self, vocab_size: int, d_model: int, depth: int, num_heads: int, d_ff: int, max_length: int
    ) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position = nn.Parameter(torch.zeros(max_length, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.layers = nn.ModuleList([DecoderLayer(d_model, num_heads, d_ff) for _ in range(depth)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_length:
            raise ValueError(f"caption of {ids.shape[1]} tokens is longer than max_length={self.max_length}")
        x = self.embed(ids) + self.position[: ids.shape[1]]  # (B, L, d)
        for layer in self.layers:
            x = layer(x, memory, memory_mask)
        return self.norm(x) @ self.embed.weight.T  # tied output projection, (B, L, vocab)

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        bos_id: int,
        eos_id: int,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding -> ids (B, <= max_length) without the BOS, padded with ``eos_id`` after the end."""
        max_length = min(max_length or self.max_length, self.max_length)
        ids = torch.full((memory.shape[0], 1), bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(memory.shape[0], dtype=torch.bool, device=memory.device)
        for _ in range(max_length - 1):
            next_id = self(ids, memory, memory_mask)[:, -1].argmax(dim=-1)
            next_id = next_id.masked_fill(done, eos_id)
            ids = torch.cat([ids, next_id[:, None]], dim=1)
            done |= next_id == eos_id
            if bool(done.all()):
                break
        return ids[:, 1:]
