"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for the encoders and the whole model.

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
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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
