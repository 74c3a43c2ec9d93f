"""Expert parallelism in Lightning: DDP whose MoE experts are split over groups of ranks.

The world is a device mesh of ``(replica, expert)``: each group of ``expert_parallel`` consecutive ranks
holds one copy of every MoE layer's experts, split between them (``MoELayer.shard_experts``), and tokens
travel to their experts' rank and back with all-to-all. Everything else is data-parallel over the whole world
(DDP, which ignores the experts). After each backward, an expert's gradient holds the contributions of every
token its group sent it; it is summed over the ranks that hold the same experts and divided by the world
size, which is DDP's mean over all ranks. Gradient clipping uses the whole model's norm (``MultiMoEModule``).

Checkpoints always hold every expert, with their optimizer state, in the layout of a one-process run: they
load at any other degree, in plain DDP, on one process and in ``MultiMoE.from_pretrained``. Validation
within ``fit`` runs sharded; after ``fit`` every rank holds all experts again, as in ``validate``, ``test``
and ``predict``.

    python train.py fit --config configs/default.yaml --trainer.devices 4 \\
        --trainer.strategy multimoe.training.parallel.ExpertParallelStrategy \\
        --trainer.strategy.expert_parallel 2
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from multimoe.config import ConfigError
from multimoe.moe.layer import MoELayer
from multimoe.moe.parallel import gather_rows, local_rows


class ExpertParallelStrategy(DDPStrategy):
    """``DDPStrategy`` with every MoE layer's experts split over ``expert_parallel`` ranks (1: plain DDP).
    The other arguments are ``DDPStrategy``'s."""

    def __init__(self, expert_parallel: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.expert_parallel = expert_parallel
        self.mesh: DeviceMesh | None = None
        self.sharded: dict[str, torch.nn.Parameter] = {}  # LightningModule state key -> this rank's experts

    def setup(self, trainer: L.Trainer) -> None:
        """``fit`` shards the experts before DDP wraps the model and the optimizer is built, so both see this
        rank's experts only. ``validate``, ``test`` and ``predict`` keep every expert on every rank: no
        gradients or optimizer state there, and Lightning may give the ranks unequal numbers of batches to
        predict, which sharded experts (every forward on every rank together) cannot take."""
        if trainer.state.fn == TrainerFn.FITTING:
            self.model_to_device()
            self._shard()
        super().setup(trainer)

    def _shard(self) -> None:
        if self.expert_parallel == 1 or self.sharded:
            return
        world, n = self.world_size, self.expert_parallel
        if n < 1 or world % n:
            raise ConfigError(
                f"trainer.strategy.expert_parallel={n}: must be at least 1 and divide the {world} processes"
            )
        if self.mesh is None:
            self.mesh = init_device_mesh(
                self.root_device.type, (world // n, n), mesh_dim_names=("replica", "expert")
            )
        module = self.lightning_module
        assert module is not None
        layers = [(name, m) for name, m in module.named_modules() if isinstance(m, MoELayer)]
        full = sum(p.numel() for _, layer in layers for p in layer.experts.parameters())
        for name, layer in layers:
            for parameter in layer.experts.parameters():  # rank 0's, as DDP does with the other weights
                dist.broadcast(parameter.data, src=0)
            try:
                layer.shard_experts(self.mesh["expert"].get_group())
            except ValueError as error:  # experts that do not split evenly, or adapters on them
                raise ConfigError(f"trainer.strategy.expert_parallel={n}: {name}: {error}") from None
            self.sharded |= {f"{name}.experts.{k}": p for k, p in layer.experts.named_parameters()}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(self.sharded))
        if self.is_global_zero and layers:
            local = sum(p.numel() for p in self.sharded.values())
            total = sum(p.numel() for p in module.parameters())
            print(
                f"expert parallelism: {world // n} replica(s) x {n} ranks; expert parameters per rank: "
                f"{local:,} of {full:,}; all parameters per rank: {total:,} of {total - local + full:,}",
                file=sys.stderr,
            )

    def _gather(self) -> None:
        """Every rank holds all experts again."""
        module = self.lightning_module
        assert module is not None
        for layer in module.modules():
            if isinstance(layer, MoELayer):
                layer.gather_experts()
        self.sharded = {}
        module.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)

    def teardown(self) -> None:
        module = self.lightning_module
        trainer = None if module is None else module._trainer
        if self.sharded and trainer is not None and trainer.state.status != TrainerStatus.INTERRUPTED:
            self._gather()  # a collective: not after an exception, which may have stopped one rank only
        super().teardown()

    # ---- gradients ---------------------------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        def closure_and_expert_grads() -> Any:
            loss = closure()  # forward and backward of the last micro-batch: DDP has reduced the rest
            self._reduce_expert_grads()
            return loss

        return super().optimizer_step(optimizer, closure_and_expert_grads, model, **kwargs)

    def _reduce_expert_grads(self) -> None:
        if not self.sharded:
            return
        assert self.mesh is not None
        replicas = self.mesh["replica"]
        for parameter in self.sharded.values():
            if parameter.grad is None:
                continue
            if replicas.size() > 1:
                dist.all_reduce(parameter.grad, group=replicas.get_group())
            parameter.grad.div_(self.world_size)

    # ---- checkpoints: always every expert ----------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()
        for key in self.sharded:
            state[key] = self._gather_rows(state[key])
        return state

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        state: dict[str, Any] = dict(super().optimizer_state(optimizer))
        for index, parameter in self._sharded_indices(optimizer):
            if index in state["state"]:
                entry = state["state"][index]  # the optimizer's own dict: replace, never write into it
                state["state"][index] = {
                    k: self._gather_rows(v) if _rows_of(v, parameter) else v for k, v in entry.items()
                }
        return state

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, saved in zip(self.optimizers, checkpoint["optimizer_states"], strict=False):
            for index, parameter in self._sharded_indices(optimizer):
                entry = saved["state"].get(index, {})
                every = (parameter.shape[0] * self.expert_parallel, *parameter.shape[1:])
                for k, v in entry.items():
                    if isinstance(v, torch.Tensor) and v.shape == every:  # Adam's moments of all experts
                        entry[k] = local_rows(v, self._expert_group()).clone()
        super().load_optimizer_state_dict(checkpoint)

    def _sharded_indices(self, optimizer: Any) -> list[tuple[int, torch.nn.Parameter]]:
        """(index in the optimizer's state dict, parameter) of this rank's experts."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        mine = {id(p) for p in self.sharded.values()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [(i, p) for i, p in enumerate(params) if id(p) in mine]

    def _expert_group(self) -> dist.ProcessGroup:
        assert self.mesh is not None
        return self.mesh["expert"].get_group()

    def _gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        return gather_rows(part, self._expert_group())


def _rows_of(value: Any, parameter: torch.Tensor) -> bool:
    """Whether an optimizer state entry is per weight (Adam's moments), not per tensor (its step)."""
    return isinstance(value, torch.Tensor) and value.shape == parameter.shape
