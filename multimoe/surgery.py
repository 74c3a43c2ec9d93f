"""Weight surgery on a trained ``MultiMoE``: grow it by experts or by a modality, turn a dense model into
an MoE one (sparse upcycling), or slice it down to some modalities and heads, while it computes exactly what
it computed before.

``upcycled_config`` makes a dense model's chosen blocks MoE blocks of top-1 experts as wide as its dense FFN;
``transfer`` then starts every expert as a copy of that block's FFN (Komatsuzaki et al., 2023), so the
upcycled model computes the dense one's function at the same compute per token, with more parameters to
train.

``grown_config`` gives the architecture with the added modalities and experts; ``transfer`` copies a trained
model's weights into a model of that architecture (maybe with more labels or words too). Each new expert is a
copy of one of its modality's experts (a new modality's, of a cross-modal one), router row included, and
starts with a selection bias low enough that no token can pick it, bound from the router weights and the
layer norm before the layer. Training raises that bias to its modality's level
(``multimoe.training.callbacks.GrowIn``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

import multimoe.lora as lora
from multimoe.config import ConfigError, Modality, MoEConfig, MultiMoEConfig
from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer
from multimoe.moe.router import Router
from multimoe.trunk import MLP

if TYPE_CHECKING:  # the model saves and loads LoRA adapters with ``transfer``
    from multimoe.model import MultiMoE


def grown_config(
    base: MultiMoEConfig, add_experts: int = 0, add_modalities: tuple[str, ...] = (), bias_rate: float = 0.001
) -> MultiMoEConfig:
    """``base`` with ``add_experts`` more experts per modality and the ``add_modalities``; a grown model
    needs the selection bias, so ``moe.bias_update_rate`` becomes ``bias_rate`` if it was 0."""
    known = sorted(set(add_modalities) & set(base.modalities))
    if known:
        raise ConfigError(f"finetune.add_modalities: the checkpoint already reads {known[0]!r}")
    moe = base.moe
    if add_experts or add_modalities:
        if moe.router != "mixtral" or not moe.enabled:
            raise ConfigError("finetune: growing needs MoE layers with moe.router='mixtral'")
        moe = dataclasses.replace(
            moe,
            experts_per_modality=moe.experts_per_modality + add_experts,
            bias_update_rate=moe.bias_update_rate or bias_rate,
        )
    return dataclasses.replace(base, modalities=[*base.modalities, *add_modalities], moe=moe)


def upcycled_config(dense: MultiMoEConfig, moe: MoEConfig) -> MultiMoEConfig:
    """A dense model's architecture with the MoE blocks, expert pool and balancing of ``moe``, whose experts
    are SwiGLU FFNs as wide as the dense one, routed top-1 with Mixtral's renormalised gate (which is then 1)
    and dropless: at the start each token runs exactly the FFN it ran before."""
    if dense.moe.enabled:
        raise ConfigError(
            "finetune.upcycle: the checkpoint already has MoE layers (grow it with add_experts)"
        )
    if not moe.enabled:
        raise ConfigError("finetune.upcycle: set model.config.moe.every to choose the blocks that become MoE")
    upcycled = dataclasses.replace(
        moe,
        top_k=1,
        router="mixtral",
        expert_d_ff=dense.trunk.d_ff,
        expert_activation="swiglu",
        shared_experts=0,
        capacity_factor=0.0,
        eval_capacity_factor=0.0,
    )
    return dataclasses.replace(dense, moe=upcycled)


def sliced_config(
    config: MultiMoEConfig, modalities: list[str], classify: bool = True, caption: bool = True
) -> MultiMoEConfig:
    """``config`` reading only ``modalities``, with the classifier and the caption decoder only where asked:
    ``transfer`` into it keeps those encoders and projectors, their modality experts with the cross-modal
    and shared ones, and the router rows those experts need. A token's router only ever sees its modality's
    experts and the cross-modal ones, so on inputs of those modalities the slice computes what the whole
    model does."""
    unknown = sorted(set(modalities) - set(config.modalities)) or ([] if modalities else ["nothing"])
    if unknown:
        reads = ", ".join(config.modalities)
        raise ConfigError(f"slice: the model reads {reads}; it cannot keep {unknown[0]!r}")
    classify, caption = (
        classify and config.classifier.num_classes > 0,
        caption and config.caption.vocab_size > 0,
    )
    if not (classify or caption):
        raise ConfigError("slice: none of the heads asked for is in the model")
    no_classifier = dataclasses.replace(config.classifier, enabled=False, num_classes=0)
    return dataclasses.replace(
        config,
        modalities=list(modalities),
        classifier=config.classifier if classify else no_classifier,
        caption=config.caption if caption else dataclasses.replace(config.caption, vocab_size=0),
    )


@dataclass
class NewExpert:
    """An expert added by growing: its router, modality row and expert index, and its start bias."""

    router: Router
    modality: int
    expert: int
    start: float


def transfer(base: MultiMoE, model: MultiMoE) -> list[NewExpert]:
    """Copy the base model's weights into ``model`` (same trunk depth and widths; maybe more labels, words,
    modalities or experts, see the module docstring; maybe LoRA adapters, which keep their start). Returns
    the new experts, for ``GrowIn``."""
    target = model.state_dict()
    source = base.state_dict()
    moe_prefixes = [name for name, module in model.named_modules() if isinstance(module, MoELayer)]
    for name, value in target.items():
        if any(name.startswith(p + ".") for p in moe_prefixes) and (
            ".router." in name or ".experts." in name
        ):
            continue  # below, expert by expert
        old = source.get(name.replace(".base_layer", ""))  # a LoRA-wrapped layer's own weights
        if old is None:
            continue  # a new modality's encoder and projector, LoRA adapters: fresh
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
        assert isinstance(layer, MoELayer)
        if isinstance(old_layer, MLP):  # upcycling: every expert starts as the dense FFN
            experts = lora.unwrapped(layer.experts)
            assert isinstance(experts, Experts)
            with torch.no_grad():
                experts.w_in.copy_(old_layer.gate_up.weight.expand_as(experts.w_in))
                experts.down_proj.copy_(old_layer.down.weight.expand_as(experts.down_proj))
            continue
        assert isinstance(old_layer, MoELayer)
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
    experts = lora.unwrapped(layer.experts)  # its own weights, under any LoRA adapters
    assert isinstance(experts, Experts)
    cross = experts.num_experts - len(model.modalities) * epm
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
        sources[experts.num_experts - cross + c] = (old.experts.num_experts - cross + c, False)
    for e, (src, _) in sources.items():
        experts.w_in[e] = old.experts.w_in[src]
        experts.down_proj[e] = old.experts.down_proj[src]
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
