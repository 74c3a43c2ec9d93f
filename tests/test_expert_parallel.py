"""Expert parallelism (multimoe.moe.parallel) with 2 real gloo processes: each holds half the experts and its
own half of the tokens, and together they compute the outputs and gradients of one process that holds all
experts and all tokens: a MoE layer alone, and a whole model on real samples. Then training with
``ExpertParallelStrategy`` through ``train.py``: it follows DDP's loss trajectory, and its checkpoints
resume in DDP and the other way round."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multimoe.data.datamodule import MultiModalDataModule
from multimoe.model import MultiMoE
from multimoe.moe.dispatch import run_experts
from multimoe.moe.parallel import run_experts_parallel, shard
from tests.probes import finish, fit_command, kill_when_paused, losses, start
from tests.test_distributed import DETERMINISTIC
from tests.test_finetune import tiny_config, trained_like
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


def model_and_batches(manifest: str) -> tuple[MultiMoE, list[object]]:
    config = tiny_config(experts_per_modality=2, cross_modal_experts=2)  # 8 experts per MoE layer
    data = MultiModalDataModule(manifest, val_manifest=manifest, batch_size=8, config=config)
    data.setup("validate")
    model = trained_like(config, data).eval()  # no dropout, no SpecAugment: both layouts compute alike
    return model, list(data.val_dataloader())[:WORLD]


def loss_of(model: MultiMoE, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(batch.inputs)  # type: ignore[attr-defined]
    return out.class_logits, out.class_logits.square().sum() + out.trunk.tokens.square().mean()


def model_worker(rank: int, port: int, out: str, manifest: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, batches = model_and_batches(manifest)
    model.shard_experts()
    logits, loss = loss_of(model, batches[rank])  # each rank its own samples
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    torch.save({"logits": logits.detach(), "grads": grads}, Path(out) / f"model{rank}.pt")
    dist.destroy_process_group()


def test_a_whole_model_with_sharded_experts_computes_what_one_process_does(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manifest = str(digit_manifests["val"])
    mp.spawn(model_worker, args=(port, str(tmp_path), manifest), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"model{r}.pt", weights_only=True) for r in range(WORLD)]

    model, batches = model_and_batches(manifest)
    total = torch.zeros(())
    for rank, batch in enumerate(batches):
        logits, loss = loss_of(model, batch)
        torch.testing.assert_close(ranks[rank]["logits"], logits.detach(), rtol=1e-5, atol=1e-5)
        total = total + loss
    total.backward()
    checked = 0
    for name, parameter in model.named_parameters():
        if parameter.grad is None:  # the caption decoder: not in this loss
            assert all(name not in r["grads"] for r in ranks), name
            continue
        checked += 1
        if ".experts." in name:  # each rank holds its share of the experts: their gradients line up
            got = torch.cat([r["grads"][name] for r in ranks])
        else:  # replicated: each rank's gradient is of its own samples, and DDP sums them
            got = sum(r["grads"][name] for r in ranks)
        torch.testing.assert_close(got, parameter.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert checked > 50 and any(".experts." in name for name in ranks[0]["grads"])


EIGHT_EXPERTS = [
    "--model.config.moe.cross_modal_experts=2",
    "--data.batch_size=4",
    "--trainer.devices=2",
    "--trainer.gradient_clip_val=0.1",  # below the gradient norm: every step clips
]
DDP = "--trainer.strategy=ddp"
EP = [
    "--trainer.strategy=multimoe.training.parallel.ExpertParallelStrategy",
    "--trainer.strategy.expert_parallel=2",
]
CUT = ["--checkpoint.last_every_n_steps=3"]  # killed after step 3 of 6 and resumed from there


def test_train_py_with_expert_parallelism_follows_ddp_and_resumes_either_way(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """``train.py fit`` on 2 processes, 6 steps: DDP all the way; expert-parallel degree 2 killed after step 3
    and resumed in DDP; DDP killed after step 3 and resumed expert-parallel. Every step's loss agrees with the
    DDP run, and so do the experts and their optimizer state at the end: the same global batches, gradients
    and Adam moments, with the experts held half per rank (float summation order apart)."""
    runs = {name: tmp_path / name for name in ("ddp", "ep_ddp", "ddp_ep")}
    ways = {"ddp": [DDP], "ep_ddp": EP, "ddp_ep": [DDP]}
    processes = {}
    for name, way in ways.items():
        command = fit_command(
            runs[name],
            digit_manifests,
            *DETERMINISTIC,
            *EIGHT_EXPERTS,
            *CUT,
            *way,
            pause_at_step=3 * (name != "ddp"),
        )
        processes[name] = start(command, runs[name] / "out.txt")
    for name in ("ep_ddp", "ddp_ep"):
        kill_when_paused(processes[name], runs[name])
    out = finish(processes["ddp"], runs["ddp"] / "out.txt") + (runs["ep_ddp"] / "out.txt").read_text()
    resumed = {"ep_ddp": [DDP], "ddp_ep": EP}
    for name, way in resumed.items():
        command = fit_command(
            runs[name], digit_manifests, *DETERMINISTIC, *EIGHT_EXPERTS, *way, "--ckpt_path=last"
        )
        processes[name] = start(command, runs[name] / "out2.txt")
    for name in resumed:
        out += finish(processes[name], runs[name] / "out2.txt")

    reference = dict(losses(runs["ddp"]))
    assert list(reference) == list(range(1, 7))
    for name in resumed:
        got = dict(losses(runs[name]))
        assert list(got) == list(range(1, 7)), name
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], rel=1e-6), f"{name} step {step}"
        worst = max(abs(loss / reference[step] - 1) for step, loss in got.items())
        print(f"{name}: largest relative loss difference to DDP {worst:.1e}")

    # The experts and their Adam moments at the end, whichever way the run went
    ends = {
        name: torch.load(root / "checkpoints" / "last.ckpt", weights_only=True) for name, root in runs.items()
    }
    for name in resumed:
        for key, value in ends["ddp"]["state_dict"].items():
            if ".experts." in key:
                got = ends[name]["state_dict"][key]
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
        for index, state in ends["ddp"]["optimizer_states"][0]["state"].items():
            for key, value in state.items():
                got = ends[name]["optimizer_states"][0]["state"][index][key]
                torch.testing.assert_close(got, value, rtol=1e-3, atol=1e-8, msg=f"{name}: {index} {key}")

    # An expert-parallel checkpoint holds every expert, as a one-process model loads them.
    model = MultiMoE.from_pretrained(runs["ddp_ep"] / "checkpoints" / "last.ckpt")
    for index, block in enumerate(model.trunk.blocks):
        for key, value in block.ffn.state_dict().items():
            expected = ends["ddp"]["state_dict"][f"model.trunk.blocks.{index}.ffn.{key}"]
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
    line = re.search(r"expert parameters per rank: ([\d,]+) of ([\d,]+)", out)
    assert line is not None, out[-3000:]
    mine, full = (int(n.replace(",", "")) for n in line.groups())
    experts = sum(p.numel() for layer in model.moe_layers() for p in layer.experts.parameters())
    assert mine * 2 == full == experts
    print(line.group(0))
