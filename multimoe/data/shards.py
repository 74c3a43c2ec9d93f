"""Streaming shards: a manifest's samples packed into litdata chunks once, then streamed for training from a
local folder or a remote URL (``s3://``, ``gs://``, ... as litdata reads them).

Each sample keeps its files' original bytes (PNG, JPEG, WAV, FLAC, ...) with its text, label and captions, and
is decoded at training time by the same processors as a manifest row, so it gives the same ``Sample``.
``multimoe.json`` beside litdata's ``index.json`` holds the label set and the words of the texts and
captions, from which a model's classes and vocabulary are built, as from a training manifest.

Why litdata: the training side is Lightning, and litdata is its streaming format. Its ``StreamingDataset``
shuffles (chunks, then samples within them), splits the chunks over ranks and DataLoader workers, and its
``StreamingDataLoader`` saves and restores the position mid-epoch, on another number of processes too.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multimoe.config import MultiMoEConfig
from multimoe.data.dataset import Sample, SamplingOptions, caption_ids, label_id
from multimoe.data.manifest import ManifestError, ManifestRow
from multimoe.data.processors import AudioProcessor, ImageProcessor
from multimoe.tokenizer import WordTokenizer

META = "multimoe.json"


class ShardError(ValueError):
    """A packed sample that cannot be read; the message names the shards and the sample."""


def encode(row: ManifestRow) -> dict[str, Any]:
    """One manifest row as a litdata item: its files' bytes, and the rest as JSON."""
    files = {}
    for name in ("image", "audio"):
        path: Path | None = getattr(row, name)
        try:
            files[name] = b"" if path is None else path.read_bytes()
        except OSError as error:
            raise row.error(name, f"cannot read {path}: {error}") from None
    meta: dict[str, Any] = {"text": row.text, "label": row.label, "captions": row.captions}
    meta |= {f"has_{name}": getattr(row, name) is not None for name in files}
    return {"id": row.id, "meta": json.dumps(meta), **files}


def read_meta(shards: str) -> dict[str, Any]:
    """``multimoe.json`` of a shards folder or URL: ``labels``, ``words``, ``samples``."""
    if "://" not in shards:
        path = Path(shards) / META
        if not path.is_file():
            raise ShardError(f"{shards}: no {META}: not a folder written by python -m multimoe.data.pack")
        return json.loads(path.read_text())
    import tempfile

    litdata()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as local:
        target = str(Path(local) / META)
        get_downloader(shards, local, []).download_file(f"{shards.rstrip('/')}/{META}", target)
        return json.loads(Path(target).read_text())


@dataclass
class SampleDecoder:
    """litdata item -> ``Sample``, as ``ManifestDataset`` makes one from a row (``None`` for a bad sample
    when ``skip_bad_rows``)."""

    shards: str
    modalities: list[str]
    labels: list[str]
    words: WordTokenizer
    image: ImageProcessor | None
    audio: AudioProcessor | None
    max_caption_length: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    skip_bad_rows: bool = False

    def __post_init__(self) -> None:
        self.label_index = {name: i for i, name in enumerate(self.labels)}

    @classmethod
    def for_model(
        cls, shards: str, config: MultiMoEConfig, labels: list[str], words: WordTokenizer, **options: Any
    ) -> SampleDecoder:
        return cls(
            shards,
            [m for m in config.modalities if m not in (options.get("sampling") or SamplingOptions()).drop],
            labels,
            words,
            ImageProcessor(config.image) if "image" in config.modalities else None,
            AudioProcessor(config.audio) if "audio" in config.modalities else None,
            config.caption.max_length,
            **options,
        )

    def __call__(self, item: dict[str, Any]) -> Sample | None:
        try:
            return self._decode(item)
        except ShardError:
            if not self.skip_bad_rows:
                raise
            return None

    def _decode(self, item: dict[str, Any]) -> Sample:
        meta = json.loads(item["meta"])
        present = [m for m in self.modalities if (meta["text"] if m == "text" else meta[f"has_{m}"])]
        if not present:  # only modalities the model does not read, or that are dropped
            where = f"{self.shards}: sample {item['id']!r}"
            raise ShardError(f"{where} has none of the modalities {self.modalities}")
        use = self.sampling.choose(present)
        try:
            label = label_id(self.label_index, meta["label"])
            caption = caption_ids(self.words, meta["captions"], self.max_caption_length)
            pixels = self._load(item, "image") if "image" in use else None
            waveform = self._load(item, "audio") if "audio" in use else None
        except (ValueError, ManifestError, OSError) as error:
            raise ShardError(f"{self.shards}: sample {item['id']!r}: {error}") from None
        return Sample(
            id=item["id"],
            text=meta["text"] if "text" in use else None,
            pixels=pixels,
            waveform=waveform,
            label=label,
            caption_ids=caption,
            references=meta["captions"],
        )

    def _load(self, item: dict[str, Any], name: str) -> Any:
        processor = self.image if name == "image" else self.audio
        try:
            return processor(io.BytesIO(item[name]))  # type: ignore[misc]
        except Exception as error:  # any decoder failure becomes a located, readable error
            raise ValueError(f"{name}: cannot decode it: {error}") from error


def litdata() -> Any:
    """The litdata package, or an error that says how to install it."""
    try:
        import litdata
    except ModuleNotFoundError:
        raise ModuleNotFoundError('streaming shards need litdata: pip install -e ".[stream]"') from None
    return litdata


def streaming_dataset(shards: str, decoder: SampleDecoder, shuffle: bool, seed: int) -> Any:
    """litdata's ``StreamingDataset`` over ``shards``, giving ``Sample``s (``None``: skipped bad samples)."""
    return litdata().StreamingDataset(shards, shuffle=shuffle, seed=seed, transform=decoder, drop_last=False)
