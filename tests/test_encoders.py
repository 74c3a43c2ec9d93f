"""Encoders: token shapes, masks, and that padding never changes a sample's tokens."""

from __future__ import annotations

import torch

from multimoe.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig
from multimoe.encoders import AudioEncoder, ImageEncoder, Projector, TextEncoder


def test_text_encoder_shapes_and_mask() -> None:
    torch.manual_seed(0)
    encoder = TextEncoder(TextEncoderConfig(vocab_size=30, hidden_size=32, num_layers=1, num_heads=2)).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    tokens, mask = encoder(ids, (ids != 0).long())
    assert tokens.shape == (2, 5, encoder.out_dim) and encoder.out_dim == 32
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    alone, _ = encoder(ids[:1, :3], torch.ones(1, 3, dtype=torch.long))
    torch.testing.assert_close(tokens[0, :3], alone[0], atol=1e-5, rtol=1e-5)


def test_vit_image_encoder_gives_patch_tokens() -> None:
    vit = {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
    config = ImageEncoderConfig(backbone="vit_tiny_patch16_224", image_size=16, timm_kwargs=vit)
    encoder = ImageEncoder(config)
    tokens, mask = encoder(torch.randn(3, 3, 16, 16))
    assert tokens.shape == (3, 1 + 16, 32)  # class token + 4x4 patches
    assert mask.all() and encoder.out_dim == 32


def test_default_image_encoder_gives_a_4x4_grid() -> None:
    encoder = ImageEncoder(ImageEncoderConfig())
    tokens, _ = encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 16, 128)


def test_cnn_image_encoder_flattens_feature_map() -> None:
    config = ImageEncoderConfig(
        backbone="resnet10t", image_size=64, in_chans=1, mean=(0.5,), std=(0.5,), timm_kwargs={}
    )
    encoder = ImageEncoder(config)
    tokens, mask = encoder(torch.randn(2, 1, 64, 64))
    assert tokens.shape == (2, 2 * 2, encoder.out_dim)  # stride 32: 64x64 -> 2x2 feature map
    assert mask.shape == (2, 4)


def test_audio_encoder_mask_follows_lengths_and_padding_is_invisible() -> None:
    torch.manual_seed(0)
    config = AudioEncoderConfig(
        n_mels=16, hop_ms=10.0, patch_frames=4, hidden_size=32, num_layers=1, num_heads=2
    )
    encoder = AudioEncoder(config).eval()
    short, long = torch.randn(8000), torch.randn(16000)  # 0.5 s and 1 s at 16 kHz
    waveform = torch.stack([torch.cat([short, torch.zeros(8000)]), long])
    tokens, mask = encoder(waveform, torch.tensor([8000, 16000]))
    frames = (torch.tensor([8000, 16000]) - 512 // 2) // 160 + 1  # windows inside the signal (n_fft 512)
    assert mask.sum(1).tolist() == ((frames + 3) // 4).tolist()
    assert tokens.shape == (2, mask.shape[1], 32)
    alone, alone_mask = encoder(short[None], torch.tensor([8000]))
    n = int(alone_mask.sum())
    torch.testing.assert_close(tokens[0, :n], alone[0, :n], atol=1e-5, rtol=1e-4)


def test_spec_augment_only_in_training() -> None:
    torch.manual_seed(0)
    encoder = AudioEncoder(AudioEncoderConfig(hidden_size=32, num_heads=2, num_layers=1))
    wave, lengths = torch.randn(2, 16000), torch.tensor([16000, 16000])
    encoder.eval()
    a, _ = encoder.frontend(wave, lengths)
    b, _ = encoder.frontend(wave, lengths)
    torch.testing.assert_close(a, b)
    encoder.train()
    c, _ = encoder.frontend(wave, lengths)
    assert not torch.allclose(a, c)


def test_projector_adds_modality_embedding() -> None:
    projector = Projector(8, 4)
    x = torch.zeros(2, 3, 8)
    with torch.no_grad():
        projector.proj.bias.zero_()
    torch.testing.assert_close(projector(x), projector.modality_embedding.expand(2, 3, 4))
