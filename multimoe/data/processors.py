"""Turn files and strings into encoder inputs: text -> ids, image file -> pixels, audio file -> waveform."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from multimoe.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig
from multimoe.tokenizer import WordTokenizer


class TextProcessor:
    """Batch of strings -> ``{"input_ids", "attention_mask"}`` (B, L), with the encoder's own tokenizer."""

    def __init__(self, config: TextEncoderConfig, words: WordTokenizer) -> None:
        self.max_length = config.max_length
        self.words: WordTokenizer | None = None
        self.hf: Any = None
        if config.backbone == "scratch":
            self.words = words
        else:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(config.backbone)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.hf is not None:
            out = self.hf(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        assert self.words is not None
        encoded = [self.words.encode(t)[: self.max_length] or [self.words.unk_id] for t in texts]
        return pad_sequences(encoded, self.words.pad_id)


class ImageProcessor:
    """Image file -> ``(C, H, W)`` float pixels, resized to ``image_size`` and normalised, with the mean, std
    and interpolation of ``image_data_config``."""

    def __init__(self, config: ImageEncoderConfig) -> None:
        from PIL import Image

        self.size = config.image_size
        self.mode = {1: "L", 3: "RGB"}.get(config.in_chans)
        if self.mode is None:
            raise ValueError(
                f"ImageEncoderConfig.in_chans must be 1 or 3 to read image files, got {config.in_chans}"
            )
        data = image_data_config(config)
        self.mean = torch.tensor(data["mean"])[:, None, None]
        self.std = torch.tensor(data["std"])[:, None, None]
        self.resample = Image.Resampling[data["interpolation"].upper()]

    def __call__(self, path: Path | BinaryIO) -> torch.Tensor:
        """``path``: an image file, or an open binary file of one (a packed shard's bytes)."""
        from PIL import Image

        with Image.open(path) as file:
            image = file.convert(self.mode).resize((self.size, self.size), self.resample)
            array = np.asarray(image, dtype=np.float32) / 255.0
        pixels = torch.from_numpy(array.reshape(self.size, self.size, -1)).permute(2, 0, 1)
        return (pixels - self.mean) / self.std


def image_data_config(config: ImageEncoderConfig) -> dict[str, Any]:
    """``mean``, ``std`` and ``interpolation`` where the config sets them, else the timm model's own data
    config (its pretrained config: ImageNet statistics when timm knows none)."""
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(config.backbone)
    args: dict[str, Any] = dict(
        in_chans=config.in_chans, mean=config.mean, std=config.std, interpolation=config.interpolation
    )
    return resolve_data_config(args, pretrained_cfg=pretrained.to_dict() if pretrained else None)


class AudioProcessor:
    """Audio file -> mono float waveform ``(T,)`` at the encoder's sample rate, cut at ``max_seconds``. Only
    the part kept is decoded, so a long recording costs no more than ``max_seconds`` of it."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        self.sample_rate = config.sample_rate
        self.max_seconds = config.max_seconds
        self.max_samples = int(config.max_seconds * config.sample_rate)

    def __call__(self, path: Path | BinaryIO) -> torch.Tensor:
        """``path``: an audio file, or an open binary file of one (a packed shard's bytes)."""
        import soundfile
        import torchaudio.functional

        with soundfile.SoundFile(str(path) if isinstance(path, Path) else path) as file:
            rate, total = file.samplerate, file.frames
            keep = math.ceil(self.max_seconds * rate)
            margin = rate // 20  # 50 ms past the cut: resampling sees the same context as in the whole file
            data = file.read(min(total, keep + margin), dtype="float32", always_2d=True)  # (T, channels)
        if data.shape[0] == 0:
            raise ValueError("the audio file holds no samples")
        if not np.isfinite(data).all():
            raise ValueError("the audio holds NaN or infinite samples")
        if total > keep:
            warnings.warn(f"{path}: {total / rate:.2f} s cut to max_seconds={self.max_seconds}", stacklevel=2)
        waveform = torch.from_numpy(data).mean(dim=1)
        if rate != self.sample_rate:
            waveform = torchaudio.functional.resample(waveform, rate, self.sample_rate)
        return waveform[: self.max_samples]


def pad_sequences(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad id lists -> ``{"input_ids", "attention_mask"}`` (B, L_max)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}
