"""Token-choice top-k router with modality masking; the routing math always runs in fp32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Router decisions for ``T`` tokens over ``E`` experts (all fp32)."""

    logits: torch.Tensor  # (T, E), -inf where the token's modality may not go
    probs: torch.Tensor  # (T, E), softmax over the allowed experts
    expert_idx: torch.Tensor  # (T, k) chosen experts
    weights: torch.Tensor  # (T, k) gate values used to mix the expert outputs


class Router(nn.Module):
    """Linear router without bias. ``allowed[m, e]`` says whether modality ``m`` may route to expert ``e``.

    ``kind="mixtral"``: softmax over allowed experts, top-k, renormalise the k gates to sum to 1.
    ``kind="switch"``: top-1, the gate is the un-renormalised probability.
    """

    def __init__(
        self, d_model: int, allowed: torch.Tensor, top_k: int, kind: Literal["mixtral", "switch"] = "mixtral"
    ) -> None:
        super().__init__()
        num_allowed = int(allowed.sum(dim=1)[allowed.any(dim=1)].min())
        if top_k > num_allowed:
            raise ValueError(f"top_k={top_k} but a modality may only use {num_allowed} experts in this layer")
        self.proj = nn.Linear(d_model, allowed.shape[1], bias=False)
        self.allowed: torch.Tensor
        self.register_buffer("allowed", allowed.clone(), persistent=False)
        self.top_k = top_k
        self.kind = kind

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), self.proj.weight.float())  # (T, E)
        logits = logits.masked_fill(~self.allowed[modality_ids], float("-inf"))
        probs = logits.softmax(dim=-1)
        # Select on the masked logits, not on probs: a peaked softmax underflows allowed experts to 0 too,
        # and a tie at 0 could then pick a masked expert.
        expert_idx = logits.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = probs.gather(1, expert_idx)
        if self.kind == "mixtral":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, expert_idx=expert_idx, weights=weights)
