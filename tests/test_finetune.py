"""Fine-tuning: a grown model computes what the checkpoint did; freezing really freezes; a new label set and
vocabulary keep what the checkpoint knew; train.py fine-tunes in one command."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from multimoe.config import ConfigError, MultiMoEConfig
from multimoe.data.datamodule import MultiModalDataModule
from multimoe.model import MultiMoE, build_model
from multimoe.surgery import grown_config, transfer, upcycled_config
from tests.conftest import ROOT, SHARED_DATA
from tests.probes import finish, fit_command, kill_when_paused, same_weights, start


def tiny_config(**moe: object) -> MultiMoEConfig:
    config = MultiMoEConfig.from_dict(
        yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())["model"]["config"]
    )
    return dataclasses.replace(config, moe=dataclasses.replace(config.moe, **moe))  # type: ignore[arg-type]


def batch_of(digit_manifests: dict[str, Path], config: MultiMoEConfig) -> tuple[MultiModalDataModule, object]:
    dm = MultiModalDataModule(
        str(digit_manifests["train"]), val_manifest=str(digit_manifests["val"]), batch_size=16, config=config
    )
    dm.setup("validate")
    return dm, next(iter(dm.val_dataloader()))


def trained_like(config: MultiMoEConfig, dm: MultiModalDataModule, seed: int = 0) -> MultiMoE:
    """A model with random weights, and router and layer-norm weights far from their init."""
    torch.manual_seed(seed)
    sized = dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, vocab_size=len(dm.vocab)),
        classifier=dataclasses.replace(config.classifier, num_classes=len(dm.labels)),
        caption=dataclasses.replace(config.caption, vocab_size=len(dm.vocab)),
    )
    model = build_model(sized, dm.labels, dm.vocab)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".router." in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("moe", "add_experts", "add_modalities"),
    [({}, 2, ()), ({"bias_update_rate": 0.01, "cross_modal_experts": 0}, 1, ()), ({}, 0, ("audio",))],
    ids=["experts", "experts-with-bias-no-cross", "modality"],
)
def test_a_grown_model_computes_what_it_computed_before(
    digit_manifests: dict[str, Path],
    moe: dict[str, object],
    add_experts: int,
    add_modalities: tuple[str, ...],
) -> None:
    config = tiny_config(**moe)
    if add_modalities:
        config = dataclasses.replace(config, modalities=["text", "image"])
    dm, batch = batch_of(digit_manifests, config)
    base = trained_like(config, dm)
    grown = build_model(
        grown_config(base.config, add_experts, add_modalities), base.labels, base.vocab
    ).eval()
    new = transfer(base, grown)
    layers, old_layers = grown.moe_layers(), base.moe_layers()
    added = len(config.modalities) * add_experts + config.moe.experts_per_modality * len(add_modalities)
    assert [
        layer.experts.num_experts - old.experts.num_experts
        for layer, old in zip(layers, old_layers, strict=True)
    ] == [added] * len(layers)
    assert len(new) == len(config.modalities) * add_experts * len(layers)  # each starts out of reach
    with torch.no_grad():
        before, after = base(batch.inputs), grown(batch.inputs)  # type: ignore[attr-defined]
    assert after.class_logits is not None and before.class_logits is not None
    torch.testing.assert_close(after.class_logits, before.class_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.trunk.tokens, before.trunk.tokens, rtol=1e-5, atol=1e-6)
    # the copies are real copies: each new expert holds the weights of an expert of its modality
    for n in new:
        layer = next(layer for layer in layers if layer.router is n.router)
        same = [
            e
            for e in range(layer.experts.num_experts)
            if e != n.expert and torch.equal(layer.experts.down_proj[e], layer.experts.down_proj[n.expert])
        ]
        assert same and all(layer.router.allowed[n.modality, e] for e in same)


def test_new_labels_and_words_keep_what_the_checkpoint_knew(digit_manifests: dict[str, Path]) -> None:
    config = tiny_config()
    dm, _ = batch_of(digit_manifests, config)
    base = trained_like(config, dm)
    labels, vocab = ["even", "odd", "zero"], [*base.vocab, "brand", "new"]
    sized = dataclasses.replace(
        base.config,
        text=dataclasses.replace(base.config.text, vocab_size=len(vocab)),
        classifier=dataclasses.replace(base.config.classifier, num_classes=3),
        caption=dataclasses.replace(base.config.caption, vocab_size=len(vocab)),
    )
    torch.manual_seed(1)
    model = build_model(sized, labels, vocab)
    assert transfer(base, model) == []
    old, new = base.state_dict(), model.state_dict()
    assert torch.equal(new["classifier.out.weight"][:2], old["classifier.out.weight"])
    assert not torch.equal(new["classifier.out.weight"][2], torch.zeros_like(new["classifier.out.weight"][2]))
    grew = [k for k in new if new[k].shape != old[k].shape]
    assert {k for k in grew if "classifier" not in k} == {
        k for k in new if new[k].shape[:1] == (len(vocab),) and old[k].shape[:1] == (len(base.vocab),)
    }
    assert len(grew) >= 4  # text embeddings, caption embeddings, caption output weight and bias
    for k in grew:
        n = old[k].shape[0]
        assert torch.equal(new[k][:n], old[k]), k
    for k in set(new) - set(grew):
        assert torch.equal(new[k], old[k]), k


def test_train_py_fine_tunes_with_frozen_parts_new_labels_and_more_experts(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    from multimoe.training.cli import main

    checkpoint, _ = trained
    rows = [json.loads(line) for line in digit_manifests["train"].read_text().splitlines()]
    for i, row in enumerate(rows):  # a new label set, and caption words the checkpoint never saw
        row["label"] = ["even", "odd", "zero"][i % 3]
        row["caption"] = f"brand new words {i % 4}"
    train = digit_manifests["train"].parent / "finetune.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config",
            "configs/tiny.yaml",
            f"--data.train_manifest={train}",
            f"--data.val_manifest={train}",
            "--data.test_manifest=null",
            f"--finetune.checkpoint={checkpoint}",
            "--finetune.freeze=[encoders, router]",
            "--finetune.add_experts=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={root}",
        ]
    )
    base = torch.load(checkpoint, weights_only=False)
    tuned = torch.load(root / "checkpoints/last.ckpt", weights_only=False)
    assert tuned["hyper_parameters"]["labels"] == ["even", "odd", "zero"]
    vocab = tuned["hyper_parameters"]["vocab"]
    assert vocab[: len(base["hyper_parameters"]["vocab"])] == base["hyper_parameters"]["vocab"]
    assert {"brand", "new"} <= set(vocab)
    old, new = base["state_dict"], tuned["state_dict"]
    encoders = [k for k in old if k.startswith("model.encoders.") and "word_embeddings" not in k]
    assert encoders and all(torch.equal(new[k], old[k]) for k in encoders)  # frozen: bit-identical
    # router rows: the old experts' (text 0-1, image 2-3, audio 4-5, cross 6) moved to 0-1, 3-4, 6-7, 9
    routers = [k for k in old if k.endswith("router.proj.weight")]
    moved = [0, 1, 3, 4, 6, 7, 9]
    assert routers and all(torch.equal(new[k][moved], old[k]) for k in routers)
    experts = [k for k in old if ".experts." in k]
    assert experts and all(not torch.equal(new[k][moved], old[k]) for k in experts)  # trained
    heads = [k for k in old if k.startswith("model.captioner.") and new[k].shape == old[k].shape]
    assert heads and any(not torch.equal(new[k], old[k]) for k in heads)


def new_expert_biases(checkpoint: Path | dict) -> list[torch.Tensor]:
    """Each MoE layer's selection biases of the experts added by growing tiny.yaml's 2 per modality to 3:
    they sit at 2, 5 and 8 (before the cross-modal expert at 9)."""
    if isinstance(checkpoint, Path):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    return [v[:, [2, 5, 8]] for k, v in sorted(state.items()) if k.endswith("router.bias")]


@pytest.mark.slow
def test_a_resumed_grown_fine_tune_continues_its_grow_in_ramp(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """Two epochs of 3 steps, 8 ramp steps: killed after the first epoch and resumed, the run ends with the
    uninterrupted run's weights and new-expert biases (a restarted ramp would leave those 3 steps lower)."""
    checkpoint, _ = trained
    grow = [f"--finetune.checkpoint={checkpoint}", "--finetune.add_experts=1", "--finetune.grow_in_steps=8"]
    grow += ["--trainer.limit_train_batches=3", "--trainer.max_epochs=2", "--trainer.deterministic=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, digit_manifests, *grow), full / "out.txt")
    killed = start(fit_command(cut, digit_manifests, *grow, pause_at_step=4), cut / "out.txt")
    kill_when_paused(killed, cut)  # the first epoch done, validated and saved
    saved = torch.load(cut / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 3
    assert [s for k, s in saved["callbacks"].items() if k.startswith("GrowIn")] == [{"done": 3}]
    resume = fit_command(cut, digit_manifests, *grow, "--ckpt_path=last")
    finish(start(resume, cut / "out2.txt"), cut / "out2.txt")
    finish(uninterrupted, full / "out.txt")
    expected = new_expert_biases(full / "checkpoints" / "last.ckpt")
    resumed = new_expert_biases(cut / "checkpoints" / "last.ckpt")
    assert len(expected) == 1 and not torch.equal(expected[0], new_expert_biases(saved)[0])  # still ramping
    for a, b in zip(expected, resumed, strict=True):
        assert torch.equal(a, b)
    assert same_weights(full, cut)


@pytest.mark.slow
def test_a_modality_grows_in_through_the_cli_and_the_grown_checkpoint_evaluates(
    digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """A text + image model, fine-tuned with ``--finetune.add_modalities [audio]``, then ``test --ckpt_path``
    on the grown checkpoint (the test manifest has audio)."""
    base, grown = tmp_path / "base", tmp_path / "grown"
    steps = ["--trainer.limit_train_batches=2", "--test_after_fit=false"]
    two = fit_command(base, digit_manifests, *steps, "--model.config.modalities=[text,image]")
    finish(start(two, base / "out.txt"), base / "out.txt")
    add = [f"--finetune.checkpoint={base / 'checkpoints/last.ckpt'}", "--finetune.add_modalities=[audio]"]
    out = finish(
        start(fit_command(grown, digit_manifests, *steps, *add), grown / "out.txt"), grown / "out.txt"
    )
    assert "0 new experts" in out  # a new modality's experts start level: nothing to grow in
    checkpoint = grown / "checkpoints" / "last.ckpt"
    model = MultiMoE.from_checkpoint(checkpoint)
    assert model.config.modalities == ["text", "image", "audio"] and model.config.moe.bias_update_rate > 0
    command = [sys.executable, "train.py", "test", "--config=configs/tiny.yaml", f"--ckpt_path={checkpoint}"]
    command += [f"--data.test_manifest={digit_manifests['test']}", f"--metrics_file={tmp_path / 'm.json'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "m.json").read_text())["classification"]["labels"] == ["even", "odd"]


def test_fine_tuning_starts_from_a_saved_model_folder(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    from multimoe.tools.convert import convert
    from multimoe.training.cli import main

    checkpoint, _ = trained
    folder = tmp_path / "saved"
    convert(checkpoint, folder)
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config=configs/tiny.yaml",
            *[f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()],
            f"--finetune.checkpoint={folder}",
            "--finetune.freeze=[encoders]",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    saved = MultiMoE.from_pretrained(str(folder)).state_dict()
    tuned = MultiMoE.from_checkpoint(root / "checkpoints" / "last.ckpt").state_dict()
    encoders = [k for k in saved if k.startswith("encoders.")]
    assert encoders and all(torch.equal(tuned[k], saved[k]) for k in encoders)  # frozen: the folder's weights
    assert any(not torch.equal(tuned[k], saved[k]) for k in saved if k.startswith("trunk."))


def doc_commands(text: str) -> list[list[str]]:
    """The ``python ...`` commands of a page's bash blocks, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    joined = "\n".join(blocks).replace("\\\n", " ")
    return [
        shlex.split(line, comments=True)
        for line in joined.splitlines()
        if line.startswith("python ") and "<<" not in line
    ]


@pytest.mark.slow
def test_the_csv_fine_tune_walkthrough_runs_as_written(
    trained: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """docs/finetune.md from a fresh folder beside ../shared: its manifest script, the checker, the
    fine-tuning command (from the test fixture's checkpoint, a few steps), the evaluation without audio, and
    the LoRA fine-tune with its adapter saved alone and merged."""
    text = (ROOT / "docs" / "finetune.md").read_text()
    script = text.split("python - <<'PY'\n")[1].split("\nPY\n")[0]
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True, timeout=120)
    check, fit, test, lora_fit, save_adapter, merge, *measured = doc_commands(text)
    assert measured and all(command[1] == "benchmarks/lora_finetune.py" for command in measured)
    assert check[:3] == ["python", "-m", "multimoe.tools.check"]
    assert fit[1:3] == ["train.py", "fit"] and test[1:3] == ["train.py", "test"]
    few = [
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]
    few += ["--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'run'}"]

    def python(command: list[str]) -> subprocess.CompletedProcess[str]:
        args = [str(ROOT / a) if a.startswith(("train.py", "configs/")) else a for a in command[1:]]
        result = subprocess.run(
            [sys.executable, *args], cwd=work, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    checked = python(check).stderr
    assert (
        "mydigits/train.csv: 1500 rows, 0 bad" in checked and "mydigits/test.csv: 300 rows, 0 bad" in checked
    )
    fit[fit.index("--finetune.checkpoint") + 1] = str(trained[0])
    assert "10 labels (0 known)" in python([*fit, *few]).stderr
    [tuned] = (tmp_path / "run").rglob("last.ckpt")  # under lightning_logs/version_0/checkpoints, as written
    test[test.index("--ckpt_path") + 1] = str(tuned)
    assert "test/acc" in python([*test, *few[2:]]).stdout

    readme = doc_commands((ROOT / "README.md").read_text())
    assert lora_fit in readme  # the README's LoRA command is the one run here
    lora_fit[lora_fit.index("--finetune.checkpoint") + 1] = str(trained[0])
    lora_run = [*few[:-1], f"--trainer.default_root_dir={tmp_path / 'lora'}"]
    assert "LoRA r=8 on image, audio, attention, experts" in python([*lora_fit, *lora_run]).stderr
    [adapted] = (tmp_path / "lora").rglob("last.ckpt")
    assert save_adapter[:3] == ["python", "-m", "multimoe.tools.convert"] and "--merge" in merge
    python([*save_adapter[:3], str(adapted), *save_adapter[4:]])
    python(merge)
    adapter, model = work / save_adapter[-1], work / merge[4]
    assert {p.name for p in adapter.iterdir()} == {"adapter.json", "adapter.safetensors"}
    assert MultiMoE.from_pretrained(model).config.lora.r == 0
    assert MultiMoE.from_pretrained(adapter).config.lora.base == str(trained[0])


def test_an_upcycled_model_computes_what_the_dense_one_did(digit_manifests: dict[str, Path]) -> None:
    """Every MoE FFN starts as the dense block's FFN, top-1 with a gate of 1: the same outputs, bit for bit up
    to float noise, at the same compute per token."""
    dense_config = tiny_config(every=0)
    dm, batch = batch_of(digit_manifests, dense_config)
    dense = trained_like(dense_config, dm)
    config = upcycled_config(dense.config, tiny_config().moe)
    assert (config.moe.top_k, config.moe.expert_d_ff) == (1, dense.config.trunk.d_ff)
    torch.manual_seed(3)
    model = build_model(config, dense.labels, dense.vocab).eval()
    assert transfer(dense, model) == [] and len(model.moe_layers()) == 1
    with torch.no_grad():
        before, after = dense(batch.inputs), model(batch.inputs)  # type: ignore[attr-defined]
    assert after.class_logits is not None and before.class_logits is not None
    torch.testing.assert_close(after.class_logits, before.class_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after.trunk.tokens, before.trunk.tokens, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="already has MoE layers"):
        upcycled_config(config, tiny_config().moe)


def test_train_py_upcycles_a_dense_model(digit_manifests: dict[str, Path], tmp_path: Path) -> None:
    from multimoe.training.cli import main

    dm, _ = batch_of(digit_manifests, tiny_config(every=0))
    folder = tmp_path / "dense"
    trained_like(tiny_config(every=0), dm).save_pretrained(folder)
    root = tmp_path / "run"
    main(
        [
            "fit",
            "--config=configs/tiny.yaml",
            *[f"--data.{k}_manifest={v}" for k, v in digit_manifests.items()],
            f"--finetune.checkpoint={folder}",
            "--finetune.upcycle=true",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--test_after_fit=false",
            f"--trainer.default_root_dir={root}",
        ]
    )
    model = MultiMoE.from_checkpoint(root / "checkpoints" / "last.ckpt")
    [layer] = model.moe_layers()  # tiny.yaml: MoE in every second block
    assert (layer.router.top_k, layer.experts.num_experts, model.config.moe.expert_d_ff) == (1, 7, 64)
