"""The whole model: batch composition and padding never change a sample's outputs; gradients reach every
trained parameter; dense and MoE trunks build from the same config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from multimoe.config import (
    AudioEncoderConfig,
    CaptionConfig,
    ClassifierConfig,
    GenerationConfig,
    ImageEncoderConfig,
    MoEConfig,
    MultiMoEConfig,
    TextEncoderConfig,
    TrunkConfig,
)
from multimoe.modality import Modality, ModalityInputs, MultiModalInputs
from multimoe.model import MultiMoE, build_model
from multimoe.moe.layer import MoELayer
from multimoe.tokenizer import SPECIALS


def tiny_config(**moe: object) -> MultiMoEConfig:
    return MultiMoEConfig(
        text=TextEncoderConfig(
            vocab_size=40, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
        ),
        image=ImageEncoderConfig(
            backbone="vit_tiny_patch16_224",
            image_size=16,
            timm_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
        ),
        audio=AudioEncoderConfig(n_mels=16, hidden_size=32, num_layers=1, num_heads=2, spec_augment=False),
        trunk=TrunkConfig(d_model=32, depth=2, num_heads=2, d_ff=64),
        moe=MoEConfig(
            **(
                {
                    "every": 1,
                    "experts_per_modality": 2,
                    "cross_modal_experts": 1,
                    "top_k": 2,
                    "expert_d_ff": 32,
                }
                | moe
            )
        ),  # type: ignore[arg-type]
        classifier=ClassifierConfig(num_classes=5, depth=1, d_ff=16),
        caption=CaptionConfig(vocab_size=40, depth=1, num_heads=2, d_ff=32, max_length=12),
    )


def sample_inputs(seed: int = 0) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Three samples: text+image+audio, text+image (no audio), audio only; different text/audio lengths."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        {
            "text": torch.randint(4, 40, (3,), generator=g),
            "image": torch.randn(3, 16, 16, generator=g),
            "audio": torch.randn(12000, generator=g),
        },
        {"text": torch.randint(4, 40, (6,), generator=g), "image": torch.randn(3, 16, 16, generator=g)},
        {"audio": torch.randn(6000, generator=g)},
    ]
    captions = torch.randint(4, 40, (3, 7), generator=g)
    return samples, captions


def collate(samples: list[dict[str, torch.Tensor]]) -> MultiModalInputs:
    parts = {}
    rows = {m: [i for i, s in enumerate(samples) if m in s] for m in ("text", "image", "audio")}
    if rows["text"]:
        texts = [samples[i]["text"] for i in rows["text"]]
        ids = torch.nn.utils.rnn.pad_sequence(texts, batch_first=True)
        parts[Modality.TEXT] = ModalityInputs(
            torch.tensor(rows["text"]), {"input_ids": ids, "attention_mask": (ids != 0).long()}
        )
    if rows["image"]:
        pixels = torch.stack([samples[i]["image"] for i in rows["image"]])
        parts[Modality.IMAGE] = ModalityInputs(torch.tensor(rows["image"]), {"pixels": pixels})
    if rows["audio"]:
        waves = [samples[i]["audio"] for i in rows["audio"]]
        parts[Modality.AUDIO] = ModalityInputs(
            torch.tensor(rows["audio"]),
            {
                "waveform": torch.nn.utils.rnn.pad_sequence(waves, batch_first=True),
                "lengths": torch.tensor([len(w) for w in waves]),
            },
        )
    return MultiModalInputs(len(samples), parts)


@pytest.fixture(scope="module")
def model() -> MultiMoE:
    torch.manual_seed(0)
    return build_model(tiny_config()).eval()


def test_output_shapes_and_one_stats_per_moe_block(model: MultiMoE) -> None:
    samples, captions = sample_inputs()
    out = model(collate(samples), captions)
    assert out.class_logits is not None and out.class_logits.shape == (3, 5)
    assert out.caption_logits is not None and out.caption_logits.shape == (3, 7, 40)
    assert len(out.router_stats) == 2
    # Sample 2 has audio only: its text and image token slots are padding.
    ids, mask = out.trunk.modality_ids[2], out.trunk.mask[2]
    assert set(ids[mask].tolist()) == {int(Modality.AUDIO)}


def test_each_sample_is_independent_of_batch_padding_and_neighbours(model: MultiMoE) -> None:
    samples, captions = sample_inputs()
    batched = model(collate(samples), captions)
    for i, sample in enumerate(samples):
        alone = model(collate([sample]), captions[i : i + 1])
        torch.testing.assert_close(batched.class_logits[i], alone.class_logits[0], atol=2e-5, rtol=1e-4)  # type: ignore[index]
        torch.testing.assert_close(batched.caption_logits[i], alone.caption_logits[0], atol=2e-5, rtol=1e-4)  # type: ignore[index]


def test_backward_reaches_every_trained_parameter() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()
    samples, captions = sample_inputs()
    batch = samples * 6  # enough tokens that every expert is chosen at least once
    out = model(collate(batch), captions.repeat(6, 1))
    loss = out.class_logits.sum() + out.caption_logits.square().mean() + out.aux_loss  # type: ignore[union-attr]
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    # Position rows past the longest input get no gradient, by design.
    missing = [n for n in missing if "position" not in n]
    assert missing == []


def test_predictions_name_labels_and_words_and_are_deterministic() -> None:
    torch.manual_seed(0)
    labels, vocab = [f"class{i}" for i in range(5)], [*SPECIALS, *(f"w{i}" for i in range(36))]
    model = build_model(tiny_config(), labels, vocab).eval()
    samples, _ = sample_inputs()
    inputs = collate(samples)
    config = GenerationConfig(max_length=7)
    rows = model.predict(inputs, config)
    assert rows == model.predict(inputs, config) and len(rows) == 3
    out = model(inputs)
    assert out.class_logits is not None
    probs = out.class_logits.softmax(dim=-1)
    for row, p in zip(rows, probs, strict=True):
        assert row["label"] == labels[int(p.argmax())]
        assert row["probability"] == pytest.approx(float(p.max()), abs=1e-6)
        words = row["caption"].split()
        assert len(words) <= 7 and set(words) <= set(vocab[len(SPECIALS) :])  # max_length, no specials
    assert model.generate(inputs, config) == [row["caption"] for row in rows]


def test_dense_trunk_has_no_router_and_equal_active_ffn_width() -> None:
    moe_config = tiny_config()
    dense_config = dataclasses.replace(moe_config, moe=dataclasses.replace(moe_config.moe, every=0))
    dense = build_model(dense_config)
    assert not any(isinstance(m, MoELayer) for m in dense.modules())
    samples, captions = sample_inputs()
    assert dense(collate(samples), captions).router_stats == []


def test_switch_routing_and_shared_experts_build_and_run() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(router="switch", top_k=1, shared_experts=1)).eval()
    samples, captions = sample_inputs()
    out = model(collate(samples), captions)
    assert out.router_stats[0].tokens_per_expert.sum() == int(out.trunk.mask.sum())
