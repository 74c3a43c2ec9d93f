"""Expert kernels on (token, expert) pairs sorted by expert: each expert runs on one contiguous block of rows.

``expert_ffn``: one fused operator for the whole routed FFN (gather, both projections, activation, gate,
scatter-add), forward and backward written out, looping over experts and blocks of rows. It allocates no
``(pairs, d)`` buffers, only the first projection it keeps for the backward pass, which is what makes it
fast on CPU. A custom operator, so ``torch.compile(fullgraph=True)`` takes it as one opaque node (the row
counts are read on the host inside it).

``grouped_linear``: ``torch._grouped_mm`` for all experts in one call with device-side offsets (no host
sync): the building block of the ``grouped_mm`` dispatch, fast on CUDA in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

# Largest temporary per block of rows. Big blocks make efficient matrix products; temporaries under glibc's
# 32 MiB mmap ceiling are recycled by malloc instead of being page-faulted in afresh at every call.
BLOCK_BYTES = 24 << 20


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``swiglu``: ``silu(gate) * up`` on ``h = [gate | up]``; ``relu`` / ``gelu``: elementwise."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return F.relu(h) if activation == "relu" else F.gelu(h)


def _activate_with_grad(
    h: torch.Tensor, activation: str
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``activate(h)``, and the map from its output gradient to the gradient of ``h`` (which may overwrite
    its argument), reusing what the activation computed."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        silu = F.silu(gate)

        def swiglu_grad(grad: torch.Tensor) -> torch.Tensor:
            grad_h = torch.empty_like(h)
            torch.mul(grad, silu, out=grad_h[:, gate.shape[1] :])
            torch.ops.aten.silu_backward.grad_input(
                grad.mul_(up), gate, grad_input=grad_h[:, : gate.shape[1]]
            )
            return grad_h

        return silu * up, swiglu_grad
    if activation == "relu":
        return F.relu(h), lambda grad: grad.mul_(h > 0)
    return F.gelu(h), lambda grad: torch.ops.aten.gelu_backward(grad, h)


def _blocks(counts: torch.Tensor, width: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(expert, start, end)`` row blocks, experts in order: each expert's rows in equal blocks, with the
    ``(rows, width.shape[1])`` temporaries under ``BLOCK_BYTES`` (2,100 rows at most 2,048 per block make two
    blocks of 1,050, not 2,048 and a slow 52)."""
    max_rows = max(1, BLOCK_BYTES // (width.shape[1] * width.element_size()))
    blocks, start = [], 0
    for e, n in enumerate(counts.tolist()):
        pieces = max(1, -(-n // max_rows))
        bounds = [start + n * i // pieces for i in range(pieces + 1)]
        blocks += [(e, a, b) for a, b in pairwise(bounds) if b > a]
        start += n
    return blocks


def _add_product(target: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``target[rows] += a @ b`` for distinct ``rows`` (an expert sees a token at most once): gather, add the
    product in place, copy back. On CPU ``index_add_`` costs about a pass over all of ``target`` per call."""
    target.index_copy_(0, rows, target.index_select(0, rows).addmm_(a, b))


@torch.library.custom_op("multimoe::expert_ffn", mutates_args=())
def _expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.zeros_like(x)
    h = x.new_empty(token.shape[0], w_in.shape[1])  # first projection of every row, kept for backward
    for e, s, t in _blocks(counts, w_in):
        rows = token[s:t]
        torch.mm(x.index_select(0, rows), w_in[e].t(), out=h[s:t])
        gated = activate(h[s:t], activation).mul_(weight[s:t, None])  # (n, d_ff)
        _add_product(y, rows, gated, w_down[e].t())
    return y, h


@_expert_ffn.register_fake
def _(x, w_in, w_down, token, weight, counts, activation):
    return torch.empty_like(x), x.new_empty(token.shape[0], w_in.shape[1])


@torch.library.custom_op("multimoe::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    h: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_y = grad_y.contiguous()
    grad_x, grad_weight = torch.zeros_like(x), torch.zeros_like(weight)
    grad_in, grad_down = torch.empty_like(w_in), torch.empty_like(w_down)  # written expert by expert
    for e in torch.nonzero(counts == 0).flatten().tolist():  # experts without rows
        grad_in[e], grad_down[e] = 0.0, 0.0
    first = -1
    for e, s, t in _blocks(counts, w_in):
        rows, w = token[s:t], weight[s:t, None]
        g = grad_y.index_select(0, rows)  # (n, d)
        grad_a = g @ w_down[e]  # (n, d_ff), before the gate
        a, activation_grad = _activate_with_grad(h[s:t], activation)  # (n, d_ff), recomputed
        beta, first = (0.0 if first != e else 1.0), e  # an expert's first block overwrites
        torch.addmm(grad_down[e], g.mul_(w).t(), a, beta=beta, out=grad_down[e])
        grad_weight[s:t] = a.mul_(grad_a).sum(dim=1)
        grad_h = activation_grad(grad_a.mul_(w))  # (n, width)
        torch.addmm(grad_in[e], grad_h.t(), x.index_select(0, rows), beta=beta, out=grad_in[e])
        _add_product(grad_x, rows, grad_h, w_in[e])
    return grad_x, grad_in, grad_down, grad_weight


@_expert_ffn_backward.register_fake
def _(grad_y, x, w_in, w_down, token, weight, counts, h, activation):
    return torch.empty_like(x), torch.empty_like(w_in), torch.empty_like(w_down), torch.empty_like(weight)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, w_in, w_down, token, weight, counts, activation = inputs
    ctx.save_for_backward(x, w_in, w_down, token, weight, counts, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for the (S, width) output h


def _backward(
    ctx: Any, grad_y: torch.Tensor | None, _grad_h: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    if grad_y is None:
        return (None,) * 7
    x, w_in, w_down, token, weight, counts, h = ctx.saved_tensors
    grads = _expert_ffn_backward(grad_y, x, w_in, w_down, token, weight, counts, h, ctx.activation)
    grad_x, grad_in, grad_down, grad_weight = grads
    return grad_x, grad_in, grad_down, None, grad_weight, None, None


_expert_ffn.register_autograd(_backward, setup_context=_setup_context)


def expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """``y_t = sum of weight[r] * FFN_e(x_t)`` over the rows ``r`` of token ``t``, where rows are sorted by
    expert and ``counts (E,)`` gives each expert's block; rows past ``counts.sum()`` are skipped.
    x (T, d), w_in (E, width, d), w_down (E, d, d_ff), token (S,), weight (S,) -> (T, d)."""
    return _expert_ffn(x, w_in, w_down, token, weight.to(x.dtype), counts, activation)[0]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (``_grouped_mm``'s backward needs one)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, tail: bool) -> torch.Tensor:
    """x (S, in) sorted by expert, weight (E, out, in) as in ``F.linear``, counts (E,) rows per expert
    -> (S, out). ``tail``: rows past ``counts.sum()`` may exist (dropped pairs); they come out as 0."""
    offsets = counts.cumsum(0).to(torch.int32)
    in_group = None
    if tail:  # _grouped_mm leaves tail rows (and their input gradient) uninitialised
        in_group = (torch.arange(x.shape[0], device=x.device) < offsets[-1])[:, None]
        x = torch.where(in_group, x, 0.0)
    out = _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))
    return out if in_group is None else torch.where(in_group, out, 0.0)
