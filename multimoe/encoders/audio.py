"""Audio encoder: torchaudio log-mel front end (SpecAugment while training) and a small patch transformer, or
any transformers audio encoder on its own feature extractor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multimoe.config import AudioEncoderConfig
from multimoe.encoders.transformers_backbone import load_backbone
from multimoe.pretrained import Pretrained


class LogMel(nn.Module):
    """``waveform (B, T), lengths (B,) -> features (B, n_mels, F), frame_lengths (B,)``.

    Log-mel energies, normalised per utterance over its real frames; SpecAugment masks only in training.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        import torchaudio

        win = round(config.sample_rate * config.win_ms / 1000)
        self.hop = round(config.sample_rate * config.hop_ms / 1000)
        self.n_fft = 1 << (win - 1).bit_length()
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=self.n_fft,
            win_length=win,
            hop_length=self.hop,
            n_mels=config.n_mels,
        )
        # torch.hann_window returns a view into a longer tensor, which safetensors refuses to save
        self.mel.spectrogram.window = self.mel.spectrogram.window.clone()
        augment: list[nn.Module] = []
        if config.spec_augment:
            augment = [
                torchaudio.transforms.FrequencyMasking(config.freq_mask, iid_masks=True),
                torchaudio.transforms.TimeMasking(config.time_mask, iid_masks=True),
            ]
        self.augment = nn.Sequential(*augment)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            features = (self.mel(waveform.float()) + 1e-6).log()  # (B, n_mels, F)
        # Real frames are those whose window lies inside the signal: the rest would see batch padding.
        frame_lengths = ((lengths - self.n_fft // 2).clamp_min(0) // self.hop + 1).clamp_max(
            features.shape[-1]
        )
        valid = torch.arange(features.shape[-1], device=features.device) < frame_lengths[:, None]  # (B, F)
        count = valid.sum(dim=1).clamp_min(1)[:, None, None] * features.shape[1]
        mean = (features * valid[:, None]).sum(dim=(1, 2), keepdim=True) / count
        var = ((features - mean).square() * valid[:, None]).sum(dim=(1, 2), keepdim=True) / count
        features = ((features - mean) / (var + 1e-5).sqrt()) * valid[:, None]
        if self.training and len(self.augment) > 0:
            features = self.augment(features.unsqueeze(1)).squeeze(1)
        return features, frame_lengths


class AudioEncoder(nn.Module, Pretrained):
    """``forward(waveform (B, T), lengths (B,)) -> (tokens (B, P, out_dim), mask (B, P))``.

    ``backbone="scratch"``: every ``patch_frames`` log-mel frames become one token (a strided convolution),
    then a pre-norm transformer encoder with learned positions. Otherwise a transformers audio encoder
    (wav2vec2, HuBERT, Whisper's encoder, AST, ...) runs on what its own ``feature_extractor`` makes of each
    clip; the mask marks the tokens that cover real audio. ``saved``: the backbone files of a saved encoder
    (see ``multimoe.pretrained``): the architecture is rebuilt from them and nothing downloads.
    """

    config_class = AudioEncoderConfig

    def __init__(self, config: AudioEncoderConfig, saved: Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.feature_extractor: Any = None
        if config.backbone != "scratch":
            from transformers import AutoFeatureExtractor

            self.backbone = load_backbone(config.backbone, saved)
            self.feature_extractor = AutoFeatureExtractor.from_pretrained(saved or config.backbone)
            rate = self.feature_extractor.sampling_rate
            if rate != config.sample_rate:
                raise ValueError(
                    f"AudioEncoderConfig.sample_rate must be {rate} (the feature extractor's) for backbone "
                    f"{config.backbone!r}, got {config.sample_rate}"
                )
            self.out_dim: int = self.backbone.config.hidden_size
            return
        self.frontend = LogMel(config)
        max_frames = round(config.max_seconds * 1000 / config.hop_ms) + 1
        self.max_patches = max_frames // config.patch_frames + 1
        self.patch = nn.Conv1d(
            config.n_mels, config.hidden_size, config.patch_frames, stride=config.patch_frames
        )
        self.position = nn.Parameter(torch.zeros(self.max_patches, config.hidden_size))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            config.hidden_size,
            config.num_heads,
            dim_feedforward=2 * config.hidden_size,
            batch_first=True,
            norm_first=True,
            dropout=0.0,
        )
        self.transformer = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.out_dim = config.hidden_size

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.feature_extractor is not None:
            return self._forward_transformers(waveform, lengths)
        features, frame_lengths = self.frontend(waveform, lengths)  # (B, n_mels, F)
        features = F.pad(features, (0, -features.shape[-1] % self.config.patch_frames))  # whole patches
        tokens = self.patch(features.to(self.patch.weight.dtype)).transpose(1, 2)  # (B, P, h)
        num_patches = tokens.shape[1]
        if num_patches > self.max_patches:
            raise ValueError(
                f"audio of {num_patches} patches is longer than max_seconds={self.config.max_seconds} allows"
            )
        tokens = tokens + self.position[:num_patches]
        patch_lengths = (frame_lengths + self.config.patch_frames - 1) // self.config.patch_frames
        mask = torch.arange(num_patches, device=tokens.device) < patch_lengths[:, None]  # (B, P)
        tokens = self.transformer(tokens, src_key_padding_mask=~mask)
        return self.norm(tokens), mask

    def _forward_transformers(
        self, waveform: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        extract = self.feature_extractor
        clips = [
            extract(
                clip[:n].float().cpu().numpy(),
                sampling_rate=extract.sampling_rate,
                return_attention_mask=True,
                return_tensors="pt",
            )
            for clip, n in zip(waveform, lengths.tolist(), strict=True)
        ]  # one clip at a time: each is normalised and padded as the extractor does it alone
        inputs = {k: _pad_cat([c[k] for c in clips]).to(waveform.device) for k in clips[0]}
        input_mask = inputs.pop("attention_mask", None)  # (B, T_in) over samples or frames, if any
        if input_mask is not None and extract.return_attention_mask:  # models trained with a padding mask
            inputs["attention_mask"] = input_mask
        tokens = self.backbone(**inputs).last_hidden_state  # (B, N, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if input_mask is not None and hasattr(self.backbone, "_get_feat_extract_output_lengths"):
            real = self.backbone._get_feat_extract_output_lengths(input_mask.sum(-1))  # (B,)
            mask = torch.arange(tokens.shape[1], device=tokens.device) < real[:, None]  # (B, N)
        return tokens, mask

    def save_backbone_files(self, folder: Path) -> None:
        if self.feature_extractor is not None:
            self.backbone.config.save_pretrained(folder)
            self.feature_extractor.save_pretrained(folder)


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(1, ..., T_i)`` tensors along the batch, right-padding the last axis with zeros."""
    length = max(t.shape[-1] for t in tensors)
    return torch.cat([F.pad(t, (0, length - t.shape[-1])) for t in tensors])
