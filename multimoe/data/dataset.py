"""A map-style dataset over manifest rows: loads and processes each modality, with located errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from multimoe.data.manifest import ManifestRow
from multimoe.data.processors import AudioProcessor, ImageProcessor
from multimoe.data.tokenizer import WordTokenizer

IGNORE_INDEX = -100


@dataclass
class Sample:
    id: str
    text: str | None
    pixels: torch.Tensor | None  # (C, H, W)
    waveform: torch.Tensor | None  # (T,)
    label: int  # class index, IGNORE_INDEX when unlabelled
    caption_ids: list[int] | None  # <bos> first reference <eos>
    references: list[str]


class ManifestDataset(Dataset[Sample]):
    """Rows of one manifest. ``modalities`` selects what is loaded; other fields of a row are ignored.

    Decoded images and waveforms are cached by path (datasets reuse files), so later epochs skip decoding.
    """

    def __init__(
        self,
        rows: list[ManifestRow],
        modalities: list[str],
        labels: list[str],
        words: WordTokenizer,
        image: ImageProcessor | None,
        audio: AudioProcessor | None,
        max_caption_length: int,
        cache: bool = True,
    ) -> None:
        self.rows = rows
        self.modalities = set(modalities)
        self.label_index = {name: i for i, name in enumerate(labels)}
        self.words = words
        self.image = image
        self.audio = audio
        self.cache: dict[Path, torch.Tensor] | None = {} if cache else None
        self.captions = [self._caption(row, max_caption_length) for row in rows]
        self.targets = [self._label(row) for row in rows]
        for row in rows:
            if not any(getattr(row, m) is not None for m in self.modalities):
                raise row.error(
                    "<row>", f"has none of the modalities this model reads: {sorted(self.modalities)}"
                )

    def _label(self, row: ManifestRow) -> int:
        if row.label is None or not self.label_index:
            return IGNORE_INDEX
        if row.label not in self.label_index:
            known = ", ".join(list(self.label_index)[:20])
            raise row.error("label", f"unknown label {row.label!r}; the training labels are: {known}")
        return self.label_index[row.label]

    def _caption(self, row: ManifestRow, max_length: int) -> list[int] | None:
        if not row.captions:
            return None
        ids = self.words.encode(row.captions[0], bos=True, eos=True)
        if len(ids) > max_length:
            raise row.error(
                "caption", f"{len(ids)} tokens (with <bos>/<eos>) but caption.max_length={max_length}"
            )
        return ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        use = {m for m in self.modalities if getattr(row, m) is not None}
        return Sample(
            id=row.id,
            text=row.text if "text" in use else None,
            pixels=self._load(row, "image", self.image) if "image" in use else None,
            waveform=self._load(row, "audio", self.audio) if "audio" in use else None,
            label=self.targets[index],
            caption_ids=self.captions[index],
            references=row.captions,
        )

    def _load(self, row: ManifestRow, field: str, processor: Any) -> torch.Tensor:
        path: Path = getattr(row, field)
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        try:
            value = processor(path)
        except Exception as error:  # any decoder failure becomes a located, readable error
            raise row.error(field, f"cannot read {path}: {error}") from error
        if self.cache is not None:
            self.cache[path] = value
        return value
