"""Auxiliary MoE losses as pure functions of the router's outputs."""

from __future__ import annotations

from collections.abc import Callable

import torch


def load_balancing_loss(
    probs: torch.Tensor,
    expert_idx: torch.Tensor,
    group_ids: torch.Tensor,
    allowed: torch.Tensor,
    total: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch load-balancing loss, computed per modality group and averaged over the groups present.

    For group ``g`` with ``T_g`` tokens and ``N_g`` allowed experts:
    ``loss_g = N_g * sum_e f_e * P_e`` with ``f_e`` the fraction of the group's tokens sent to expert ``e``
    (top-k assignments, so ``sum_e f_e = k``, as in HF's ``load_balancing_loss_func``) and ``P_e`` the
    group's mean router probability for ``e``. Balanced routing gives ``k``.

    probs (T, E) fp32, expert_idx (T, k), group_ids (T,) in [0, G), allowed (G, E) bool. ``total``, when
    given, sums counts over data-parallel ranks: ``f_e`` is then the global batch's fraction (``P_e`` stays
    this rank's, whose gradient the ranks average).
    """
    num_groups, num_experts = allowed.shape
    assigned = torch.zeros(probs.shape[0], num_experts, device=probs.device, dtype=probs.dtype)
    assigned.scatter_add_(1, expert_idx, torch.ones_like(expert_idx, dtype=probs.dtype))  # (T, E)
    tokens = torch.zeros(num_groups, device=probs.device, dtype=probs.dtype)
    tokens.index_add_(0, group_ids, torch.ones_like(group_ids, dtype=probs.dtype))  # (G,)
    f = probs.new_zeros(num_groups, num_experts).index_add_(0, group_ids, assigned)  # (G, E) counts
    p = probs.new_zeros(num_groups, num_experts).index_add_(0, group_ids, probs)  # (G, E) prob sums
    fraction = f / tokens.clamp_min(1.0)[:, None]
    if total is not None:
        counts = total(torch.cat([f, tokens[:, None]], dim=1))  # (G, E + 1) over all ranks
        fraction = counts[:, :-1] / counts[:, -1:].clamp_min(1.0)
    mean_prob = p / tokens.clamp_min(1.0)[:, None]
    per_group = allowed.sum(dim=1).to(probs.dtype) * (fraction * mean_prob).sum(dim=1)  # (G,)
    present = tokens > 0
    return (per_group * present).sum() / present.sum().clamp_min(1)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the (masked) router logits. logits (T, E)."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routing distribution over the allowed experts. probs (T, E)."""
    return torch.special.entr(probs).sum(dim=-1).mean()
