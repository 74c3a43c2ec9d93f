"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the encoders and the whole model, and the
one reader of ``train.py`` checkpoints (``read_checkpoint``), which never runs code from the file.

A saved folder holds ``config.json`` (the typed config as a plain dict), ``model.safetensors`` (every weight)
and, for a transformers backbone, that backbone's own config and tokenizer or feature-extractor files under
``backbone/`` (``backbone/<modality>/`` for a whole model; no weights there), so loading the folder needs
neither the network nor the backbone it was made from. The huggingface_hub mixin adds hub ids,
``push_to_hub`` and a model card (README.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import PyTorchModelHubMixin, snapshot_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE

from multimoe.config import config_from_dict

P = TypeVar("P", bound="Pretrained")
BACKBONE_DIR = "backbone"


class Pretrained(PyTorchModelHubMixin, library_name="multimoe"):
    """Mixin for an ``nn.Module`` that can say what it is (``saved_config``) and be rebuilt from that and the
    backbone files of its folder (``from_saved``); ``save_backbone_files`` writes what a transformers backbone
    needs besides its weights. The defaults fit an encoder: ``Encoder(config, saved=backbone_files)``."""

    config_class: ClassVar[type]
    config: Any

    def saved_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def from_saved(cls: type[P], saved: dict[str, Any], backbone_files: Path) -> P:
        """A module with this architecture and fresh weights, built without downloading anything."""
        return cls(config_from_dict(cls.config_class, saved), saved=backbone_files)

    def save_backbone_files(self, folder: Path) -> None:
        """Write the backbone's own config and tokenizer / feature extractor into ``folder`` (if any)."""

    def _save_pretrained(self, save_directory: Path) -> None:
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.saved_config(), indent=2) + "\n")
        self.save_backbone_files(save_directory / BACKBONE_DIR)
        super()._save_pretrained(save_directory)  # model.safetensors

    @classmethod
    def _from_pretrained(
        cls: type[P],
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **config_values: Any,  # config.json's values as the mixin decodes them; we read the file ourselves
    ) -> P:
        if os.path.isdir(model_id):
            folder = Path(model_id)
        else:
            folder = Path(
                snapshot_download(
                    model_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    local_files_only=local_files_only,
                    token=token,
                )
            )
        if not (folder / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{model_id}: no {CONFIG_NAME}, not a folder saved by {cls.__name__}")
        model = cls.from_saved(json.loads((folder / CONFIG_NAME).read_text()), folder / BACKBONE_DIR)
        return cls._load_as_safetensor(model, str(folder / SAFETENSORS_SINGLE_FILE), map_location, strict)


class CheckpointError(ValueError):
    """A file that is not a readable ``train.py`` checkpoint; the message names it and says why."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The contents of a ``train.py`` (Lightning) checkpoint, unpickled with ``weights_only=True``: tensors
    and plain containers only, so a crafted file cannot run code. ``saved_form`` turns it into a model's
    ``config.json`` form and weights."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: (?:GLOBAL )?(\S+)", str(error))
        if found:
            what = f"it would import {found.group(1)}; a checkpoint holds only tensors and plain values"
            raise CheckpointError(f"{path}: refused: {what}") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
        reason = detail.group(1).strip() if detail else _first_line(error)
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    except Exception as error:  # a file that is no checkpoint fails anywhere in torch's unpickler
        reason = _first_line(error) or type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not {"hyper_parameters", "state_dict"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a train.py checkpoint (no hyper_parameters and state_dict)")
    return checkpoint


def saved_form(
    checkpoint: dict[str, Any], path: str | Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``({"config", "labels", "vocab"}, model weights)`` of a ``read_checkpoint`` result: what a saved
    model folder holds in ``config.json`` and ``model.safetensors``."""
    hparams = checkpoint["hyper_parameters"]
    if not isinstance(hparams, dict) or not isinstance(hparams.get("config"), dict):
        raise CheckpointError(
            f"{path}: not a multimoe checkpoint (its hyper-parameters hold no model config)"
        )
    saved = {
        "config": hparams["config"],
        "labels": hparams.get("labels") or [],
        "vocab": hparams.get("vocab") or [],
    }
    state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    return saved, state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
