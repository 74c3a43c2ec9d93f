"""LoRA fine-tuning with PEFT: each target adapts its part and nothing else; the expert adapters equal an
explicit per-expert update; adapters save alone and load onto their base; merged equals unmerged; train.py
fine-tunes, resumes and grows with adapters."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multimoe import lora
from multimoe.config import LORA_TARGETS, ConfigError, ImageEncoderConfig, LoraConfig
from multimoe.model import ADAPTER_WEIGHTS, MultiMoE, build_model
from multimoe.moe.experts import Experts
from multimoe.moe.router import Routing
from multimoe.surgery import transfer
from multimoe.tools.convert import main as convert_main
from tests.probes import finish, fit_command, kill_when_paused, same_weights, start
from tests.test_finetune import batch_of, tiny_config, trained_like

PARTS = {  # where each target's adapters sit in the tiny model
    "text": ("encoders.text.", "projectors.text."),
    "image": ("encoders.image.", "projectors.image."),
    "audio": ("encoders.audio.", "projectors.audio."),
    "attention": ("trunk.blocks.0.attn.", "trunk.blocks.1.attn."),
    "experts": ("trunk.blocks.0.ffn.", "trunk.blocks.1.ffn.experts."),
    "router": (),  # trained in full: (E, d) is smaller than one adapter pair of rank >= E
}
IN_FULL = ("classifier.", "captioner.")


def with_lora(source: MultiMoE, **options: object) -> MultiMoE:
    """``source``'s architecture with adapters, carrying its weights (as fine-tuning does)."""
    config = dataclasses.replace(source.config, lora=LoraConfig(**options))  # type: ignore[arg-type]
    model = build_model(config, source.labels, source.vocab)
    transfer(source, model)
    return model


def randomize_adapters(model: MultiMoE, seed: int = 0) -> None:
    """Non-zero B: the adapters change what the model computes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_adapter_weight(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def base_and_batch(digit_manifests: dict[str, Path]) -> tuple[MultiMoE, object]:
    dm, batch = batch_of(digit_manifests, tiny_config())
    return trained_like(tiny_config(), dm), batch


@pytest.mark.parametrize("target", LORA_TARGETS)
def test_each_target_adapts_its_part_and_only_the_adapters_and_heads_train(
    base_and_batch: tuple[MultiMoE, object], target: str
) -> None:
    base, batch = base_and_batch
    model = with_lora(base, r=4, targets=[target]).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = [n for n in trainable if lora.is_adapter_weight(n)]
    assert bool(adapters) == (target != "router") and all(n.startswith(PARTS[target]) for n in adapters)
    in_full = IN_FULL + (("trunk.blocks.1.ffn.router.",) if target == "router" else ())
    assert {n for n in trainable if not lora.is_adapter_weight(n) and not n.startswith(in_full)} == set()
    assert target != "router" or "trunk.blocks.1.ffn.router.proj.weight" in trainable
    with torch.no_grad():  # B = 0 at the start: the base model's function
        before, start_out = base.eval()(batch.inputs), model(batch.inputs)  # type: ignore[attr-defined]
    torch.testing.assert_close(start_out.class_logits, before.class_logits, rtol=1e-5, atol=1e-6)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        out = model(batch.inputs)  # type: ignore[attr-defined]
        loss = out.class_logits.logsumexp(-1).mean() - out.class_logits[:, 0].mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        moved = {n.split(".lora_")[0] for n in adapters if model.get_parameter(n).grad.abs().sum() > 0}
        assert moved == {n.split(".lora_")[0] for n in adapters}  # every adapted layer gets a gradient
        optimizer.step()
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed
    with torch.no_grad():
        after = model(batch.inputs)  # type: ignore[attr-defined]
    assert not torch.allclose(after.trunk.tokens, start_out.trunk.tokens, atol=1e-4)


@pytest.mark.parametrize("dispatch", ["reference", "sorted", "grouped_mm"])
def test_expert_adapters_equal_an_explicit_per_expert_update(
    base_and_batch: tuple[MultiMoE, object], dispatch: str
) -> None:
    """Each expert e runs with W_e + (alpha / r) B_e A_e, forward and backward, whatever the dispatch path."""
    base, _ = base_and_batch
    model = with_lora(base, r=3, alpha=6.0, targets=["experts"])
    randomize_adapters(model)
    layer = model.moe_layers()[0]
    wrapper = layer.experts  # PEFT's parameter wrappers, one per stacked weight
    experts = wrapper.get_base_layer()
    assert isinstance(experts, Experts) and not isinstance(wrapper, Experts)
    num, _, d = experts.w_in.shape
    torch.manual_seed(1)
    x = torch.randn(20, d, requires_grad=True)
    modality_ids = torch.randint(0, 3, (20,))
    routing: Routing = layer.router.eval()(x, modality_ids, 0.0)
    y = wrapper(x, routing, dispatch)

    # the explicit update, from the adapter weights as PEFT stores them: A (E*r, in), B (out, E*r)
    def adapted(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows = []
        for e in range(num):
            a_e = a[e * 3 : (e + 1) * 3]  # (r, in)
            b_e = b.view(b.shape[0], 3, num)[:, :, e]  # (out, r)
            rows.append(weight[e] + 2.0 * b_e @ a_e)
        return torch.stack(rows)

    adapters = {n: p for n, p in wrapper.named_parameters() if lora.is_adapter_weight(n)}
    outer_a, outer_b = adapters["lora_A.default.weight"], adapters["lora_B.default.weight"]  # down_proj
    inner_a = adapters["base_layer.lora_A.default.weight"]  # gate_up_proj
    inner_b = adapters["base_layer.lora_B.default.weight"]
    w_in = adapted(experts.w_in, inner_a, inner_b)
    w_down = adapted(experts.down_proj, outer_a, outer_b)
    reference = torch.zeros_like(x)
    for t, e, g in zip(routing.token.tolist(), routing.expert.tolist(), routing.weight, strict=True):
        gate, up = (w_in[e] @ x[t]).chunk(2)
        reference = reference.index_add(0, torch.tensor([t]), (g * w_down[e] @ (F.silu(gate) * up))[None])
    torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)

    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, outer_a, outer_b, inner_a, inner_b], grad, retain_graph=True)
    want = torch.autograd.grad(reference, [x, outer_a, outer_b, inner_a, inner_b], grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_merged_and_unmerged_models_agree_and_bf16_runs(base_and_batch: tuple[MultiMoE, object]) -> None:
    base, batch = base_and_batch
    model = with_lora(base, r=4, targets=list(LORA_TARGETS)).eval()
    randomize_adapters(model)
    with torch.no_grad():  # eval without gradients: PyTorch's fused encoder layers must not skip adapters
        unmerged = model(batch.inputs)  # type: ignore[attr-defined]
        plain = base(batch.inputs)  # type: ignore[attr-defined]
    assert not torch.allclose(unmerged.class_logits, plain.class_logits, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 mixed precision: forward and backward
        out = model.train()(batch.inputs)  # type: ignore[attr-defined]
        out.class_logits.float().sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if lora.is_adapter_weight(n)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads if g is not None) > len(grads) // 2

    lora.merge(model.eval())
    assert model.config.lora.r == 0
    assert not any(lora.is_adapter_weight(n) or ".base_layer." in n for n in model.state_dict())
    assert isinstance(model.moe_layers()[0].experts, Experts)
    with torch.no_grad():
        merged = model(batch.inputs)  # type: ignore[attr-defined]
    torch.testing.assert_close(merged.class_logits, unmerged.class_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.trunk.tokens, unmerged.trunk.tokens, rtol=1e-4, atol=1e-5)


def test_an_adapter_saves_alone_and_loads_onto_its_base(
    base_and_batch: tuple[MultiMoE, object], tmp_path: Path
) -> None:
    base, batch = base_and_batch
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    targets = ["attention", "experts"]
    model = with_lora(MultiMoE.from_pretrained(base_dir), r=2, targets=targets, base=str(base_dir))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.out.weight.mul_(1.5)  # type: ignore[union-attr]  # a head trains in full
    model.save_adapter(tmp_path / "adapter")
    size = (tmp_path / "adapter" / ADAPTER_WEIGHTS).stat().st_size
    assert size < (base_dir / "model.safetensors").stat().st_size / 5
    loaded = MultiMoE.from_pretrained(tmp_path / "adapter")
    assert loaded.config == model.config and loaded.labels == model.labels
    with torch.no_grad():
        want = model.eval()(batch.inputs)  # type: ignore[attr-defined]
        got = loaded.eval()(batch.inputs)  # type: ignore[attr-defined]
    torch.testing.assert_close(got.class_logits, want.class_logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "whole")  # unmerged, adapters and all: its config rebuilds them
    with torch.no_grad():
        whole = MultiMoE.from_pretrained(tmp_path / "whole").eval()(batch.inputs)  # type: ignore[attr-defined]
    torch.testing.assert_close(whole.class_logits, want.class_logits, rtol=0, atol=0)
    # the folder moved: its base is named when loading; a missing base is one clear error
    moved = tmp_path / "elsewhere"
    base_dir.rename(moved)
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        MultiMoE.from_pretrained(tmp_path / "adapter")
    again = MultiMoE.from_pretrained(tmp_path / "adapter", base=str(moved))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(batch.inputs).class_logits, want.class_logits, rtol=0, atol=0)  # type: ignore[attr-defined]


def test_lora_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown target 'mlp'"):
        LoraConfig(r=4, targets=["mlp"])
    with pytest.raises(ConfigError, match=r"LoraConfig\.r"):
        LoraConfig(r=-1)
    from multimoe.training.finetune import FinetuneConfig

    with pytest.raises(ConfigError, match="new experts need targets experts and router"):
        FinetuneConfig(checkpoint="x.ckpt", add_experts=1, lora=LoraConfig(r=4, targets=["attention"]))
    with pytest.raises(ConfigError, match="fine-tune in full first"):
        FinetuneConfig(checkpoint="x.ckpt", upcycle=True, lora=LoraConfig(r=4))


def test_train_py_fine_tunes_with_lora_saves_the_adapter_and_merges(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    """LoRA on every target with a new label set, frozen routers, modality dropout and one grown expert per
    modality: the base weights stay bit-identical, and the adapter folder and the merged model compute what
    the fine-tuned checkpoint computes."""
    checkpoint, _ = trained
    rows = [json.loads(line) for line in digit_manifests["train"].read_text().splitlines()]
    for i, row in enumerate(rows):
        row["label"] = ["even", "odd", "zero"][i % 3]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    root = tmp_path / "run"
    options = [
        f"--finetune.checkpoint={checkpoint}",
        "--finetune.lora.r=4",
        f"--finetune.lora.targets=[{','.join(LORA_TARGETS)}]",
        "--finetune.add_experts=1",
        "--data.modality_dropout=0.3",
        "--data.test_manifest=null",
    ]
    command = fit_command(root, {"train": train, "val": train}, *options, "--trainer.limit_train_batches=4")
    out = finish(start(command, root / "out.txt"), root / "out.txt")
    assert "LoRA r=4 on text, image, audio, attention, experts, router" in out
    base = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    tuned = torch.load(root / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    wrapped = [k for k in tuned if ".base_layer." in k and ".experts." not in k and "router" not in k]
    assert wrapped and all(torch.equal(tuned[k], base[k.replace(".base_layer", "")]) for k in wrapped)
    assert any(lora.is_adapter_weight(k) and tuned[k].abs().sum() > 0 for k in tuned if ".lora_B." in k)

    model = MultiMoE.from_pretrained(root / "checkpoints/last.ckpt").eval()
    assert model.labels == ["even", "odd", "zero"] and model.config.lora.base == str(checkpoint)
    _, batch = batch_of(digit_manifests, model.config)
    convert_main([str(root / "checkpoints/last.ckpt"), str(tmp_path / "adapter")])
    convert_main([str(tmp_path / "adapter"), str(tmp_path / "merged"), "--merge"])
    adapter, merged = (MultiMoE.from_pretrained(tmp_path / p).eval() for p in ("adapter", "merged"))
    assert merged.config.lora.r == 0
    size = sum(f.stat().st_size for f in (tmp_path / "adapter").iterdir())
    assert size < sum(f.stat().st_size for f in (tmp_path / "merged").iterdir()) / 2
    with torch.no_grad():
        want = model(batch.inputs).class_logits  # type: ignore[attr-defined]
        torch.testing.assert_close(adapter(batch.inputs).class_logits, want, rtol=0, atol=0)  # type: ignore[attr-defined]
        torch.testing.assert_close(merged(batch.inputs).class_logits, want, rtol=1e-4, atol=1e-5)  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_killed_lora_fine_tune_resumes_to_the_uninterrupted_result(
    trained: tuple[Path, list[str]], digit_manifests: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint, _ = trained
    options = [f"--finetune.checkpoint={checkpoint}", "--finetune.lora.r=4"]
    options += ["--trainer.limit_train_batches=3", "--trainer.max_epochs=2", "--trainer.deterministic=true"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = start(fit_command(full, digit_manifests, *options), full / "out.txt")
    killed = start(fit_command(cut, digit_manifests, *options, pause_at_step=4), cut / "out.txt")
    kill_when_paused(killed, cut)
    resume = fit_command(cut, digit_manifests, *options, "--ckpt_path=last")
    finish(start(resume, cut / "out2.txt"), cut / "out2.txt")
    finish(uninterrupted, full / "out.txt")
    assert same_weights(full, cut)
    state = torch.load(cut / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in state.items())


def test_a_dilated_resnet_encoder_is_adapted_exactly(digit_manifests: dict[str, Path]) -> None:
    """configs/default.yaml's ResNet (output stride 8: dilated convolutions): every convolution gets an
    adapter, and merged equals unmerged (PEFT's convolution adapter alone would lose the dilation)."""
    image = ImageEncoderConfig(
        backbone="resnet18",
        image_size=32,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        timm_kwargs={"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16], "output_stride": 8},
    )
    config = dataclasses.replace(tiny_config(), image=image)
    dm, batch = batch_of(digit_manifests, config)
    base = trained_like(config, dm)
    model = with_lora(base, r=2, targets=["image"]).eval()
    convs = [n for n, m in base.encoders["image"].named_modules() if isinstance(m, torch.nn.Conv2d)]
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if lora.is_adapter_weight(n)}
    assert {f"encoders.image.{n}" for n in convs} <= adapted
    assert any(max(base.encoders["image"].get_submodule(n).dilation) > 1 for n in convs)
    randomize_adapters(model)
    with torch.no_grad():
        unmerged = model(batch.inputs).class_logits  # type: ignore[attr-defined]
        lora.merge(model)
        merged = model(batch.inputs).class_logits  # type: ignore[attr-defined]
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
