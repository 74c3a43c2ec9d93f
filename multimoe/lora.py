"""LoRA adapters on a MultiMoE with PEFT: what each target names, attaching adapters, and folding them in.

A router's projection ``(E, d)`` has fewer weights than one adapter pair of rank ``r >= E`` on it, so the
``router`` target trains the routers in full.

``attach`` injects PEFT's LoRA layers (``peft.inject_adapter_in_model``) into the modules a
``LoraConfig``'s targets name, and freezes everything else except the heads. Routed experts are stacked
``nn.Parameter`` tensors ``(E, out, in)``, which PEFT adapts through ``target_parameters``: one rank-``r``
pair per expert (``lora_A (E*r, in)``, ``lora_B (out, E*r)``), applied as a parametrization while
``Experts.forward`` runs. ``merge`` folds every adapter into its weights and leaves plain modules.
PEFT (and the transformers it imports) loads only when a model has adapters.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import nn

from multimoe.config import LoraConfig
from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer
from multimoe.trunk import MLP

if TYPE_CHECKING:
    from multimoe.model import MultiMoE

ADAPTED = (nn.Linear, nn.Conv1d, nn.Conv2d)  # module kinds LoRA reaches in encoders


def targets(model: MultiMoE, config: LoraConfig) -> tuple[list[str], list[str]]:
    """``(module names, parameter names)`` the adapters of ``config.targets`` go on."""
    modules: list[str] = []
    parameters: list[str] = []
    for key in model.encoders:
        if key in config.targets:
            modules += [*_encoder_layers(model.encoders[key], f"encoders.{key}"), f"projectors.{key}.proj"]
    for i, block in enumerate(model.trunk.blocks):
        prefix = f"trunk.blocks.{i}"
        if "attention" in config.targets:
            modules += [f"{prefix}.attn.{name}" for name in ("q", "kv", "out")]
        ffn = block.ffn
        if "experts" in config.targets:
            if isinstance(ffn, MLP):
                modules += [f"{prefix}.ffn.gate_up", f"{prefix}.ffn.down"]
            elif isinstance(ffn, MoELayer):
                experts = ffn.experts
                assert isinstance(experts, Experts)
                parameters += [f"{prefix}.ffn.experts.{experts.w_in_name}", f"{prefix}.ffn.experts.down_proj"]
                if ffn.shared is not None:
                    modules += [f"{prefix}.ffn.shared.gate_up", f"{prefix}.ffn.shared.down"]
    return modules, parameters


def _encoder_layers(encoder: nn.Module, prefix: str) -> list[str]:
    """An encoder's linear and convolution layers that PEFT adapts exactly: not those inside
    ``nn.MultiheadAttention`` (PyTorch reads its weights inside ``F.multi_head_attention_forward``, past
    any wrapper, and PEFT's own attention wrapper adds its update into the frozen weights and takes it out
    again on every call, which leaves them not bit-identical), and not grouped convolutions (PEFT cannot
    merge those)."""
    attention = [name for name, m in encoder.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [
        f"{prefix}.{name}"
        for name, module in encoder.named_modules()
        if isinstance(module, ADAPTED)
        and not any(name.startswith(a + ".") for a in attention)
        and not (isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups > 1)
    ]


def unwrapped(module: nn.Module) -> nn.Module:
    """The module a PEFT layer wraps (``module`` itself if it is none)."""
    if not _is_peft_layer(module):
        return module
    base: nn.Module = module.get_base_layer()  # type: ignore[operator]
    return base


def _is_peft_layer(module: nn.Module) -> bool:
    """A PEFT tuner layer (without importing PEFT for a model that has none)."""
    return type(module).__module__.startswith("peft.")


def attach(model: MultiMoE, config: LoraConfig) -> None:
    """LoRA adapters (B = 0: the model computes what it did) on ``config.targets``; only they and the heads
    train. PyTorch's fused encoder-layer inference reads attention and FFN weights directly, past PEFT's
    wrappers, so encoder layers with adapters run the plain path."""
    import peft

    modules, parameters = targets(model, config)
    model.requires_grad_(False)
    if modules or parameters:  # the router alone has no adapters
        lora = peft.LoraConfig(
            r=config.r,
            lora_alpha=config.alpha,
            target_modules=modules,
            target_parameters=parameters,
            lora_dropout=0.0,
        )
        peft.inject_adapter_in_model(lora, model)  # the adapter weights train
    for conv in model.modules():  # PEFT's down-projection copies kernel, stride and padding, not dilation
        if isinstance(conv, peft.tuners.lora.layer._ConvNd):
            for down in conv.lora_A.values():
                down.dilation = conv.get_base_layer().dilation
    for head in (model.classifier, model.captioner):
        if head is not None:
            head.requires_grad_(True)
    if "router" in config.targets:  # (E, d): fewer weights than one adapter pair of rank >= E
        for moe in model.moe_layers():
            moe.router.requires_grad_(True)
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and any(_is_peft_layer(m) for m in layer.modules()):
            layer.activation_relu_or_gelu = 0  # not the fused fast path (it would skip the adapters)


def merge(model: MultiMoE) -> None:
    """Fold every adapter into the weight it adapts and put the plain module back (in place); the model's
    config then says it has no adapters."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = {name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    outermost = [n for n in tuned if not any(n.startswith(t + ".") for t in tuned)]
    for name in outermost:
        layer = model.get_submodule(name)
        assert isinstance(layer, BaseTunerLayer)
        if isinstance(layer, ParamWrapper):  # nested, one per stacked expert weight
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, plain)
    for layer in model.modules():
        if isinstance(layer, nn.TransformerEncoderLayer):  # as its __init__ sets it
            act = layer.activation
            relu = act is F.relu or isinstance(act, nn.ReLU)
            gelu = act is F.gelu or isinstance(act, nn.GELU)
            layer.activation_relu_or_gelu = 1 if relu else 2 if gelu else 0
    model.__dict__.pop("peft_config", None)
    model.config = dataclasses.replace(model.config, lora=LoraConfig())


def is_adapter_weight(name: str) -> bool:
    """A state-dict key of an adapter weight."""
    return not {"lora_A", "lora_B"}.isdisjoint(name.split("."))
