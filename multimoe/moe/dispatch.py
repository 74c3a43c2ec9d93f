"""Dispatch: run every routed (token, expert) pair through its expert and mix the outputs back per token.

All paths sort the pairs by expert so each expert works on one contiguous block of rows.
``reference``: a plain loop over experts, the ground truth. ``sorted``: the fused ``expert_ffn`` kernel
(a matrix product per expert and block of rows).
``grouped_mm``: gather the rows, ``torch._grouped_mm`` for both projections, then sum each token's gated rows
back; for token choice every data movement, forward and backward, is a gather (parallel and deterministic on
GPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from multimoe.config import DispatchKind
from multimoe.moe.kernels import activate, expert_ffn, grouped_linear
from multimoe.moe.router import Routing

if TYPE_CHECKING:  # Experts.forward calls run_experts
    from multimoe.moe.experts import Experts


def run_experts(x: torch.Tensor, routing: Routing, experts: Experts, dispatch: DispatchKind) -> torch.Tensor:
    """``y_t = sum over t's kept pairs (t, e) of weight * expert_e(x_t)``: x (T, d) -> (T, d)."""
    if dispatch == "reference":
        return _reference(x, routing, experts)
    num_experts = experts.num_experts
    expert = routing.expert
    if routing.kept is not None:  # dropped pairs sort last, past every expert's block
        expert = expert.masked_fill(~routing.kept, num_experts)
    perm = expert.argsort(stable=True)  # (S,) sorted row -> pair
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device)
    counts = counts.index_add_(0, expert, torch.ones_like(expert))[:num_experts]  # (E,) rows per expert
    token = routing.token[perm]  # (S,) token of each sorted row
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # the kernels are outside autocast's reach
        dtype = torch.get_autocast_dtype(x.device.type)
    h, w_in, w_down = x.to(dtype), experts.w_in.to(dtype), experts.down_proj.to(dtype)
    use_grouped_mm = dispatch == "grouped_mm" or (dispatch == "auto" and x.is_cuda)
    # inductor lowers _grouped_mm for bf16 only: anything else compiles through the fused kernel.
    if not use_grouped_mm or (torch.compiler.is_compiling() and dtype != torch.bfloat16):
        y = expert_ffn(h, w_in, w_down, token, routing.weight[perm], counts, experts.activation)
        return y.to(x.dtype)
    tail = routing.kept is not None
    if routing.mode == "expert_choice":  # a token may sit in any number of rows
        rows = h.index_select(0, token)
    else:
        inverse = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=x.device))
        rows = _GatherRows.apply(h, token, inverse, routing.top_k)  # (S, d) grouped by expert
    out = grouped_linear(
        activate(grouped_linear(rows, w_in, counts, tail), experts.activation), w_down, counts, tail
    )
    if routing.mode == "expert_choice":
        gated = out * routing.weight[perm, None].to(out.dtype)
        return out.new_zeros(x.shape[0], out.shape[1]).index_add_(0, token, gated).to(x.dtype)
    return _WeightedSum.apply(out, routing.weight.view(-1, routing.top_k), inverse, perm).to(x.dtype)


def _reference(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Plain loop over experts; the ground truth every fast path is checked against."""
    y = torch.zeros_like(x)
    chosen = routing.expert if routing.kept is None else routing.expert.masked_fill(~routing.kept, -1)
    for e in range(experts.num_experts):
        (pairs,) = torch.where(chosen == e)
        if pairs.numel() == 0:
            continue
        token = routing.token[pairs]
        out = experts.expert(e, x[token]) * routing.weight[pairs, None]
        y.index_add_(0, token, out.to(x.dtype))
    return y


class _GatherRows(torch.autograd.Function):
    """``x (T, d) -> x[token] (S, d)`` for token-choice rows; backward sums a token's k rows by a gather."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor, k: int
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        rows = grad.contiguous().index_select(0, inverse)  # (T*k, d) in (token, slot) order
        return rows.view(-1, ctx.k, rows.shape[1]).sum(dim=1), None, None, None


class _WeightedSum(torch.autograd.Function):
    """``y_t = sum_j weight[t, j] * out[inverse[t*k + j]]``: out (S, d) sorted, weight (T, k) -> (T, d)."""

    @staticmethod
    def forward(
        ctx: Any, out: torch.Tensor, weight: torch.Tensor, inverse: torch.Tensor, perm: torch.Tensor
    ) -> torch.Tensor:
        per_token = out.index_select(0, inverse).view(*weight.shape, out.shape[1])  # (T, k, d)
        w = weight.to(out.dtype)
        ctx.save_for_backward(per_token, w, perm)
        ctx.weight_dtype = weight.dtype
        return torch.bmm(w[:, None, :], per_token).squeeze(1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        per_token, w, perm = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = (w[:, :, None] * grad[:, None, :]).view(-1, grad.shape[1])  # (T*k, d)
        grad_out = grad_rows.index_select(0, perm)  # (S, d) back in sorted order
        grad_weight = torch.bmm(per_token, grad[:, :, None]).squeeze(2)  # (T, k)
        return grad_out, grad_weight.to(ctx.weight_dtype), None, None
