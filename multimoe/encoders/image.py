"""Image encoder: a thin adapter over any timm model, tokens from ``forward_features``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from multimoe.config import ImageEncoderConfig
from multimoe.pretrained import Pretrained


class ImageEncoder(nn.Module, Pretrained):
    """``forward(pixels (B, C, H, W)) -> (tokens (B, N, out_dim), mask (B, N))``.

    ViT-style models give their patch (and prefix) tokens; CNN feature maps ``(B, C, h, w)`` are flattened to
    ``h * w`` tokens. ``saved`` (set when loading a saved encoder): skip the pretrained weights, the caller
    loads the saved ones.
    """

    config_class = ImageEncoderConfig

    def __init__(self, config: ImageEncoderConfig, saved: Path | None = None) -> None:
        super().__init__()
        import timm

        self.config = config
        self.backbone: Any  # a timm model: forward_features, num_features
        pretrained = config.pretrained and saved is None
        kwargs: dict[str, Any] = dict(pretrained=pretrained, num_classes=0, in_chans=config.in_chans)
        if pretrained and config.pretrained_file:
            kwargs["pretrained_cfg_overlay"] = {"file": config.pretrained_file}
        kwargs |= {"img_size": config.image_size} | config.timm_kwargs
        try:
            self.backbone = timm.create_model(config.backbone, **kwargs)
        except TypeError as error:  # CNNs take any input size and have no img_size argument
            if "img_size" not in str(error):
                raise
            del kwargs["img_size"]
            self.backbone = timm.create_model(config.backbone, **kwargs)
        self.out_dim: int = self.backbone.num_features

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(pixels)
        if features.ndim == 4 and getattr(self.backbone, "output_fmt", "NCHW") == "NHWC":  # Swin & co.
            features = features.flatten(1, 2)  # (B, h, w, C) -> (B, h*w, C)
        elif features.ndim == 4:
            features = features.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        return features, mask
