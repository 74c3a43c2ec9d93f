"""The sparse MoE FFN: router + routed experts + optional always-on shared experts, with its statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from multimoe.config import BalanceGroups
from multimoe.moe.dispatch import DispatchKind
from multimoe.moe.experts import Experts
from multimoe.moe.losses import load_balancing_loss, router_entropy, router_z_loss
from multimoe.moe.parallel import gather, run_experts_parallel, shard
from multimoe.moe.router import Router, Routing


@dataclass
class RouterStats:
    """What one MoE layer reports for one forward pass."""

    load_balance_loss: torch.Tensor  # scalar per-modality Switch loss (fp32); 0 for expert choice (balanced)
    z_loss: torch.Tensor  # scalar router z-loss (fp32)
    tokens_per_expert: torch.Tensor  # (num_modalities, E) pairs the router chose, before capacity
    dropped_fraction: torch.Tensor  # scalar: share of chosen pairs over capacity (expert choice: of tokens
    # that no expert took); those tokens pass through the residual
    entropy: torch.Tensor  # scalar mean routing entropy (nats)
    top_expert: torch.Tensor  # (T,) each token's first choice (expert choice: its most probable expert)
    chosen: torch.Tensor | None  # (T, k) token choice: the experts each token chose; None: expert choice


class MoELayer(nn.Module):
    """``forward(x (T, d), modality_ids (T,)) -> (y (T, d), RouterStats)``.

    ``capacity_factor`` applies in training, ``eval_capacity_factor`` in evaluation; 0 means dropless
    (expert-choice routing has no dropless mode and uses ``capacity_factor`` when the eval one is 0).
    ``balance_groups``: the load-balancing loss per modality (over the experts it may use) or per batch.
    ``global_balance``: in training, the loss counts the assignments of all ranks (``torch.distributed``'s
    default group; set by the training system when it runs several), so every rank balances the global batch.
    """

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared: nn.Module | None = None,
        dispatch: DispatchKind = "auto",
        capacity_factor: float = 0.0,
        eval_capacity_factor: float = 0.0,
        balance_groups: BalanceGroups = "modality",
    ) -> None:
        super().__init__()
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has {router.num_experts} experts but the expert pool {experts.num_experts}"
            )
        self.router = router
        self.experts = experts
        self.shared = shared
        self.dispatch: DispatchKind = dispatch
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.balance_groups = balance_groups
        self.global_balance = False
        self.expert_parallel = False  # see shard_experts
        self.expert_group: dist.ProcessGroup | None = None

    def shard_experts(self, group: dist.ProcessGroup | None = None) -> None:
        """Keep only this rank's share of the experts (``multimoe.moe.parallel``). Every forward then
        exchanges tokens with the other ranks of ``group`` (default: all), which must run it together."""
        if type(self.experts) is not Experts:
            raise ValueError(
                f"expert parallelism needs plain experts, not {type(self.experts).__name__} (adapters on the "
                "experts: merge them first)"
            )
        self.experts = shard(self.experts, group)
        self.expert_parallel, self.expert_group = True, group

    def gather_experts(self) -> None:
        """Undo ``shard_experts``: every rank holds all experts again (a collective over the group)."""
        if self.expert_parallel:
            self.experts = gather(self.experts, self.expert_group)
            self.expert_parallel, self.expert_group = False, None

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        capacity = self.capacity_factor
        if not self.training and (self.eval_capacity_factor > 0 or self.router.kind != "expert_choice"):
            capacity = self.eval_capacity_factor
        routing = self.router(x, modality_ids, capacity)
        if self.expert_parallel:
            num_experts = self.router.num_experts
            y = run_experts_parallel(x, routing, self.experts, num_experts, self.expert_group)
        else:
            y = self.experts(x, routing, self.dispatch)  # (T, d)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, self._stats(routing, modality_ids)

    def _stats(self, routing: Routing, modality_ids: torch.Tensor) -> RouterStats:
        allowed = self.router.allowed
        zero = routing.probs.new_zeros(())
        chosen: torch.Tensor | None = None
        if routing.mode == "expert_choice":  # the chosen pairs are the kept ones
            assert routing.kept is not None
            pairs = routing.kept.long()
            taken = zero.new_zeros(modality_ids.shape[0]).index_add_(0, routing.token, pairs.float())
            load_balance, dropped = zero, (taken == 0).float().mean()
            top_expert = routing.probs.argmax(dim=-1)
        else:
            pairs = torch.ones_like(routing.token)
            chosen = routing.expert_idx  # (T, k), first choice first
            groups, group_allowed = modality_ids, allowed
            if self.balance_groups == "batch":  # one group: all tokens over all experts
                groups, group_allowed = torch.zeros_like(modality_ids), allowed.any(dim=0, keepdim=True)
            total = _sum_over_ranks if self.global_balance and self.training else None
            load_balance = load_balancing_loss(routing.probs, chosen, groups, group_allowed, total)
            dropped = zero if routing.kept is None else 1.0 - routing.kept.float().mean()
            top_expert = chosen[:, 0]
        tokens_per_expert = torch.zeros_like(allowed, dtype=torch.long)
        tokens_per_expert.index_put_((modality_ids[routing.token], routing.expert), pairs, accumulate=True)
        return RouterStats(
            load_balance_loss=load_balance,
            z_loss=router_z_loss(routing.logits),
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=dropped.detach(),
            entropy=router_entropy(routing.probs).detach(),
            top_expert=top_expert,
            chosen=chosen,
        )


def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(counts)
    return counts


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
