"""The shared transformer: pre-norm blocks of attention + (dense SwiGLU FFN | sparse MoE FFN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from multimoe.moe.layer import MoELayer, RouterStats


class Attention(nn.Module):
    """Multi-head attention over ``x``, or from ``x`` to ``context`` (cross-attention), with a key mask."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """x (B, N, d); context (B, M, d) or None for self-attention; key_mask (B, M) True where real."""
        k, v = self.keys_values(x if context is None else context)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        return self.attend(x, k, v, mask, is_causal)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``context (B, M, d) -> k, v (B, H, M, Dh)``: what a decoder caches."""
        b, m, _ = context.shape
        k, v = self.kv(context).view(b, m, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Queries from ``x (B, N, d)`` over keys/values ``(B, H, M, Dh)``; ``mask`` broadcasts to
        ``(B, H, N, M)``, True where a query may look."""
        b, n, d = x.shape
        q = self.q(x).view(b, n, self.num_heads, -1).transpose(1, 2)  # (B, H, N, Dh)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class MLP(nn.Module):
    """Dense SwiGLU FFN on tokens ``(..., d)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block. The FFN (dense or MoE) sees only real tokens, flattened: padding never reaches it."""

    def __init__(self, d_model: int, num_heads: int, ffn: MLP | MoELayer, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, num_heads, dropout)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, RouterStats | None]:
        """x (B, N, d), mask (B, N), modality_ids (B, N) -> (B, N, d) and the MoE stats if any."""
        x = x + self.drop(self.attn(self.attn_norm(x), key_mask=mask))
        tokens = self.ffn_norm(x)[mask]  # (T, d) real tokens only
        stats = None
        if isinstance(self.ffn, MoELayer):
            y, stats = self.ffn(tokens, modality_ids[mask])
        else:
            y = self.ffn(tokens)
        update = torch.zeros_like(x)
        update[mask] = self.drop(y).to(x.dtype)
        return x + update, stats


class SharedTransformer(nn.Module):
    """The one trunk every modality shares. Returns the final tokens and one RouterStats per MoE block."""

    def __init__(
        self, blocks: list[Block], d_model: int, checkpointing: bool = False, compile: bool = False
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d_model)
        self.checkpointing = checkpointing
        if compile:
            for block in blocks:
                block.compile(dynamic=True)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, modality_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        router_stats = []
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, stats = checkpoint(block, x, mask, modality_ids, use_reentrant=False)
            else:
                x, stats = block(x, mask, modality_ids)
            if stats is not None:
                router_stats.append(stats)
        return self.norm(x), router_stats
