"""A map-style dataset over manifest rows: loads and processes each modality, with located errors."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from multimoe.config import MODALITY_NAMES, ConfigError, MultiMoEConfig
from multimoe.data.manifest import ManifestError, ManifestRow
from multimoe.data.processors import AudioProcessor, ImageProcessor
from multimoe.tokenizer import WordTokenizer

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


@dataclass
class SamplingOptions:
    """Which modalities of a sample reach the model: ``drop`` removes modalities from every sample;
    ``modality_dropout`` removes each remaining one with that probability, but never all of a sample's."""

    modality_dropout: float = 0.0
    drop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ConfigError(f"data.modality_dropout must be in [0, 1], got {self.modality_dropout}")
        unknown = sorted(set(self.drop) - set(MODALITY_NAMES))
        if unknown:
            raise ConfigError(
                f"data.drop_modalities: unknown modality {unknown[0]!r}; allowed: {MODALITY_NAMES}"
            )

    def without_dropout(self) -> SamplingOptions:
        return dataclasses.replace(self, modality_dropout=0.0)

    def choose(self, present: list[str]) -> list[str]:
        """The modalities to use: a random subset of ``present`` (global torch RNG, seeded by Lightning)."""
        if self.modality_dropout == 0.0 or len(present) < 2:
            return present
        kept = [
            m
            for m, r in zip(present, torch.rand(len(present)).tolist(), strict=True)
            if r >= self.modality_dropout
        ]
        return kept or [present[int(torch.randint(len(present), ()))]]


def label_id(label_index: dict[str, int], label: str | None) -> int:
    """The class index of ``label`` (``IGNORE_INDEX``: no label, or no classifier)."""
    if label is None or not label_index:
        return IGNORE_INDEX
    if label not in label_index:
        known = ", ".join(list(label_index)[:20])
        raise ValueError(f"unknown label {label!r}; the training labels are: {known}")
    return label_index[label]


def caption_ids(words: WordTokenizer, captions: list[str], max_length: int) -> list[int] | None:
    """``<bos>`` first caption ``<eos>`` as ids, or None without captions."""
    if not captions:
        return None
    ids = words.encode(captions[0], bos=True, eos=True)
    if len(ids) > max_length:
        raise ValueError(f"{len(ids)} tokens (with <bos>/<eos>) but caption.max_length={max_length}")
    return ids


class ManifestDataset(Dataset[Sample | None]):
    """Rows of one manifest. ``modalities`` selects what is loaded; other fields of a row are ignored.

    Decoded images and waveforms are cached by path (datasets reuse files), so later epochs skip decoding.
    A file that fails to load raises a ``ManifestError`` naming the row, or with ``skip_bad_rows`` gives
    ``None`` (the collator leaves it out and counts it).
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
        sampling: SamplingOptions | None = None,
        skip_bad_rows: bool = False,
    ) -> None:
        self.sampling = sampling or SamplingOptions()
        self.skip_bad_rows = skip_bad_rows
        for row in rows:
            if not any(getattr(row, m) is not None for m in modalities):
                raise row.error("<row>", f"has none of the modalities this model reads: {sorted(modalities)}")
        for m in set(MODALITY_NAMES) - set(modalities):
            if count := sum(getattr(row, m) is not None for row in rows):
                warnings.warn(
                    f"{rows[0].source}: {count} rows hold {m}, which this model does not read (left out)",
                    stacklevel=2,
                )
        self.modalities = [m for m in MODALITY_NAMES if m in modalities and m not in self.sampling.drop]
        self.rows = [r for r in rows if any(getattr(r, m) is not None for m in self.modalities)]
        if len(self.rows) < len(rows):
            warnings.warn(
                f"{rows[0].source}: {len(rows) - len(self.rows)} rows have only the dropped modalities "
                f"{self.sampling.drop} and are left out",
                stacklevel=2,
            )
        rows = self.rows
        self.label_index = {name: i for i, name in enumerate(labels)}
        self.words = words
        self.image = image
        self.audio = audio
        self.cache: dict[Path, torch.Tensor] | None = {} if cache else None
        self.captions = [self._caption(row, max_caption_length) for row in rows]
        self.targets = [self._label(row) for row in rows]

    @classmethod
    def for_model(
        cls,
        rows: list[ManifestRow],
        config: MultiMoEConfig,
        labels: list[str],
        words: WordTokenizer,
        **options: Any,
    ) -> ManifestDataset:
        """``rows`` processed the way a model of ``config`` reads them (``options``: cache, sampling, ...)."""
        return cls(
            rows,
            config.modalities,
            labels,
            words,
            ImageProcessor(config.image) if "image" in config.modalities else None,
            AudioProcessor(config.audio) if "audio" in config.modalities else None,
            config.caption.max_length,
            **options,
        )

    def _label(self, row: ManifestRow) -> int:
        try:
            return label_id(self.label_index, row.label)
        except ValueError as error:
            raise row.error("label", str(error)) from None

    def _caption(self, row: ManifestRow, max_length: int) -> list[int] | None:
        try:
            return caption_ids(self.words, row.captions, max_length)
        except ValueError as error:
            raise row.error("caption", str(error)) from None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample | None:
        row = self.rows[index]
        use = self.sampling.choose([m for m in self.modalities if getattr(row, m) is not None])
        try:
            return Sample(
                id=row.id,
                text=row.text if "text" in use else None,
                pixels=self._load(row, "image", self.image) if "image" in use else None,
                waveform=self._load(row, "audio", self.audio) if "audio" in use else None,
                label=self.targets[index],
                caption_ids=self.captions[index],
                references=row.captions,
            )
        except ManifestError as error:
            if not self.skip_bad_rows:
                raise
            warnings.warn(f"skipped: {error}", stacklevel=2)
            return None

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
