"""Checkpoint files that are either the old one or the new one, never half of either, and that are read as
data only (``multimoe.pretrained.read_checkpoint``: ``weights_only=True``, one-line errors).

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction: into a file in the system temp
folder, then ``shutil.move`` onto the target. That is a rename (atomic) only when the temp folder shares the
checkpoint's filesystem; otherwise (``/tmp`` on tmpfs, checkpoints on NFS or a scratch disk: common on
clusters) it is a copy, and a kill during the copy leaves a truncated ``last.ckpt``. Here the temp file sits
next to the target, is flushed to disk, and replaces it with ``os.replace``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from multimoe.pretrained import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and whose local loads refuse anything but tensors
    and plain values with one line (remote paths keep Lightning's own ways)."""

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not _is_local_file_protocol(path) or weights_only is False:
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temp file in the same folder, fsync'ed, then ``os.replace``.

    A kill at any moment leaves ``path`` as it was or complete; at worst a stale ``.<name>.<pid>.tmp`` stays
    behind (it never matches Lightning's ``last*.ckpt`` pattern)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
