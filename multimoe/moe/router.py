"""Routing decisions: which (token, expert) pairs run, and with which gate. The routing math runs in fp32.

Token choice (``mixtral``, ``switch``): every token picks its top-k allowed experts; an optional capacity
drops the pairs that overflow an expert. Expert choice: every expert picks its top-C tokens among those
allowed to use it (non-causal blocks only: a token's fate depends on later tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from multimoe.config import RouterKind

RoutingMode = Literal["token_choice", "expert_choice"]


@dataclass
class Routing:
    """Router decisions for ``T`` tokens over ``E`` experts, as ``S`` (token, expert) pairs; gates in fp32.

    ``token_choice``: pair ``t*k + j`` is token ``t``'s ``j``-th choice (``S = T*k``). ``expert_choice``: the
    pairs are each expert's ``C`` slots in turn, and a token may sit in any number of them (or none)."""

    mode: RoutingMode
    logits: torch.Tensor  # (T, E), -inf where the token's modality may not go
    probs: torch.Tensor  # (T, E), softmax over the allowed experts
    token: torch.Tensor  # (S,) token of each pair
    expert: torch.Tensor  # (S,) expert of each pair
    weight: torch.Tensor  # (S,) gate that scales the expert's output
    kept: torch.Tensor | None  # (S,) False where a pair overflowed its expert's capacity; None: dropless
    top_k: int  # experts per token (expert choice: on average, which sets the capacity)

    @property
    def expert_idx(self) -> torch.Tensor:
        """Token choice only: ``(T, k)`` chosen experts, before any capacity drop."""
        assert self.mode == "token_choice", "expert-choice routing has no fixed number of experts per token"
        return self.expert.view(-1, self.top_k)


class Router(nn.Module):
    """Linear router without bias. ``allowed[m, e]`` says whether modality ``m`` may route to expert ``e``.

    ``kind="mixtral"``: softmax over allowed experts, top-k, renormalise the k gates to sum to 1.
    ``kind="switch"``: top-1, the gate is the un-renormalised probability.
    ``kind="expert_choice"``: each expert takes its top-C tokens by probability, gate = that probability;
    ``top_k`` is then the average number of experts per token that sets C.

    ``jitter``: in training, the router input is multiplied by noise drawn from U(1 - jitter, 1 + jitter)
    (Switch Transformer). ``batch_priority``: when a capacity drops pairs, tokens with the highest router
    probability keep their place (V-MoE); otherwise earlier tokens do (Switch, GShard). ``bias_rate > 0``
    turns on auxiliary-loss-free balancing: a per-modality, per-expert bias added to the logits for selection
    only, moved by ``bias_rate`` towards balance by ``update_bias`` after each optimizer step.
    """

    def __init__(
        self,
        d_model: int,
        allowed: torch.Tensor,
        top_k: int,
        kind: RouterKind = "mixtral",
        jitter: float = 0.0,
        batch_priority: bool = False,
        bias_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.min_allowed = int(allowed.sum(dim=1)[allowed.any(dim=1)].min())
        if top_k > self.min_allowed:
            raise ValueError(
                f"top_k={top_k} but a modality may only use {self.min_allowed} experts in this layer"
            )
        self.proj = nn.Linear(d_model, allowed.shape[1], bias=False)
        self.allowed: torch.Tensor
        self.register_buffer("allowed", allowed.clone(), persistent=False)
        self.bias: torch.Tensor | None
        self.register_buffer("bias", torch.zeros(allowed.shape) if bias_rate > 0 else None)
        self.top_k, self.kind, self.jitter = top_k, kind, jitter
        self.batch_priority, self.bias_rate = batch_priority, bias_rate

    @property
    def num_experts(self) -> int:
        return self.proj.out_features

    def forward(self, x: torch.Tensor, modality_ids: torch.Tensor, capacity_factor: float = 0.0) -> Routing:
        """x (T, d), modality_ids (T,); ``capacity_factor`` 0 = dropless (token choice only)."""
        h = x.float()
        if self.training and self.jitter > 0:
            h = h * torch.empty_like(h).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(h, self.proj.weight.float())  # (T, E)
        allowed = self.allowed[modality_ids]  # (T, E)
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)
        if self.kind == "expert_choice":
            return self._expert_choice(logits, probs, allowed, modality_ids, capacity_factor)
        # Select on the masked logits, not on probs: a peaked softmax underflows allowed experts to 0 too,
        # and a tie at 0 could then pick a masked expert.
        scores = logits if self.bias is None else logits + self.bias[modality_ids]
        expert_idx = scores.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = probs.gather(1, expert_idx)  # (T, k)
        if self.kind == "mixtral":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        kept = None
        if capacity_factor > 0:
            capacity = expert_capacity(modality_ids, self.allowed, self.top_k, capacity_factor)
            priority = weights.amax(dim=-1) if self.batch_priority else None
            kept = within_capacity(expert_idx, capacity, priority)
        tokens = torch.arange(x.shape[0], device=x.device).repeat_interleave(self.top_k)
        pairs = (tokens, expert_idx.flatten(), weights.flatten(), kept)
        return Routing("token_choice", logits, probs, *pairs, self.top_k)

    def _expert_choice(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        allowed: torch.Tensor,
        modality_ids: torch.Tensor,
        capacity_factor: float,
    ) -> Routing:
        if capacity_factor <= 0:
            raise ValueError("expert-choice routing needs a capacity factor > 0")
        num_tokens, num_experts = probs.shape
        capacity = expert_capacity(modality_ids, self.allowed, self.top_k, capacity_factor)  # (E,)
        # Static upper bound of every expert's capacity, so one top-k serves all experts.
        slots = min(num_tokens, math.ceil(capacity_factor * self.top_k * num_tokens / self.min_allowed))
        scores = probs.masked_fill(~allowed, -1.0).t()  # (E, T); tokens an expert may not take rank last
        top = scores.topk(slots, dim=1)  # (E, C)
        rank = torch.arange(slots, device=probs.device)
        kept = (top.values >= 0) & (rank[None, :] < capacity[:, None])  # (E, C)
        experts = torch.arange(num_experts, device=probs.device).repeat_interleave(slots)
        weight = top.values.clamp_min(0.0).flatten()
        pairs = (top.indices.flatten(), experts, weight, kept.flatten())
        return Routing("expert_choice", logits, probs, *pairs, self.top_k)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing step (DeepSeek-V3), per modality: raise by ``bias_rate`` the bias
        of the experts that got less than the modality's mean of ``tokens_per_expert (M, E)``, lower the
        others."""
        if self.bias is None:
            return
        counts = tokens_per_expert.to(self.bias)
        mean = counts.sum(dim=1, keepdim=True) / self.allowed.sum(dim=1, keepdim=True).clamp_min(1)
        self.bias += self.bias_rate * torch.sign(mean - counts) * self.allowed


def expert_capacity(
    modality_ids: torch.Tensor, allowed: torch.Tensor, slots_per_token: int, capacity_factor: float
) -> torch.Tensor:
    """``(E,)`` pairs each expert may take: ``ceil(capacity_factor * expected load)``, where each modality's
    ``T_m * k`` pairs would spread evenly over the experts it may use. One modality with all ``E`` experts
    allowed gives Switch's ``ceil(capacity_factor * T * k / E)``."""
    num_modalities = allowed.shape[0]
    # float64: capacities like 0.75 * 32 / 4 must stay exact integers before the ceil.
    tokens = torch.zeros(num_modalities, dtype=torch.float64, device=allowed.device)
    tokens.index_add_(0, modality_ids, torch.ones_like(modality_ids, dtype=torch.float64))
    share = allowed.double() / allowed.sum(dim=1, keepdim=True).clamp_min(1)  # (M, E)
    load = (tokens[:, None] * share).sum(dim=0) * slots_per_token  # (E,)
    return torch.ceil(load * capacity_factor).long()


def within_capacity(
    expert_idx: torch.Tensor, capacity: torch.Tensor, priority: torch.Tensor | None = None
) -> torch.Tensor:
    """``kept (T*k,)``: whether pair ``t*k + j`` fits its expert's ``capacity (E,)``.

    Experts fill first choices before second ones (GShard); within a choice rank, tokens come in order, or by
    descending ``priority (T,)`` when given (batch-priority routing).
    """
    num_tokens, k = expert_idx.shape
    device = expert_idx.device
    token_order = torch.arange(num_tokens, device=device)
    if priority is not None:
        token_order = priority.argsort(descending=True, stable=True)
    order = (
        token_order[None, :] * k + torch.arange(k, device=device)[:, None]
    ).flatten()  # pairs by priority
    expert = expert_idx.flatten()[order]
    by_expert = expert.argsort(stable=True)  # queue of every expert, in priority order
    queued = expert[by_expert]
    counts = torch.zeros_like(capacity).index_add_(0, expert, torch.ones_like(expert))
    position = torch.arange(expert.numel(), device=device) - (counts.cumsum(0) - counts)[queued]
    kept = torch.empty_like(expert, dtype=torch.bool)
    kept[order[by_expert]] = position < capacity[queued]
    return kept
