"""The sparse MoE FFN: router + routed experts + optional always-on shared experts, with its statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from multimoe.moe.experts import Experts
from multimoe.moe.losses import load_balancing_loss, router_entropy, router_z_loss
from multimoe.moe.router import Router


@dataclass
class RouterStats:
    """What one MoE layer reports for one forward pass."""

    load_balance_loss: torch.Tensor  # scalar, per-modality Switch loss (fp32)
    z_loss: torch.Tensor  # scalar router z-loss (fp32)
    tokens_per_expert: torch.Tensor  # (num_modalities, E) top-k assignments per modality and expert
    entropy: torch.Tensor  # scalar mean routing entropy (nats)


class MoELayer(nn.Module):
    """``forward(x (T, d), modality_ids (T,)) -> (y (T, d), RouterStats)``. Dropless token-choice routing."""

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared: nn.Module | None = None,
        dispatch: Literal["sorted", "reference"] = "sorted",
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but the expert pool {experts.num_experts}"
            )
        self.router = router
        self.experts = experts
        self.shared = shared
        self.dispatch: Literal["sorted", "reference"] = dispatch

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        routing = self.router(x, modality_ids)
        y = self.experts(x, routing.expert_idx, routing.weights, self.dispatch)  # (T, d)
        if self.shared is not None:
            y = y + self.shared(x)
        allowed = self.router.allowed
        tokens_per_expert = torch.zeros_like(allowed, dtype=torch.long)
        tokens_per_expert.index_put_(
            (modality_ids[:, None].expand_as(routing.expert_idx), routing.expert_idx),
            torch.ones_like(routing.expert_idx),
            accumulate=True,
        )
        stats = RouterStats(
            load_balance_loss=load_balancing_loss(routing.probs, routing.expert_idx, modality_ids, allowed),
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert,
            entropy=router_entropy(routing.probs).detach(),
        )
        return y, stats


def modality_expert_mask(
    modalities: list[int], num_modalities: int, experts_per_modality: int, cross_modal_experts: int
) -> torch.Tensor:
    """``allowed (num_modalities, E)``; expert layout: [modality 0's experts, modality 1's, ..., cross-modal].

    Each listed modality gets its own experts and may use the cross-modal ones; rows of modalities not listed
    stay empty (the model has no encoder for them, so no such token exists).
    """
    num_experts = len(modalities) * experts_per_modality + cross_modal_experts
    allowed = torch.zeros(num_modalities, num_experts, dtype=torch.bool)
    for slot, m in enumerate(modalities):
        allowed[m, slot * experts_per_modality : (slot + 1) * experts_per_modality] = True
        allowed[m, num_experts - cross_modal_experts :] = True
    return allowed
