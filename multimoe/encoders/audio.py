"""Audio encoder: torchaudio log-mel front end (SpecAugment while training) and a small patch transformer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from multimoe.config import AudioEncoderConfig


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


class AudioEncoder(nn.Module):
    """``forward(waveform (B, T), lengths (B,)) -> (tokens (B, P, out_dim), mask (B, P))``.

    Every ``patch_frames`` log-mel frames become one token (a strided convolution), then a pre-norm
    transformer encoder with learned positions.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
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
        self.out_dim: int = config.hidden_size

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
