"""A training DataLoader that resumes mid-epoch: its ``position`` (the epoch and how many of its samples were
trained) travels in every checkpoint, so a run restarted from a checkpoint taken after batch k of an
epoch goes on with batch k+1 of the same order, instead of replaying the epoch's start (what a plain
DataLoader does).

The order of epoch e is a permutation seeded by ``seed + e`` (``DistributedSampler``), independent of the
process's RNG; each rank takes every ``world_size``-th index of it, which gives one process with batch size
``B * world_size`` and ``world_size`` processes with batch size ``B`` the same global batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar, cast

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

T = TypeVar("T")


class ResumableSampler(DistributedSampler[T]):
    """This rank's share of each epoch's order; the first epoch after ``resume`` starts past what was used."""

    def __init__(self, dataset: Dataset[T], num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.offset = 0  # indices of this rank's order that the current epoch skipped
        self._resume: tuple[int, int] | None = None  # (epoch, offset) to apply at the next __iter__

    def resume(self, epoch: int, offset: int) -> None:
        self._resume = (epoch, offset)

    def __iter__(self) -> Iterator[T]:
        indices = list(super().__iter__())
        epoch, offset = self._resume or (self.epoch, 0)
        self._resume = None
        self.offset = offset if epoch == self.epoch else 0
        return iter(indices[self.offset :])


class ResumableLoader(DataLoader[T]):
    """A DataLoader over a ``ResumableSampler``."""

    sampler: ResumableSampler[T]

    def position(self, trained_batches: int) -> dict[str, Any]:
        """The position after ``trained_batches`` batches of the current epoch (all this rank trained in
        it, before a resume included): the batches it served but did not train (an interrupted step) are
        served again."""
        sampler = self.sampler
        if sampler._resume is not None:  # restored, not iterated yet
            epoch, offset = sampler._resume
        else:
            epoch, offset = sampler.epoch, trained_batches * cast(int, self.batch_size)
        return {"epoch": epoch, "samples": offset * sampler.num_replicas}  # global: survives a new world size

    def seek(self, state: dict[str, Any]) -> None:
        """Start the epoch of ``state`` at its position (a ``position`` from any number of processes)."""
        replicas = self.sampler.num_replicas
        if state["samples"] % replicas:
            rank_zero_warn(
                f"resuming {state['samples']} samples into the epoch with {replicas} processes: the data "
                "position is rounded down, a few samples will be seen twice"
            )
        self.sampler.resume(state["epoch"], state["samples"] // replicas)
