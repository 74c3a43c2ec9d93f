"""The containers that carry modality inputs and token sequences (with padding masks and modality ids).

``Modality`` itself is defined with the configs (``multimoe.config``, no torch there) and re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multimoe.config import Modality

__all__ = ["Modality", "ModalityInputs", "ModalityTokens", "MultiModalInputs"]


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
