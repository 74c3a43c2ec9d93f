"""Caption decoder: causal transformer cross-attending to the trunk tokens, with tied embeddings and a
key/value cache for generation (``multimoe.heads.generation`` holds the search strategies)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from multimoe.config import GenerationConfig
from multimoe.heads.generation import search
from multimoe.trunk import MLP, Attention


@dataclass
class LayerCache:
    """One decoder layer's keys and values, each ``(B, H, N, Dh)``: self-attention over the tokens so far,
    cross-attention over the memory (computed once)."""

    self_k: torch.Tensor
    self_v: torch.Tensor
    cross_k: torch.Tensor
    cross_v: torch.Tensor


@dataclass
class DecoderCache:
    layers: list[LayerCache]
    memory_mask: torch.Tensor  # (B, M)
    length: int = 0  # tokens already in the self-attention cache

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search reorders and expands the batch)."""
        for c in self.layers:
            c.self_k, c.self_v = c.self_k[index], c.self_v[index]
            c.cross_k, c.cross_v = c.cross_k[index], c.cross_v[index]
        self.memory_mask = self.memory_mask[index]


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

    def start(self, memory: torch.Tensor) -> LayerCache:
        cross_k, cross_v = self.cross_attn.keys_values(memory)
        empty = cross_k[:, :, :0]
        return LayerCache(empty, empty, cross_k, cross_v)

    def step(self, x: torch.Tensor, cache: LayerCache, memory_mask: torch.Tensor) -> torch.Tensor:
        """``x (B, T, d)``: the next T tokens; their keys/values join the cache."""
        h = self.self_norm(x)
        k, v = self.self_attn.keys_values(h)
        cache.self_k = torch.cat([cache.self_k, k], dim=2)
        cache.self_v = torch.cat([cache.self_v, v], dim=2)
        past, t = cache.self_k.shape[2] - x.shape[1], x.shape[1]
        causal = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)  # (T, past + T)
        x = x + self.self_attn.attend(h, cache.self_k, cache.self_v, causal)
        cross_mask = memory_mask[:, None, None, :]  # (B, 1, 1, M)
        x = x + self.cross_attn.attend(self.cross_norm(x), cache.cross_k, cache.cross_v, cross_mask)
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
        x = self._embed(ids, start=0)  # (B, L, d)
        for layer in self.layers:
            x = layer(x, memory, memory_mask)
        return self.norm(x) @ self.embed.weight.T  # tied output projection, (B, L, vocab)

    def _embed(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        end = start + ids.shape[1]
        if end > self.max_length:
            raise ValueError(f"caption of {end} tokens is longer than max_length={self.max_length}")
        return self.embed(ids) + self.position[start:end]

    def _layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.layers))

    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> DecoderCache:
        """An empty cache holding each layer's cross-attention keys/values of ``memory (B, M, d)``."""
        return DecoderCache([layer.start(memory) for layer in self._layers()], memory_mask)

    def step(self, ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Logits ``(B, T, vocab)`` of the next ``ids (B, T)`` after the ``cache.length`` tokens cached."""
        x = self._embed(ids, start=cache.length)
        for layer, layer_cache in zip(self._layers(), cache.layers, strict=True):
            x = layer.step(x, layer_cache, cache.memory_mask)
        cache.length += ids.shape[1]
        return self.norm(x) @ self.embed.weight.T

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        bos_id: int,
        eos_id: int,
        config: GenerationConfig | None = None,
    ) -> torch.Tensor:
        """Captions -> ids ``(B, <= max_length)`` without the BOS, padded with ``eos_id`` after the end."""
        config = config or GenerationConfig()
        max_new = self.max_length - 1  # positions left after the BOS
        step = (_CachedStep if config.use_cache else _FullStep)(self, memory, memory_mask)
        max_new = min(config.max_length or max_new, max_new)
        return search(step, memory.shape[0], bos_id, eos_id, max_new, config, memory.device)


class _CachedStep:
    """Next-token logits from the key/value cache: each call runs only the tokens not yet cached."""

    def __init__(self, decoder: CaptionDecoder, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        self.decoder, self.cache = decoder, decoder.start(memory, memory_mask)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(ids[:, self.cache.length :], self.cache)[:, -1]  # (B, vocab)

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)


class _FullStep:
    """Next-token logits by re-running the whole prefix (the reference the cache is tested against)."""

    def __init__(self, decoder: CaptionDecoder, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        self.decoder, self.memory, self.memory_mask = decoder, memory, memory_mask

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(ids, self.memory, self.memory_mask)[:, -1]

    def reorder(self, index: torch.Tensor) -> None:
        self.memory, self.memory_mask = self.memory[index], self.memory_mask[index]
