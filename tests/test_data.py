"""Manifests, tokenizer, dataset and collate: real files, located errors, masks instead of fake data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from multimoe.config import ImageEncoderConfig, MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.data.manifest import ManifestError, read_manifest
from multimoe.data.processors import ImageProcessor
from multimoe.modality import Modality
from multimoe.tokenizer import WordTokenizer


@pytest.fixture
def files(tmp_path: Path) -> Path:
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "a.png")
    soundfile.write(tmp_path / "a.wav", np.sin(np.arange(4410) / 5).astype(np.float32), 22050)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (tmp_path / "truncated.wav").write_bytes((tmp_path / "a.wav").read_bytes()[:30])
    return tmp_path


def write(folder: Path, rows: list[object], name: str = "m.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "x", "image": "a.png", "audio": "a.wav", "text": "seven", "label": "7", "caption": "a seven"}


@pytest.mark.parametrize(
    ("row", "line", "field", "words"),
    [
        ("{not json", 2, "<row>", "not valid JSON"),
        ([1, 2], 2, "<row>", "expected a JSON object"),
        ({**GOOD, "id": "y", "image": "missing.png"}, 2, "image", "file not found"),
        ({**GOOD, "id": "y", "audio": 3}, 2, "audio", "expected a file path"),
        ({**GOOD, "id": "y", "text": ""}, 2, "text", "non-empty string"),
        ({**GOOD, "id": "y", "label": [1]}, 2, "label", "class name"),
        ({**GOOD, "id": "y", "caption": ["ok", 5]}, 2, "caption", "list of non-empty strings"),
        ({**GOOD, "id": "y", "imgae": "a.png"}, 2, "imgae", "unknown field"),
        ({"id": "y", "label": "3"}, 2, "<row>", "none of the modalities"),
        (GOOD, 2, "id", "duplicate id 'x' (first on line 1)"),
    ],
)
def test_bad_row_error_names_file_line_and_field(
    files: Path, row: object, line: int, field: str, words: str
) -> None:
    path = write(files, [GOOD, row])
    with pytest.raises(ManifestError) as error:
        read_manifest(path)
    message = str(error.value)
    assert message.startswith(f"{path}:{line}: field '{field}':")
    assert words in message


def test_good_rows_parse_with_relative_paths_and_several_captions(files: Path) -> None:
    path = write(files, [GOOD, {"id": 2, "text": "three", "label": 3, "caption": ["a three", "three"]}])
    rows = read_manifest(path)
    assert rows[0].image == files / "a.png" and rows[0].captions == ["a seven"]
    assert rows[1].id == "2" and rows[1].label == "3" and rows[1].image is None
    assert rows[1].captions == ["a three", "three"] and rows[1].line == 2


def test_word_tokenizer_round_trip() -> None:
    words = WordTokenizer.build(["a handwritten 3, a spoken seven and the word two"])
    ids = words.encode("A handwritten 3, a spoken seven", bos=True, eos=True)
    assert ids[0] == words.bos_id and ids[-1] == words.eos_id
    assert words.decode(ids[1:]) == "a handwritten 3, a spoken seven"
    assert words.encode("unseen")[0] == words.unk_id
    assert words.normalize("A  handwritten 3 ,a") == "a handwritten 3, a"


def datamodule(folder: Path, val_rows: list[object]) -> MultiModalDataModule:
    train = write(
        folder, [GOOD, {"id": "t2", "text": "one", "label": "1", "caption": "a one"}], "train.jsonl"
    )
    val = write(folder, val_rows, "val.jsonl")
    dm = MultiModalDataModule(str(train), val_manifest=str(val), batch_size=4, config=MultiMoEConfig())
    dm.setup("fit")
    return dm


def test_collate_keeps_missing_modalities_out_of_the_tensors(files: Path) -> None:
    rows = [GOOD, {"id": "v2", "text": "one two", "label": "1"}, {"id": "v3", "audio": "a.wav", "label": "7"}]
    batch = next(iter(datamodule(files, rows).val_dataloader()))
    parts = batch.inputs.parts
    assert parts[Modality.IMAGE].rows.tolist() == [0]
    assert parts[Modality.AUDIO].rows.tolist() == [0, 2]
    assert parts[Modality.TEXT].rows.tolist() == [0, 1]
    assert parts[Modality.TEXT].tensors["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert parts[Modality.AUDIO].tensors["waveform"].shape == (2, 3200)  # 22.05 kHz -> 16 kHz
    assert parts[Modality.IMAGE].tensors["pixels"].shape == (1, 3, 32, 32)
    assert batch.labels.tolist() == [1, 0, 1]  # labels "1", "7" sorted numerically
    assert batch.caption_ids is not None and batch.caption_ids[1].eq(0).all()  # no caption: all padding


@pytest.mark.parametrize(("name", "field"), [("broken.png", "image"), ("truncated.wav", "audio")])
def test_unreadable_file_is_refused_before_training(files: Path, name: str, field: str) -> None:
    row = {"id": "bad", field: name, "label": "7"}
    with pytest.raises(ManifestError, match=rf"val.jsonl:2: field '{field}': .*not a readable {field} file"):
        datamodule(files, [GOOD, row])


def test_unknown_label_is_refused_before_training(files: Path) -> None:
    with pytest.raises(ManifestError, match=r"val.jsonl:1: field 'label': unknown label '9'"):
        datamodule(files, [{**GOOD, "label": "9"}])


def test_audio_is_resampled_not_reinterpreted(files: Path) -> None:
    dm = datamodule(files, [GOOD])
    wave = dm.datasets["validate"][0].waveform
    assert wave is not None
    # 4410 samples at 22.05 kHz are 0.2 s: 3200 samples at 16 kHz, same sine frequency.
    spectrum = torch.fft.rfft(wave).abs()
    peak_hz = int(spectrum.argmax()) * 16000 / wave.shape[0]
    assert abs(peak_hz - 22050 / (2 * np.pi * 5)) < 10


HALF = (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    ("backbone", "overrides", "mean", "std", "resample"),
    [  # timm's ResNet-18 was trained on ImageNet statistics, this ViT on 0.5; a config may set its own
        ("resnet18", {}, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Image.Resampling.BICUBIC),
        ("vit_small_patch16_224.augreg_in21k", {}, HALF, HALF, Image.Resampling.BICUBIC),
        (
            "resnet18",
            {"mean": HALF, "std": HALF, "interpolation": "bilinear"},
            HALF,
            HALF,
            Image.Resampling.BILINEAR,
        ),
    ],
    ids=["resnet-own", "vit-own", "resnet-set"],
)
def test_image_transform_comes_from_the_model_data_config_unless_set(
    backbone: str,
    overrides: dict[str, Any],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resample: Image.Resampling,
    tmp_path: Path,
) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image.save(tmp_path / "a.png")
    pixels = ImageProcessor(ImageEncoderConfig(backbone=backbone, image_size=12, **overrides))(
        tmp_path / "a.png"
    )
    resized = np.asarray(image.resize((12, 12), resample), dtype=np.float32) / 255
    expected = (
        torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]
    ) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(pixels, expected)
