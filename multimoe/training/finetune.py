"""Fine-tuning hooks of the CLI: start from a trained model, with a new label set, frozen parts and grown
(upcycled) experts.

``python train.py fit --config configs/finetune_digits.yaml --finetune.checkpoint <ckpt>``: the model's
architecture, weights and vocabulary come from the checkpoint; the label set comes from the new training
manifest. Then:

- new labels: the classifier's output layer gets one row per new label; labels the checkpoint knew keep their
  row, the rest of the model is kept as it was;
- new words (captions, scratch text encoder) are appended to the vocabulary; known words keep their embedding;
- ``freeze``: parts whose parameters stay bit-identical (and which run in eval mode);
- ``add_experts`` / ``add_modalities``: the model grows (``multimoe.surgery``) and still computes what the
  checkpoint did; the new experts join the routing over ``grow_in_steps`` steps (``callbacks.GrowIn``);
- ``lora``: LoRA adapters (PEFT, ``multimoe.lora``) on the parts ``lora.targets`` names; the rest is frozen
  but the heads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from torch import nn

import multimoe.lora as lora
from multimoe.config import MODALITY_NAMES, ConfigError, LoraConfig, MoEConfig, config_from_dict
from multimoe.model import MultiMoE
from multimoe.moe.router import Router
from multimoe.surgery import grown_config, transfer, upcycled_config
from multimoe.training.callbacks import GrowIn, KeepFrozen

FREEZABLE = (
    "encoders",
    *MODALITY_NAMES,
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
    the selection bias). ``upcycle``: a dense checkpoint becomes MoE in the blocks ``model.config.moe``
    chooses, every expert a copy of the block's FFN (``multimoe.surgery.upcycled_config``). Without a
    checkpoint ``freeze`` is ignored and growing is refused."""

    checkpoint: str | None = None
    freeze: list[str] = field(default_factory=list)
    add_experts: int = 0
    add_modalities: list[str] = field(default_factory=list)
    upcycle: bool = False
    grow_in_steps: int = 200
    grow_bias_rate: float = 0.001
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = config_from_dict(LoraConfig, self.lora)
        unknown = sorted(set(self.freeze) - set(FREEZABLE))
        if unknown:
            raise ConfigError(
                f"finetune.freeze: unknown part {unknown[0]!r}; allowed: {', '.join(FREEZABLE)}"
            )
        if self.add_experts < 0 or self.grow_in_steps < 1 or self.grow_bias_rate <= 0:
            raise ConfigError("finetune: add_experts must be >= 0, grow_in_steps >= 1 and grow_bias_rate > 0")
        if self.lora.enabled and (self.add_modalities or self.upcycle):
            raise ConfigError(
                "finetune.lora: new modalities and upcycled experts start untrained; fine-tune in full first"
            )
        if self.lora.enabled and self.add_experts and not {"experts", "router"} <= set(self.lora.targets):
            raise ConfigError("finetune.lora: new experts need targets experts and router to train")


def freeze(model: MultiMoE, parts: list[str]) -> list[nn.Module]:
    """Stop training ``parts`` (``FREEZABLE``): no gradients, no routing-bias updates. Returns the modules,
    which ``KeepFrozen`` keeps in eval mode."""
    modules: list[nn.Module] = []
    for part in parts:
        if part == "encoders":
            modules += list(model.encoders.values())
        elif part in MODALITY_NAMES:
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


def prepare(cfg: Any) -> tuple[MultiMoE, FinetuneConfig] | None:
    """Before ``fit`` builds anything (``cfg``: the CLI's parsed namespace): with ``finetune.checkpoint``, the
    model and data configs become the checkpoint's architecture, grown as asked, and the vocabulary starts
    from the checkpoint's. Returns the checkpoint's model and the options for ``apply``."""
    if cfg.get("finetune") is None:
        return None
    finetune = FinetuneConfig(**cfg.finetune.as_dict())
    if not finetune.checkpoint:
        if finetune.add_experts or finetune.add_modalities or finetune.upcycle or finetune.lora.enabled:
            raise ConfigError(
                "finetune: add_experts, add_modalities, upcycle and lora need finetune.checkpoint"
            )
        return None
    base = MultiMoE.from_pretrained(finetune.checkpoint)
    if base.config.lora.enabled:  # its adapters become part of the weights fine-tuned now
        lora.merge(base)
    if finetune.upcycle:
        if finetune.add_experts or finetune.add_modalities:
            raise ConfigError("finetune.upcycle: grow the upcycled model in a later fine-tune")
        values = cfg.model.config.get("init_args", cfg.model.config)
        grown = upcycled_config(base.config, config_from_dict(MoEConfig, values.moe.as_dict()))
    else:
        grown = grown_config(
            base.config, finetune.add_experts, tuple(finetune.add_modalities), finetune.grow_bias_rate
        )
    if finetune.lora.enabled:
        grown = dataclasses.replace(grown, lora=dataclasses.replace(finetune.lora, base=finetune.checkpoint))
    set_model_config(cfg, grown.to_dict(), base.vocab)
    return base, finetune


def set_model_config(cfg: Any, config: dict[str, Any], vocab: list[str] | None) -> None:
    """Make ``config`` (a ``MultiMoEConfig`` as a dict) the model's and the data's, and ``vocab`` the
    vocabulary the data starts from."""
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
    if model.config.lora.enabled:
        frozen += _outside_adapters(model)
    if trainer is not None:
        trainer.callbacks += [KeepFrozen(frozen), GrowIn(new, finetune.grow_in_steps)]  # type: ignore[attr-defined]
    known = len(set(base.labels) & set(model.labels))
    grown = (
        f"upcycled into {len(model.moe_layers())} MoE layers"
        if finetune.upcycle
        else f"{len(new)} new experts"
    )
    if finetune.lora.enabled:
        grown += f", LoRA r={finetune.lora.r} on {', '.join(finetune.lora.targets)}"
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"fine-tuning {finetune.checkpoint}: {len(model.labels)} labels ({known} known), "
        f"{len(model.vocab) - len(base.vocab)} new words, {grown}, "
        f"frozen: {', '.join(finetune.freeze) or 'nothing'}; {trainable:,} of {total:,} parameters train"
    )


def _outside_adapters(model: MultiMoE) -> list[nn.Module]:
    """With LoRA, what runs in eval mode besides ``freeze``'s parts: the encoders without adapters, and the
    batch-norm layers (their statistics are not adapters). Routers outside the targets keep their bias."""
    targets = model.config.lora.targets
    parts = [key for key in model.encoders if key not in targets]
    if "router" not in targets:
        parts.append("router")
    batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return freeze(model, parts) + batch_norms
