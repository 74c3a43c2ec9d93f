"""SwiGLU experts in stacked weights, with a reference loop and a sorted (contiguous-slice) dispatch."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class Experts(nn.Module):
    """``E`` SwiGLU experts. Weights follow HF Mixtral's layout so checkpoints map in directly:
    ``gate_up_proj (E, 2*d_ff, d)`` (gate rows first, then up) and ``down_proj (E, d, d_ff)``."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        nn.init.normal_(self.gate_up_proj, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.down_proj, std=1.0 / math.sqrt(d_ff))

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on tokens ``x (n, d)`` -> ``(n, d)``."""
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[e])

    def forward(
        self,
        x: torch.Tensor,
        expert_idx: torch.Tensor,
        weights: torch.Tensor,
        dispatch: Literal["sorted", "reference"] = "sorted",
    ) -> torch.Tensor:
        """Mix the chosen experts: ``y_t = sum_j weights[t, j] * expert[expert_idx[t, j]](x_t)``.

        x (T, d), expert_idx (T, k), weights (T, k) -> (T, d)
        """
        if dispatch == "reference":
            return self._reference(x, expert_idx, weights)
        return self._sorted(x, expert_idx, weights)

    def _reference(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Plain loop over experts; the ground truth every fast path is checked against."""
        y = torch.zeros_like(x)
        for e in range(self.num_experts):
            token, slot = torch.where(expert_idx == e)
            if token.numel() == 0:
                continue
            out = self.expert(e, x[token]) * weights[token, slot, None]
            y.index_add_(0, token, out.to(x.dtype))
        return y

    def _sorted(self, x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sort token copies by expert, run every expert on one contiguous slice, scatter-add back."""
        top_k = expert_idx.shape[1]
        flat_expert = expert_idx.flatten()  # (T*k,)
        order = flat_expert.argsort(stable=True)
        token = order // top_k  # (T*k,) source token of each sorted copy
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        xs = x[token]  # (T*k, d), grouped by expert
        outs = [self.expert(e, chunk) for e, chunk in enumerate(xs.split(counts)) if counts[e] > 0]
        out = torch.cat(outs) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, token, out.to(x.dtype))
