"""Collate samples into per-modality padded tensors plus the rows that have each modality."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from multimoe.config import MultiMoEConfig
from multimoe.data.dataset import Sample
from multimoe.data.processors import TextProcessor, pad_sequences
from multimoe.modality import Modality, ModalityInputs, MultiModalInputs
from multimoe.tokenizer import WordTokenizer


@dataclass
class Batch:
    ids: list[str]
    inputs: MultiModalInputs
    labels: torch.Tensor  # (B,), IGNORE_INDEX where unlabelled
    caption_ids: torch.Tensor | None  # (B, L) <bos> ... <eos> <pad>...; None when no sample has a caption
    references: list[list[str]]  # reference captions per sample ([] when none)
    skipped: int = 0  # samples left out because a file failed to load (data.skip_bad_rows)

    def __len__(self) -> int:
        return len(self.ids)


class Collator:
    def __init__(self, text: TextProcessor | None, pad_id: int) -> None:
        self.text = text
        self.pad_id = pad_id

    @classmethod
    def for_model(cls, config: MultiMoEConfig, words: WordTokenizer) -> Collator:
        """Batches for a model of ``config`` with the word vocabulary ``words``."""
        return cls(TextProcessor(config.text, words) if "text" in config.modalities else None, words.pad_id)

    def __call__(self, loaded: list[Sample | None]) -> Batch:
        samples = [s for s in loaded if s is not None]
        parts: dict[Modality, ModalityInputs] = {}
        texts = [(i, s.text) for i, s in enumerate(samples) if s.text is not None]
        if texts and self.text is not None:
            parts[Modality.TEXT] = ModalityInputs(_rows(texts), self.text([t for _, t in texts]))
        images = [(i, s.pixels) for i, s in enumerate(samples) if s.pixels is not None]
        if images:
            parts[Modality.IMAGE] = ModalityInputs(
                _rows(images), {"pixels": torch.stack([p for _, p in images])}
            )
        audios = [(i, s.waveform) for i, s in enumerate(samples) if s.waveform is not None]
        if audios:
            lengths = torch.tensor([w.shape[0] for _, w in audios])
            waveform = torch.zeros(len(audios), int(lengths.max()))
            for j, (_, w) in enumerate(audios):
                waveform[j, : w.shape[0]] = w
            parts[Modality.AUDIO] = ModalityInputs(_rows(audios), {"waveform": waveform, "lengths": lengths})

        caption_ids = None
        if any(s.caption_ids is not None for s in samples):
            # A sample without a caption gets an all-pad target: it adds nothing to the caption loss.
            sequences = [s.caption_ids or [self.pad_id] for s in samples]
            caption_ids = pad_sequences(sequences, self.pad_id)["input_ids"]
        return Batch(
            ids=[s.id for s in samples],
            inputs=MultiModalInputs(batch_size=len(samples), parts=parts),
            labels=torch.tensor([s.label for s in samples], dtype=torch.long),
            caption_ids=caption_ids,
            references=[s.references for s in samples],
            skipped=len(loaded) - len(samples),
        )


def _rows(items: Sequence[tuple[int, object]]) -> torch.Tensor:
    return torch.tensor([i for i, _ in items], dtype=torch.long)
