"""Fine-tuning from a trained model: new label set, frozen parts, and growing (upcycled) experts.

``python train.py fit --config configs/finetune_digits.yaml --finetune.checkpoint <ckpt>``: the model's
architecture, weights and vocabulary come from the checkpoint; the label set comes from the new training
manifest. Then:

- new labels: the classifier's output layer gets one row per new label; labels the checkpoint knew keep their
  row, the rest of the model is kept as it was;
- new words (captions, scratch text encoder) are appended to the vocabulary; known words keep their embedding;
- ``freeze``: parts whose parameters stay bit-identical (and which run in eval mode);
- ``add_experts``: more experts per modality in every MoE layer, each a copy of one of that modality's
  experts (its router row copied too); ``add_modalities``: a new modality, with a fresh encoder and experts
  copied from the cross-modal ones. The grown model computes exactly what the checkpoint did: a new expert
  starts with a selection bias low enough that no token can pick it (bound from the router weights and the
  layer norm), and that bias rises to the level of its modality's other experts over ``grow_in_steps``
  training steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from multimoe.config import ConfigError, MultiMoEConfig
from multimoe.modality import Modality
from multimoe.model import MultiMoE, build_model
from multimoe.moe.layer import MoELayer
from multimoe.moe.router import Router

FREEZABLE = (
    "encoders",
    "text",
    "image",
    "audio",
    "projectors",
    "router",
    "experts",
    "trunk",
    "classifier",
    "captioner",
)


@dataclass
class FinetuneConfig:
    """``checkpoint``: a ``train.py`` checkpoint (``.ckpt``) or a saved model folder (none: from scratch).
    ``freeze``: any of ``FREEZABLE`` (encoders, one encoder by modality, projectors, router, experts, trunk,
    classifier, captioner).
    ``add_experts``: experts added per modality to every MoE layer. ``add_modalities``: modalities the
    checkpoint did not read. ``grow_in_steps``: steps over which new experts join the routing.
    ``grow_bias_rate``: ``moe.bias_update_rate`` of a grown model whose checkpoint had none (new experts need
    the selection bias). Without a checkpoint ``freeze`` is ignored and growing is refused."""

    checkpoint: str | None = None
    freeze: list[str] = field(default_factory=list)
    add_experts: int = 0
    add_modalities: list[str] = field(default_factory=list)
    grow_in_steps: int = 200
    grow_bias_rate: float = 0.001

    def __post_init__(self) -> None:
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(
                f"finetune.freeze: unknown part {unknown[0]!r}; allowed: {', '.join(FREEZABLE)}"
            )
        if self.add_experts < 0 or self.grow_in_steps < 1 or self.grow_bias_rate <= 0:
            raise ConfigError("finetune: add_experts must be >= 0, grow_in_steps >= 1 and grow_bias_rate > 0")


def load_base(path: str | Path) -> MultiMoE:
    """The trained model of a ``train.py`` checkpoint or of a ``save_pretrained`` folder."""
    path = Path(path)
    if path.is_dir():
        return MultiMoE.from_pretrained(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"finetune.checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    model = build_model(MultiMoEConfig.from_dict(hparams["config"]), hparams["labels"], hparams["vocab"])
    state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    model.load_state_dict(state)
    return model


def grown_config(base: MultiMoEConfig, finetune: FinetuneConfig) -> MultiMoEConfig:
    """The checkpoint's architecture with the added modalities and experts (head sizes follow the data)."""
    unknown = sorted(set(finetune.add_modalities) & set(base.modalities))
    if unknown:
        raise ConfigError(f"finetune.add_modalities: the checkpoint already reads {unknown[0]!r}")
    moe = base.moe
    if finetune.add_experts or finetune.add_modalities:
        if moe.router != "mixtral" or not moe.enabled:
            raise ConfigError("finetune: growing needs MoE layers with moe.router='mixtral'")
        moe = dataclasses.replace(
            moe,
            experts_per_modality=moe.experts_per_modality + finetune.add_experts,
            bias_update_rate=moe.bias_update_rate or finetune.grow_bias_rate,
        )
    return dataclasses.replace(base, modalities=[*base.modalities, *finetune.add_modalities], moe=moe)


@dataclass
class NewExpert:
    """An expert added by growing: its router, modality row and expert index, and its start bias."""

    router: Router
    modality: int
    expert: int
    start: float


def transfer(base: MultiMoE, model: MultiMoE) -> list[NewExpert]:
    """Copy the base model's weights into ``model`` (same trunk depth and widths; maybe more labels, words,
    modalities or experts, see the module docstring). Returns the new experts for ``GrowIn``."""
    target = model.state_dict()
    source = base.state_dict()
    moe_prefixes = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]
    for name, value in target.items():
        if any(name.startswith(p + ".") for p in moe_prefixes) and (
            ".router." in name or ".experts." in name
        ):
            continue  # below, expert by expert
        old = source.get(name)
        if old is None:
            continue  # a new modality's encoder and projector: fresh
        if old.shape == value.shape:
            value.copy_(old)
        elif name.startswith("classifier.out."):
            rows = {label: i for i, label in enumerate(base.labels)}
            for i, label in enumerate(model.labels):
                if label in rows:
                    value[i] = old[rows[label]]
        elif old.shape[1:] == value.shape[1:] and old.shape[0] == len(base.vocab) < value.shape[0]:
            value[: old.shape[0]] = old  # vocabulary rows: known words keep their ids
        else:
            raise ConfigError(
                f"finetune: cannot carry {name} over: {tuple(old.shape)} -> {tuple(value.shape)}"
            )
    model.load_state_dict(target)
    new: list[NewExpert] = []
    blocks = dict(zip(moe_prefixes, [_block_norm(model, p) for p in moe_prefixes], strict=True))
    for prefix in moe_prefixes:
        old_layer, layer = base.get_submodule(prefix), model.get_submodule(prefix)
        assert isinstance(old_layer, MoELayer) and isinstance(layer, MoELayer)
        new += _grow_layer(old_layer, layer, base, model, blocks[prefix])
    return new


def _block_norm(model: MultiMoE, moe_prefix: str) -> nn.LayerNorm:
    norm = model.get_submodule(moe_prefix.removesuffix(".ffn") + ".ffn_norm")
    assert isinstance(norm, nn.LayerNorm)
    return norm


@torch.no_grad()
def _grow_layer(
    old: MoELayer, layer: MoELayer, base: MultiMoE, model: MultiMoE, norm: nn.LayerNorm
) -> list[NewExpert]:
    """Expert by expert: old experts keep weights, router rows and bias; each new one copies a source."""
    old_epm = base.config.moe.experts_per_modality
    epm = model.config.moe.experts_per_modality
    cross = layer.experts.num_experts - len(model.modalities) * epm
    old_slot = {m: i for i, m in enumerate(base.modalities)}
    sources: dict[int, tuple[int, bool]] = {}  # new index -> (old index, whether it is a new expert)
    for slot, m in enumerate(model.modalities):
        for j in range(epm):
            if m in old_slot and old_epm > 0:
                src = old_slot[m] * old_epm + j % old_epm
            elif cross > 0:
                src = old.experts.num_experts - cross + j % cross
            else:
                src = j % old_epm
            sources[slot * epm + j] = (src, m not in old_slot or j >= old_epm)
    for c in range(cross):
        sources[layer.experts.num_experts - cross + c] = (old.experts.num_experts - cross + c, False)
    for e, (src, _) in sources.items():
        layer.experts.w_in[e] = old.experts.w_in[src]
        layer.experts.down_proj[e] = old.experts.down_proj[src]
        layer.router.proj.weight[e] = old.router.proj.weight[src]
    router = layer.router
    if router.bias is None:
        return []
    old_bias = (
        old.router.bias if old.router.bias is not None else torch.zeros_like(old.router.allowed.float())
    )
    # |router input| <= sqrt(d) * max|gamma| + |beta| (a layer-norm output), times the training jitter
    reach = (norm.weight.abs().max() * norm.weight.numel() ** 0.5 + norm.bias.norm()) * (1 + router.jitter)
    new = []
    for e, (src, is_new) in sources.items():
        for row in range(router.allowed.shape[0]):
            if not router.allowed[row, e]:
                continue
            if not is_new:
                router.bias[row, e] = old_bias[row, src]
                continue
            if Modality(row) not in base.modalities:
                continue  # a new modality: nothing to preserve, all its experts start level
            # Below every old expert f of the modality for any input h: l_e + b < l_f + b_f.
            rows = [f for f, (_, f_new) in sources.items() if router.allowed[row, f] and not f_new]
            gaps = torch.stack(
                [
                    old_bias[row, sources[f][0]]
                    - reach * (router.proj.weight[f] - router.proj.weight[e]).norm()
                    for f in rows
                ]
            )
            start = float(gaps.min()) - 1.0
            router.bias[row, e] = start
            new.append(NewExpert(router, row, e, start))
    return new


def freeze(model: MultiMoE, parts: list[str]) -> list[nn.Module]:
    """Stop training ``parts`` (``FREEZABLE``): no gradients, no routing-bias updates. Returns the modules,
    which ``KeepFrozen`` keeps in eval mode."""
    modules: list[nn.Module] = []
    for part in parts:
        if part == "encoders":
            modules += list(model.encoders.values())
        elif part in ("text", "image", "audio"):
            if part not in model.encoders:
                raise ConfigError(f"finetune.freeze: the model has no {part} encoder")
            modules.append(model.encoders[part])
        elif part == "projectors":
            modules += list(model.projectors.values())
        elif part == "router":
            modules += [layer.router for layer in model.moe_layers()]
        elif part == "experts":
            modules += [
                m for layer in model.moe_layers() for m in (layer.experts, layer.shared) if m is not None
            ]
        else:
            module = getattr(model, part)
            if module is None:
                raise ConfigError(f"finetune.freeze: the model has no {part}")
            modules.append(module)
    for module in modules:
        module.requires_grad_(False)
        for router in (m for m in module.modules() if isinstance(m, Router)):
            router.bias_rate = 0.0
    return modules


class KeepFrozen(L.Callback):
    """Frozen modules stay in eval mode in training (batch-norm statistics, dropout, SpecAugment)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for module in self.modules:
            module.eval()


class GrowIn(L.Callback):
    """Raises each new expert's selection bias from its start to the mean of its modality's other experts
    over ``steps`` training steps, so the grown model moves away from the checkpoint's function gradually."""

    def __init__(self, experts: list[NewExpert], steps: int) -> None:
        self.experts, self.steps, self.done = experts, steps, 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.done >= self.steps:
            return
        self.done += 1
        for new in self.experts:
            bias = new.router.bias
            assert bias is not None
            others = new.router.allowed[new.modality].clone()
            others[[e.expert for e in self.experts if e.router is new.router]] = False
            target = float(bias[new.modality][others].mean())
            bias[new.modality, new.expert] = new.start + (target - new.start) * self.done / self.steps


def prepare(cfg: Any, subcommand: str | None = None) -> tuple[MultiMoE, FinetuneConfig] | None:
    """Before the CLI builds anything (``cfg``: its parsed namespace): with ``finetune.checkpoint``, the model
    and data configs become the checkpoint's architecture, grown as asked, and the vocabulary starts from the
    checkpoint's. ``validate``, ``test`` and ``predict`` with a ``--ckpt_path`` likewise build the model that
    checkpoint holds (a fine-tuned one, say) whatever the YAML says."""
    ckpt_path = cfg.get("ckpt_path") if subcommand in ("validate", "test", "predict") else None
    if ckpt_path and str(ckpt_path).endswith(".ckpt") and Path(ckpt_path).is_file():
        hparams = torch.load(ckpt_path, map_location="cpu", weights_only=False)["hyper_parameters"]
        _set_model_config(cfg, hparams["config"], hparams["vocab"])
        return None
    if cfg.get("finetune") is None or not cfg.finetune.checkpoint:
        if cfg.get("finetune") is not None and (cfg.finetune.add_experts or cfg.finetune.add_modalities):
            raise ConfigError("finetune.add_experts and finetune.add_modalities need finetune.checkpoint")
        return None
    finetune = FinetuneConfig(**cfg.finetune.as_dict())
    base = load_base(cfg.finetune.checkpoint)
    _set_model_config(cfg, grown_config(base.config, finetune).to_dict(), base.vocab)
    return base, finetune


def _set_model_config(cfg: Any, config: dict[str, Any], vocab: list[str] | None) -> None:
    namespace = type(cfg.model.config)
    cfg.model.config = namespace(
        **{k: namespace(**v) if isinstance(v, dict) else v for k, v in config.items()}
    )
    cfg.data.config = cfg.model.config.clone()
    cfg.data.base_vocab = vocab


def apply(base: MultiMoE, finetune: FinetuneConfig, model: MultiMoE, trainer: L.Trainer | None) -> str:
    """After the CLI built the model: carry the checkpoint's weights over, freeze, and add the callbacks.
    Returns a one-line summary."""
    new = transfer(base, model)
    frozen = freeze(model, finetune.freeze)
    if trainer is not None:
        trainer.callbacks += [KeepFrozen(frozen), GrowIn(new, finetune.grow_in_steps)]  # type: ignore[attr-defined]
    known = len(set(base.labels) & set(model.labels))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"fine-tuning {finetune.checkpoint}: {len(model.labels)} labels ({known} known), "
        f"{len(model.vocab) - len(base.vocab)} new words, {len(new)} new experts, "
        f"frozen: {', '.join(finetune.freeze) or 'nothing'}; {trainable:,} of {total:,} parameters train"
    )
