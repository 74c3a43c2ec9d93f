"""Expert kernels on (token, expert) pairs sorted by expert: each expert runs on one contiguous block of rows.

``expert_ffn``: one fused operator for the whole routed FFN (gather, both projections, activation, and the
gated sum of each token's rows), forward and backward written out, looping over experts and blocks of rows.
Besides one ``(pairs, d)`` buffer of expert outputs (of row gradients in the backward) that
``embedding_bag`` sums per token, its ``(pairs, ·)`` buffers are what it keeps for the backward pass: the
gathered input rows, the first projection and, for swiglu, ``silu(gate)``, so that the backward's only exp
is silu's own gradient (a dense SwiGLU FFN under autograd keeps all three and its activation too). A custom
operator, so ``torch.compile(fullgraph=True)`` takes it as one opaque node (the row counts are read on the
host inside it).

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


def _mm_t(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None, add: bool = False
) -> torch.Tensor:
    """``a (m, k) @ b (n, k).T -> (m, n)``, any strides; written into ``out`` (or added to it) when given."""
    if out is None:
        return a @ b.t()
    return out.addmm_(a, b.t()) if add else torch.mm(a, b.t(), out=out)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """``swiglu``: ``silu(gate) * up`` on ``h = [gate | up]``; ``relu`` / ``gelu``: elementwise."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    return F.relu(h) if activation == "relu" else F.gelu(h)


def _activate_kept(h: torch.Tensor, activation: str, silu: torch.Tensor) -> torch.Tensor:
    """``activate(h)`` that also writes ``silu(gate)`` into ``silu`` (swiglu), for the backward pass."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.ops.aten.silu.out(gate, out=silu).mul(up)
    return activate(h, activation)


def _activate_with_grad(
    h: torch.Tensor, activation: str, silu: torch.Tensor
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``activate(h)`` again, from the ``silu(gate)`` the forward kept (swiglu), and the map from its output
    gradient to the gradient of ``h`` (which may overwrite its argument)."""
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)

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


@torch.library.custom_op("multimoe::expert_ffn", mutates_args=())
def _expert_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    by_token: torch.Tensor,
    offsets: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Kept for backward: every row's input (gathered once), first projection and silu(gate) (swiglu).
    rows_in, h, silu = _kept_buffers(x, w_in, token, activation)
    out = torch.empty_like(rows_in)  # every row's expert output, ungated
    blocks = _blocks(counts, w_in)
    for e, s, t in blocks:
        torch.index_select(x, 0, token[s:t], out=rows_in[s:t])
        _mm_t(rows_in[s:t], w_in[e], out=h[s:t])
        _mm_t(_activate_kept(h[s:t], activation, silu[s:t]), w_down[e], out=out[s:t])
    y = _sum_per_token(out, blocks, by_token, offsets, weight.index_select(0, by_token))
    return y, rows_in, h, silu


def _sum_per_token(
    rows: torch.Tensor,
    blocks: list[tuple[int, int, int]],
    by_token: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(T, d)``: the sum of each token's ``rows (S, d)``, scaled by ``weight`` (in ``by_token`` order); the
    rows after the last block (dropped pairs) count as 0. One gather-and-sum pass (``embedding_bag``)."""
    rows[blocks[-1][2] if blocks else 0 :] = 0.0
    return F.embedding_bag(by_token, rows, offsets, mode="sum", per_sample_weights=weight)


def _kept_buffers(
    x: torch.Tensor, w_in: torch.Tensor, token: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, width = token.shape[0], w_in.shape[1]
    silu = x.new_empty(rows, width // 2) if activation == "swiglu" else x.new_empty(0)
    return x.new_empty(rows, x.shape[1]), x.new_empty(rows, width), silu


@_expert_ffn.register_fake
def _(x, w_in, w_down, token, weight, counts, by_token, offsets, activation):
    return torch.empty_like(x), *_kept_buffers(x, w_in, token, activation)


@torch.library.custom_op("multimoe::expert_ffn_backward", mutates_args=())
def _expert_ffn_backward(
    grad_y: torch.Tensor,
    w_in: torch.Tensor,
    w_down: torch.Tensor,
    token: torch.Tensor,
    weight: torch.Tensor,
    counts: torch.Tensor,
    by_token: torch.Tensor,
    offsets: torch.Tensor,
    rows_in: torch.Tensor,
    h: torch.Tensor,
    silu: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_rows, grad_weight = torch.empty_like(rows_in), torch.zeros_like(weight)  # each row's input gradient
    grad_in, grad_down = torch.empty_like(w_in), torch.empty_like(w_down)  # written expert by expert
    for e in torch.nonzero(counts == 0).flatten().tolist():  # experts without rows
        grad_in[e], grad_down[e] = 0.0, 0.0
    gate_grad_y = w_down.shape[2] > grad_y.shape[1]  # as in the forward: gate the narrower side
    first = -1
    blocks = _blocks(counts, w_in)
    for e, s, t in blocks:
        w = weight[s:t, None]
        g = grad_y.index_select(0, token[s:t])  # (n, d)
        grad_a = _mm_t(g, w_down[e].t())  # (n, d_ff), before the gate
        a, activation_grad = _activate_with_grad(h[s:t], activation, silu[s:t])  # (n, d_ff)
        grad_weight[s:t] = torch.linalg.vecdot(a, grad_a)
        add = first == e  # an expert's first block writes its weight gradients, the others add
        if gate_grad_y:
            _mm_t(g.mul_(w).t(), a.t(), out=grad_down[e], add=add)
        else:
            _mm_t(g.t(), a.mul_(w).t(), out=grad_down[e], add=add)
        grad_h = activation_grad(grad_a.mul_(w))  # (n, width)
        _mm_t(grad_h.t(), rows_in[s:t].t(), out=grad_in[e], add=add)
        first = e
        _mm_t(grad_h, w_in[e].t(), out=grad_rows[s:t])
    grad_x = _sum_per_token(grad_rows, blocks, by_token, offsets)
    return grad_x, grad_in, grad_down, grad_weight


@_expert_ffn_backward.register_fake
def _(grad_y, w_in, w_down, token, weight, counts, by_token, offsets, rows_in, h, silu, activation):
    return (
        torch.empty_like(grad_y),
        torch.empty_like(w_in),
        torch.empty_like(w_down),
        torch.empty_like(weight),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    *routed, activation = inputs[1:]  # w_in, w_down, token, weight, counts, by_token, offsets
    ctx.save_for_backward(*routed, *output[1:])
    ctx.activation = activation
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # else autograd fills zero gradients for the kept buffers


def _backward(
    ctx: Any, grad_y: torch.Tensor | None, *_kept: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    if grad_y is None:
        return (None,) * 9
    grads = _expert_ffn_backward(grad_y.contiguous(), *ctx.saved_tensors, ctx.activation)
    grad_x, grad_in, grad_down, grad_weight = grads
    return grad_x, grad_in, grad_down, None, grad_weight, None, None, None, None


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
    by_token = token.argsort(stable=True)  # the rows grouped by token
    rows_per_token = torch.bincount(token, minlength=x.shape[0])
    offsets = rows_per_token.cumsum(0) - rows_per_token
    weight = weight.to(x.dtype)
    return _expert_ffn(x, w_in, w_down, token, weight, counts, by_token, offsets, activation)[0]


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
