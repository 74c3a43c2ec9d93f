"""Expert parallelism: a MoE layer's experts split over the ranks of a process group. Each rank routes its own
tokens, sends every (token, expert) pair's row to the rank that holds the expert, runs its local experts on
what it received, and sends the outputs back, with ``all_to_all_single`` from
``torch.distributed.nn.functional`` so that gradients travel the same way back. Row counts are exchanged
first, so the splits may be uneven (gloo on CPU, NCCL on GPU).

Rank ``r`` of ``n`` holds experts ``[r * E / n, (r + 1) * E / n)`` (``shard``; ``gather`` puts them back
together). Training uses it through ``multimoe.training.parallel.ExpertParallelStrategy``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from multimoe.moe.experts import Experts
from multimoe.moe.kernels import expert_ffn
from multimoe.moe.router import Routing


def shard(experts: Experts, group: dist.ProcessGroup | None = None) -> Experts:
    """This rank's experts of ``experts`` (a new pool holding copies of their weights)."""
    size = dist.get_world_size(group)
    if experts.num_experts % size:
        raise ValueError(
            f"{experts.num_experts} experts do not split evenly over {size} expert-parallel ranks"
        )
    return _pool({name: local_rows(w, group) for name, w in experts.named_parameters()}, experts)


def gather(experts: Experts, group: dist.ProcessGroup | None = None) -> Experts:
    """All experts again from every rank's ``shard`` (a collective: every rank of ``group`` calls it)."""
    return _pool({name: gather_rows(w.detach(), group) for name, w in experts.named_parameters()}, experts)


def local_rows(full: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's block of the first dimension of ``full`` (E, ...): its experts' rows."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = full.shape[0] // size
    return full[rank * local : (rank + 1) * local]


def gather_rows(part: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``part`` (E / n, ...) stacked in rank order: (E, ...). A collective."""
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts)


def _pool(weights: dict[str, torch.Tensor], like: Experts) -> Experts:
    """An ``Experts`` like ``like`` holding copies of ``weights`` (same names, same ``requires_grad``)."""
    d_model, d_ff = like.down_proj.shape[1:]
    pool = Experts(weights["down_proj"].shape[0], d_model, d_ff, like.activation).to(like.down_proj)
    with torch.no_grad():
        for name, parameter in pool.named_parameters():
            parameter.copy_(weights[name])
            parameter.requires_grad_(like.get_parameter(name).requires_grad)
    return pool


def clip_grad_norm_(
    replicated: Sequence[torch.Tensor],
    sharded: Sequence[torch.Tensor],
    max_norm: float,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model whose ``sharded`` parameters are split over the ranks of
    ``group`` (each rank holds its own experts) and whose ``replicated`` ones are the same on every rank: the
    norm is the whole model's, the same on every rank. Returns it."""
    norms = [
        torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])
        for ps in (replicated, sharded)
    ]
    experts = norms[1].float().square()
    dist.all_reduce(experts, group=group)  # the experts' share, summed over the ranks that hold them
    total = (norms[0].float().square() + experts).sqrt()
    torch.nn.utils.clip_grads_with_norm_([*replicated, *sharded], max_norm, total)
    return total


def run_experts_parallel(
    x: torch.Tensor,
    routing: Routing,
    local: Experts,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """``y_t = sum over t's kept pairs (t, e) of weight * expert_e(x_t)`` as ``run_experts`` computes it, with
    expert ``e`` on rank ``e // local.num_experts`` of ``group``: x (T, d) -> (T, d)."""
    size = dist.get_world_size(group)
    per_rank = local.num_experts
    expert = routing.expert
    if routing.kept is not None:  # dropped pairs go nowhere
        expert = expert.masked_fill(~routing.kept, num_experts)
    perm = expert.argsort(stable=True)  # pairs grouped by expert, so by destination rank
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=x.device)
    counts = counts.index_add_(0, expert, torch.ones_like(expert))[:num_experts]  # (E,) rows per expert
    sent = int(counts.sum())
    token, weight = routing.token[perm[:sent]], routing.weight[perm[:sent]]
    # how many rows of each of my local experts every rank sends me: (size, per_rank)
    received_counts = torch.empty_like(counts)
    dist.all_to_all_single(received_counts, counts, group=group)
    received_counts = received_counts.view(size, per_rank)
    send_splits = counts.view(size, per_rank).sum(dim=1).tolist()
    receive_splits = received_counts.sum(dim=1).tolist()
    rows = dist_fn.all_to_all_single(
        x.new_empty(sum(receive_splits), x.shape[1]),
        x.index_select(0, token),
        receive_splits,
        send_splits,
        group,
    )  # (R, d): by source rank, then by local expert
    # regroup by local expert for the kernel: block (source, expert) -> (expert, source)
    starts = torch.cumsum(received_counts.flatten(), 0) - received_counts.flatten()
    order = torch.cat(
        [
            torch.arange(int(starts[s * per_rank + e]), int(starts[s * per_rank + e] + received_counts[s, e]))
            for e in range(per_rank)
            for s in range(size)
        ]
        or [torch.zeros(0, dtype=torch.long)]
    ).to(x.device)
    grouped = rows.index_select(0, order)
    ones = torch.ones(grouped.shape[0], dtype=torch.float32, device=x.device)
    out = expert_ffn(
        grouped,
        local.w_in.to(x.dtype),
        local.down_proj.to(x.dtype),
        torch.arange(grouped.shape[0], device=x.device),
        ones,
        received_counts.sum(dim=0),
        local.activation,
    )  # (R, d): each row through its expert, ungated
    back = torch.empty_like(out).index_copy(0, order, out)  # by source rank again
    returned = dist_fn.all_to_all_single(
        x.new_empty(sent, x.shape[1]), back, send_splits, receive_splits, group
    )  # (sent, d): my pairs, in my sorted order
    gated = returned * weight[:, None].to(returned.dtype)
    return torch.zeros_like(x).index_add(0, token, gated)
