"""save_pretrained / from_pretrained: every encoder and the whole model round-trip bit-exact, backbones load
through the same code paths as hub ids (a local folder or weights file instead of an id), and a saved folder
loads without the backbone it was made from."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from multimoe.config import AudioEncoderConfig, ImageEncoderConfig, TextEncoderConfig
from multimoe.encoders import AudioEncoder, ImageEncoder, TextEncoder
from multimoe.model import MultiMoE, build_model
from tests.test_model import collate, sample_inputs, tiny_config

TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
WORDS = [f"word{i}" for i in range(40)] + ["the", "a", "cat", "dog", "sat", "on", "mat", "ran"]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name in left:
        assert torch.equal(left[name], right[name]), name


def round_trip(module: torch.nn.Module, folder: Path) -> torch.nn.Module:
    module.save_pretrained(folder)  # type: ignore[operator]
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    again = type(module).from_pretrained(str(folder))  # type: ignore[attr-defined]
    assert_same_weights(module, again)
    assert not again.training
    return again


# ---- image: timm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        ImageEncoderConfig(),  # the slim ResNet (BatchNorm buffers included)
        ImageEncoderConfig(backbone="vit_tiny_patch16_224", image_size=16, timm_kwargs=TINY_VIT),
    ],
    ids=["resnet", "vit"],
)
def test_image_encoder_round_trips_bit_exact(config: ImageEncoderConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = ImageEncoder(config).eval()
    again = round_trip(encoder, tmp_path / "saved")
    assert again.config == config
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    assert torch.equal(encoder(pixels)[0], again(pixels)[0])


def test_image_weights_load_from_a_local_file_as_timm_loads_hub_weights(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=16, **TINY_VIT).eval()  # 1000-class head
    weights = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(weights))
    config = ImageEncoderConfig(
        backbone="vit_tiny_patch16_224",
        pretrained=True,
        pretrained_file=str(weights),
        image_size=16,
        timm_kwargs=TINY_VIT,
    )
    torch.manual_seed(1)  # a different seed: only loading can make the weights equal
    encoder = ImageEncoder(config).eval()
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(encoder(pixels)[0], source.forward_features(pixels))
    weights.unlink()  # the saved folder holds the weights: the file is no longer needed
    again = round_trip(encoder, tmp_path / "saved")
    assert torch.equal(again(pixels)[0], encoder(pixels)[0])


# ---- text: transformers -----------------------------------------------------------------------------------
def save_tiny_text_model(folder: Path, kind: str = "bert") -> Path:
    """A small transformers encoder and its tokenizer, saved as a hub repository would hold them."""
    from transformers import BertConfig, BertModel, BertTokenizer, DistilBertConfig, DistilBertModel

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        model = BertModel(config)
    else:
        config = DistilBertConfig(
            vocab_size=len(vocab), dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
        model = DistilBertModel(config)
    model.save_pretrained(folder)
    BertTokenizer(vocab=vocab).save_pretrained(folder)
    return folder


def tokenize(encoder: TextEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_text_encoder_over_a_transformers_folder_gives_its_tokens_and_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModel

    source = save_tiny_text_model(tmp_path / "hub" / "tiny-bert")
    encoder = TextEncoder(TextEncoderConfig(backbone=str(source))).eval()
    batch = tokenize(encoder, ["the cat sat on the mat", "a dog ran"])
    assert batch["attention_mask"][1].sum() < batch["attention_mask"][0].sum()  # the second row is padded
    tokens, mask = encoder(**batch)
    reference = AutoModel.from_pretrained(source).eval()(**batch).last_hidden_state
    assert torch.equal(tokens, reference) and torch.equal(mask, batch["attention_mask"].bool())

    shutil.rmtree(source)  # the saved folder must not need the backbone it came from
    again = round_trip(encoder, tmp_path / "saved")
    assert (tmp_path / "saved" / "backbone" / "tokenizer.json").is_file()
    assert torch.equal(
        tokenize(again, ["a cat ran"])["input_ids"], tokenize(encoder, ["a cat ran"])["input_ids"]
    )
    assert torch.equal(again(**batch)[0], tokens)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_train_layers_chooses_what_trains(kind: str, tmp_path: Path) -> None:
    source = str(save_tiny_text_model(tmp_path / kind, kind))

    def trainable(train_layers: int | None) -> set[str]:
        encoder = TextEncoder(TextEncoderConfig(backbone=source, train_layers=train_layers))
        return {n for n, p in encoder.backbone.named_parameters() if p.requires_grad}

    everything = trainable(None)
    last = trainable(1)
    assert trainable(0) == set() and last < everything
    assert all(".layer.1." in n or n.startswith("pooler.") for n in last)
    assert any(".layer.1." in n for n in last)
    assert not any("embeddings" in n or ".layer.0." in n for n in last)
    with pytest.raises(ValueError, match=r"TextEncoderConfig.train_layers: the backbone has 2 layers, got 3"):
        trainable(3)


def test_scratch_text_encoder_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = TextEncoderConfig(vocab_size=30, hidden_size=32, num_layers=1, num_heads=2)
    encoder = TextEncoder(config).eval()
    again = round_trip(encoder, tmp_path / "saved")
    assert again.tokenizer is None and not (tmp_path / "saved" / "backbone").exists()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    assert torch.equal(again(ids, (ids != 0).long())[0], encoder(ids, (ids != 0).long())[0])


# ---- audio: the patch transformer, and transformers audio encoders ---------------------------------------
def test_scratch_audio_encoder_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = AudioEncoder(AudioEncoderConfig(n_mels=16, hidden_size=32, num_layers=1, num_heads=2)).eval()
    again = round_trip(encoder, tmp_path / "saved")
    wave, lengths = torch.randn(2, 16000), torch.tensor([16000, 9000])
    assert torch.equal(again(wave, lengths)[0], encoder(wave, lengths)[0])


def save_tiny_audio_model(folder: Path, kind: str) -> Path:
    """A small transformers audio encoder and its feature extractor, saved as a hub repository holds them."""
    import transformers as tf

    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    convs = {"conv_dim": (16, 16), "conv_stride": (5, 4), "conv_kernel": (10, 8)}
    convs |= {"num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
    if kind == "wav2vec2":  # layer-norm feature encoder: trained with a padding mask
        config = tf.Wav2Vec2Config(**small, **convs, feat_extract_norm="layer", do_stable_layer_norm=True)
        extractor = tf.Wav2Vec2FeatureExtractor(return_attention_mask=True)
        model = tf.Wav2Vec2Model(config)
    elif kind == "hubert":  # group-norm feature encoder: zero padding, no mask
        model = tf.HubertModel(tf.HubertConfig(**small, **convs))
        extractor = tf.Wav2Vec2FeatureExtractor(return_attention_mask=False, do_normalize=False)
    elif kind == "whisper":
        config = tf.WhisperConfig(
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
        )
        model, extractor = tf.WhisperModel(config), tf.WhisperFeatureExtractor()
    else:
        model = tf.ASTModel(tf.ASTConfig(**small, max_length=100))
        extractor = tf.ASTFeatureExtractor(max_length=100)
    model.save_pretrained(folder)
    extractor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "whisper", "ast"])
def test_transformers_audio_encoder_tokens_mask_and_round_trip(kind: str, tmp_path: Path) -> None:
    source = save_tiny_audio_model(tmp_path / "hub" / kind, kind)
    encoder = AudioEncoder(AudioEncoderConfig(backbone=str(source))).eval()
    torch.manual_seed(0)
    short, long = torch.randn(8000), torch.randn(16000)  # 0.5 s and 1 s at 16 kHz
    wave, lengths = torch.stack([torch.cat([short, torch.zeros(8000)]), long]), torch.tensor([8000, 16000])
    tokens, mask = encoder(wave, lengths)
    assert tokens.shape[:2] == mask.shape and tokens.shape[2] == encoder.out_dim == 32
    real = mask.sum(1).tolist()
    if kind in ("wav2vec2", "hubert"):  # conv feature encoder, kernels 10 and 8, strides 5 and 4
        frames = [((n - 10) // 5 + 1 - 8) // 4 + 1 for n in (8000, 16000)]
        assert real == frames and tokens.shape[1] == frames[1]
    elif kind == "whisper":  # 30 s of 10 ms frames, halved by the encoder's stride-2 convolution
        assert tokens.shape[1] == 1500 and real == [25, 50]
    else:  # AST: [CLS] + distillation token + 16x16 patches with stride 10 over 100 frames x 128 mel bins
        assert tokens.shape[1] == 2 + 9 * 12 and mask.all()
    if kind == "wav2vec2":  # a mask-trained model: padding does not change a clip's tokens
        alone, _ = encoder(short[None], torch.tensor([8000]))
        torch.testing.assert_close(tokens[0, : real[0]], alone[0], atol=1e-5, rtol=1e-5)

    shutil.rmtree(source)
    again = round_trip(encoder, tmp_path / "saved")
    assert (tmp_path / "saved" / "backbone" / "preprocessor_config.json").is_file()
    assert torch.equal(again(wave, lengths)[0], tokens)


def test_sample_rate_must_match_the_feature_extractor(tmp_path: Path) -> None:
    source = save_tiny_audio_model(tmp_path / "w2v", "wav2vec2")
    with pytest.raises(ValueError, match=r"AudioEncoderConfig.sample_rate must be 16000"):
        AudioEncoder(AudioEncoderConfig(backbone=str(source), sample_rate=8000))


# ---- the whole model ---------------------------------------------------------------------------------------
def test_whole_model_round_trips_with_labels_vocab_and_backbone_files(tmp_path: Path) -> None:
    source = save_tiny_text_model(tmp_path / "hub" / "tiny-bert")
    config = dataclasses.replace(tiny_config(), text=TextEncoderConfig(backbone=str(source)))
    labels, vocab = ["even", "odd", "x", "y", "z"], [f"w{i}" for i in range(40)]
    torch.manual_seed(0)
    model = build_model(config, labels, vocab).eval()
    samples, captions = sample_inputs()
    inputs = collate(samples)
    shutil.rmtree(source)

    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "backbone" / "text" / "tokenizer.json").is_file()
    again = MultiMoE.from_pretrained(str(tmp_path / "saved"))
    assert again.config == config and again.labels == labels and again.vocab == vocab
    assert_same_weights(model, again)
    out, out_again = model(inputs, captions), again(inputs, captions)
    assert torch.equal(out.class_logits, out_again.class_logits)
    assert torch.equal(out.caption_logits, out_again.caption_logits)


def test_a_hub_id_loads_from_the_hub_cache(tmp_path: Path) -> None:
    """A repository id goes through huggingface_hub's download path; here it finds the files in a cache laid
    out as a download leaves it (offline: HF_HUB_OFFLINE is set for the tests)."""
    torch.manual_seed(0)
    encoder = ImageEncoder(
        ImageEncoderConfig(backbone="vit_tiny_patch16_224", image_size=16, timm_kwargs=TINY_VIT)
    )
    repo, commit = tmp_path / "cache" / "models--someone--tiny-vit", "0123456789" * 4
    encoder.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    again = ImageEncoder.from_pretrained("someone/tiny-vit", cache_dir=tmp_path / "cache")
    assert_same_weights(encoder, again)


def test_loading_something_else_fails_clearly(tmp_path: Path) -> None:
    ImageEncoder(ImageEncoderConfig()).save_pretrained(tmp_path / "image")
    with pytest.raises(ValueError, match=r"TextEncoderConfig: unknown fields"):
        TextEncoder.from_pretrained(str(tmp_path / "image"))
    with pytest.raises(FileNotFoundError, match=r"no config.json"):
        ImageEncoder.from_pretrained(str(tmp_path))


# ---- a model trained by train.py ---------------------------------------------------------------------------
FRESH_PROCESS = """
import sys, torch
from multimoe.encoders import ImageEncoder
encoder = ImageEncoder.from_pretrained(sys.argv[1])
torch.save(encoder(torch.load(sys.argv[2]))[0], sys.argv[3])
"""


def convert(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "multimoe.tools.convert", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_trained_model_exports_its_image_encoder_to_a_fresh_process(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    from multimoe.training.module import MultiMoEModule

    checkpoint, _ = trained
    result = convert(str(checkpoint), str(tmp_path / "image"), "--encoder", "image")
    assert result.returncode == 0, result.stderr[-3000:]
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(pixels, tmp_path / "pixels.pt")
    command = [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "image"), str(tmp_path / "pixels.pt")]
    command.append(str(tmp_path / "tokens.pt"))
    subprocess.run(command, check=True, timeout=300)

    trained_model = MultiMoEModule.load_from_checkpoint(checkpoint, map_location="cpu").model.eval()
    expected, _ = trained_model.encoders["image"](pixels)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected)


@pytest.mark.slow
def test_trained_model_converts_whole(trained: tuple[Path, list[str]], tmp_path: Path) -> None:
    from multimoe.tools.convert import main
    from multimoe.training.module import MultiMoEModule

    checkpoint, _ = trained
    main([str(checkpoint), str(tmp_path / "model")])
    module = MultiMoEModule.load_from_checkpoint(checkpoint, map_location="cpu")
    model = MultiMoE.from_pretrained(str(tmp_path / "model"))
    assert model.labels == module.labels == ["even", "odd"] and model.vocab == module.hparams["vocab"]
    assert_same_weights(module.model, model)
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint), str(tmp_path / "nothing"), "--encoder", "video"])
    assert exit_info.value.code == 2 and not (tmp_path / "nothing").exists()
