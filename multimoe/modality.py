"""Modalities and the container that carries a token sequence with its padding mask and modality ids."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch


class Modality(IntEnum):
    """Fixed order in which modality tokens are concatenated into the trunk sequence."""

    TEXT = 0
    IMAGE = 1
    AUDIO = 2

    @classmethod
    def from_name(cls, name: str) -> Modality:
        return cls[name.upper()]

    @property
    def key(self) -> str:
        return self.name.lower()


@dataclass
class ModalityTokens:
    """Tokens of one or several modalities: ``tokens (B, N, d)``, ``mask (B, N)`` True where real,
    ``modality_ids (B, N)`` holding ``Modality`` values."""

    tokens: torch.Tensor
    mask: torch.Tensor
    modality_ids: torch.Tensor

    @classmethod
    def concat(cls, parts: list[ModalityTokens]) -> ModalityTokens:
        return cls(
            tokens=torch.cat([p.tokens for p in parts], dim=1),
            mask=torch.cat([p.mask for p in parts], dim=1),
            modality_ids=torch.cat([p.modality_ids for p in parts], dim=1),
        )


@dataclass
class ModalityInputs:
    """One modality's encoder inputs for the batch rows that have it.

    ``rows (B_m,)`` are the batch indices of those samples; ``tensors`` are the encoder's keyword inputs
    (``input_ids``/``attention_mask``, ``pixels``, ``waveform``/``lengths``). A sample without the modality
    is simply not in ``rows``: its tokens become padding in the trunk, never zeros posing as data.
    """

    rows: torch.Tensor
    tensors: dict[str, torch.Tensor]


@dataclass
class MultiModalInputs:
    batch_size: int
    parts: dict[Modality, ModalityInputs]
