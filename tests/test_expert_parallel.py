"""Expert parallelism (multimoe.moe.parallel) with 2 real gloo processes: each holds half the experts and its
own half of the tokens, and together they compute the outputs and gradients of one process that holds all
experts and all tokens."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multimoe.moe.dispatch import run_experts
from multimoe.moe.parallel import run_experts_parallel, shard
from tests.test_moe import make_layer

TOKENS, WORLD = 48, 2


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * TOKENS, 16, generator=generator)
    modality = torch.randint(0, 3, (WORLD * TOKENS,), generator=generator)
    modality[:TOKENS] = 0  # rank 0 sends only text tokens: the image and audio experts get none from it
    return x, modality, torch.randn(WORLD * TOKENS, 16, generator=generator)


def worker(rank: int, port: int, out: str, activation: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    layer = make_layer(d=16, activation=activation)  # same seed: same weights on every rank
    local = shard(layer.experts)
    x_all, modality_all, grad_all = inputs()
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
    x = x_all[mine].clone().requires_grad_()
    routing = layer.router(x, modality_all[mine])
    y = run_experts_parallel(x, routing, local, layer.experts.num_experts)
    (y * grad_all[mine]).sum().backward()
    torch.save(
        {
            "y": y.detach(),
            "x_grad": x.grad,
            "w_in_grad": local.w_in.grad,
            "down_grad": local.down_proj.grad,
            "router_grad": layer.router.proj.weight.grad,
            "parameters": sum(p.numel() for p in local.parameters()),
        },
        Path(out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_two_expert_parallel_ranks_compute_what_one_process_does(tmp_path: Path) -> None:
    for activation in ("swiglu", "gelu"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, str(tmp_path), activation), nprocs=WORLD, join=True)
        ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

        layer = make_layer(d=16, activation=activation)
        x, modality, grad = inputs()
        x.requires_grad_()
        y = run_experts(x, layer.router(x, modality), layer.experts, "reference")
        (y * grad).sum().backward()

        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=1e-5, atol=1e-6)
        experts = layer.experts
        assert experts.w_in.grad is not None and experts.down_proj.grad is not None
        torch.testing.assert_close(torch.cat([r["w_in_grad"] for r in ranks]), experts.w_in.grad)
        torch.testing.assert_close(torch.cat([r["down_grad"] for r in ranks]), experts.down_proj.grad)
        router = layer.router.proj.weight.grad  # each rank's share of it, summed (what DDP all-reduces)
        torch.testing.assert_close(ranks[0]["router_grad"] + ranks[1]["router_grad"], router)
        full = sum(p.numel() for p in experts.parameters())
        assert [r["parameters"] for r in ranks] == [full // WORLD] * WORLD
        print(f"expert parameters per rank: {full // WORLD:,} of {full:,} ({activation})")
