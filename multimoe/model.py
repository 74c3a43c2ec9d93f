"""MultiMoE: modality encoders -> projectors -> shared MoE trunk -> heads; ``build_model`` is the one root
that knows the concrete classes."""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import multimoe.lora as lora
from multimoe.config import GenerationConfig, MultiMoEConfig
from multimoe.encoders import AudioEncoder, ImageEncoder, Projector, TextEncoder
from multimoe.heads import CaptionDecoder, ClassificationHead
from multimoe.modality import Modality, ModalityTokens, MultiModalInputs
from multimoe.moe.experts import Experts
from multimoe.moe.layer import MoELayer, RouterStats, modality_expert_mask
from multimoe.moe.router import Router
from multimoe.pretrained import CheckpointError, Pretrained, read_checkpoint, saved_form
from multimoe.surgery import sliced_config, transfer
from multimoe.tokenizer import WordTokenizer
from multimoe.trunk import MLP, Block, SharedTransformer

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"  # LoRA adapters saved alone


@dataclass
class MultiMoEOutput:
    class_logits: torch.Tensor | None  # (B, num_classes)
    caption_logits: torch.Tensor | None  # (B, L, vocab), teacher-forced
    encoded: ModalityTokens  # the trunk's input: projected encoder tokens (B, N, d), mask, modality ids
    trunk: ModalityTokens  # trunk output tokens (B, N, d) with mask and modality ids
    router_stats: list[RouterStats]  # one per MoE block, bottom to top
    aux_loss: torch.Tensor  # sum over MoE blocks of the weighted load-balancing and z-losses


class MultiMoE(nn.Module, Pretrained):
    """The model; ``labels`` name the classifier's classes and ``vocab`` is the caption decoder's (and the
    scratch text encoder's) word vocabulary: ``save_pretrained`` keeps them with the config."""

    def __init__(
        self,
        config: MultiMoEConfig,
        encoders: dict[Modality, TextEncoder | ImageEncoder | AudioEncoder],
        projectors: dict[Modality, Projector],
        trunk: SharedTransformer,
        classifier: ClassificationHead | None,
        captioner: CaptionDecoder | None,
        labels: list[str] | None = None,
        vocab: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.labels = list(labels or [])
        self.vocab = list(vocab or [])
        self.modalities = sorted(encoders)
        self.encoders = nn.ModuleDict({m.key: encoders[m] for m in self.modalities})
        self.projectors = nn.ModuleDict({m.key: projectors[m] for m in self.modalities})
        self.trunk = trunk
        self.classifier = classifier
        self.captioner = captioner

    def encode(self, inputs: MultiModalInputs) -> ModalityTokens:
        """Encode each present modality and lay its tokens out for the whole batch, in Modality order."""
        b, d = inputs.batch_size, self.config.trunk.d_model
        parts = []
        for m in self.modalities:
            if m not in inputs.parts:
                continue
            part = inputs.parts[m]
            tokens, mask = self.encoders[m.key](**part.tensors)  # (B_m, N_m, D_m), (B_m, N_m)
            tokens = self.projectors[m.key](tokens)  # (B_m, N_m, d)
            full = tokens.new_zeros(b, tokens.shape[1], d)
            full[part.rows] = tokens  # (B, N_m, d)
            full_mask = mask.new_zeros(b, mask.shape[1])
            full_mask[part.rows] = mask  # (B, N_m); rows without modality m stay all-False
            ids = torch.full_like(full_mask, int(m), dtype=torch.long)
            parts.append(ModalityTokens(full, full_mask, ids))
        if not parts:
            raise ValueError(
                f"the batch holds none of this model's modalities {[m.key for m in self.modalities]}"
            )
        return ModalityTokens.concat(parts)

    def forward(self, inputs: MultiModalInputs, caption_ids: torch.Tensor | None = None) -> MultiMoEOutput:
        x = self.encode(inputs)  # tokens (B, N, d), mask (B, N), modality_ids (B, N)
        h, router_stats = self.trunk(x.tokens, x.mask, x.modality_ids)  # (B, N, d)
        class_logits = None if self.classifier is None else self.classifier(h, x.mask)  # (B, C)
        caption_logits = None
        if self.captioner is not None and caption_ids is not None:
            caption_logits = self.captioner(caption_ids, h, x.mask)  # (B, L, V)
        return MultiMoEOutput(
            class_logits=class_logits,
            caption_logits=caption_logits,
            encoded=x,
            trunk=ModalityTokens(h, x.mask, x.modality_ids),
            router_stats=router_stats,
            aux_loss=self.aux_loss(router_stats, h),
        )

    def moe_layers(self) -> list[MoELayer]:
        """The trunk's MoE layers, bottom to top (the order of ``MultiMoEOutput.router_stats``)."""
        return [block.ffn for block in self.trunk.blocks if isinstance(block.ffn, MoELayer)]

    def shard_experts(self, group: Any = None) -> None:
        """Expert parallelism: every MoE layer keeps only this rank's share of its experts
        (``MoELayer.shard_experts``); the ranks of ``group`` (default: all) then run every forward together,
        each on its own samples."""
        for layer in self.moe_layers():
            layer.shard_experts(group)

    @torch.no_grad()
    def update_routing_bias(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Auxiliary-loss-free balancing: one bias step per MoE layer from its
        ``RouterStats.tokens_per_expert`` (no-op unless ``moe.bias_update_rate > 0``). Call it after the
        optimizer step."""
        for layer, counts in zip(self.moe_layers(), tokens_per_expert, strict=True):
            layer.router.update_bias(counts)

    def aux_loss(self, router_stats: list[RouterStats], like: torch.Tensor) -> torch.Tensor:
        moe = self.config.moe
        total = like.new_zeros((), dtype=torch.float32)
        for stats in router_stats:
            total = total + moe.load_balance_coef * stats.load_balance_loss + moe.z_loss_coef * stats.z_loss
        return total

    @property
    def words(self) -> WordTokenizer | None:
        """The word tokenizer of ``vocab`` (the caption decoder's and the scratch text encoder's), if any."""
        return WordTokenizer(self.vocab) if self.vocab else None

    @torch.no_grad()
    def generate(self, inputs: MultiModalInputs, config: GenerationConfig | None = None) -> list[str]:
        """One caption per sample (greedy unless ``config`` says otherwise)."""
        x = self.encode(inputs)
        h, _ = self.trunk(x.tokens, x.mask, x.modality_ids)
        return self._captions(h, x.mask, config)

    @torch.no_grad()
    def predict(
        self, inputs: MultiModalInputs, config: GenerationConfig | None = None
    ) -> list[dict[str, Any]]:
        """Per sample, as the model has the heads: ``label`` with its ``probability``, and ``caption``."""
        x = self.encode(inputs)  # tokens (B, N, d), mask (B, N)
        h, _ = self.trunk(x.tokens, x.mask, x.modality_ids)  # (B, N, d)
        rows: list[dict[str, Any]] = [{} for _ in range(inputs.batch_size)]
        if self.classifier is not None:
            prob, index = self.classifier(h, x.mask).float().softmax(dim=-1).max(dim=-1)  # (B,), (B,)
            for row, p, k in zip(rows, prob.tolist(), index.tolist(), strict=True):
                row |= {"label": self.labels[k], "probability": round(p, 6)}
        if self.captioner is not None:
            for row, caption in zip(rows, self._captions(h, x.mask, config), strict=True):
                row["caption"] = caption
        return rows

    def _captions(self, h: torch.Tensor, mask: torch.Tensor, config: GenerationConfig | None) -> list[str]:
        words = self.words
        if self.captioner is None or words is None:
            raise ValueError("this model has no caption decoder (caption.vocab_size = 0)")
        ids = self.captioner.generate(h, mask, words.bos_id, words.eos_id, config)  # (B, L)
        return [words.decode(seq) for seq in ids.tolist()]

    # ---- loading and saving (multimoe.pretrained) --------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any
    ) -> MultiMoE:
        """A saved model folder, a hub id, a ``train.py`` checkpoint file (``.ckpt``, see
        ``from_checkpoint``) or a folder of LoRA adapters saved alone (``save_adapter``; ``base=`` overrides
        the base model it names): the one door through which tools and fine-tuning load a model."""
        path = Path(pretrained_model_name_or_path)
        base = kwargs.pop("base", None)
        if path.suffix == ".ckpt" or path.is_file():
            return cls.from_checkpoint(path)
        if (path / ADAPTER_CONFIG).is_file():
            return cls.from_adapter(path, base)
        return cast(MultiMoE, super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> MultiMoE:
        """The model of a ``train.py`` checkpoint, with its labels and vocabulary, read without Lightning and
        without unpickling code (``multimoe.pretrained.read_checkpoint``)."""
        saved, state = saved_form(read_checkpoint(path), path)
        try:
            model = build_model(MultiMoEConfig.from_dict(saved["config"]), saved["labels"], saved["vocab"])
            model.load_state_dict(state)
        except (ValueError, RuntimeError, TypeError) as error:  # a config or weights this code cannot take
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise CheckpointError(f"{path}: does not load: {lines[-1] if lines else error}") from None
        return model

    def saved_config(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "labels": self.labels, "vocab": self.vocab}

    def save_adapter(self, folder: str | Path, base: str | Path | None = None) -> Path:
        """Write what a LoRA fine-tune added to its base to ``folder`` (a few MB): ``adapter.json`` (config,
        labels, vocabulary) and ``adapter.safetensors``. That is the adapters, and every other weight or
        buffer that differs from what ``surgery.transfer`` from the base gives (the heads, new label rows, a
        grown model's routing bias). ``base``: the model it was fine-tuned from (default: the one
        ``config.lora.base`` names)."""
        if not self.config.lora.enabled:
            raise ValueError("the model has no LoRA adapters to save (config.lora.r = 0)")
        start = _on_base(self.config, self.labels, self.vocab, base).state_dict()
        weights = {
            name: value.detach().contiguous()
            for name, value in self.state_dict().items()
            if lora.is_adapter_weight(name) or not torch.equal(value, start[name])
        }
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(weights, folder / ADAPTER_WEIGHTS)
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.saved_config(), indent=2) + "\n")
        return folder

    @classmethod
    def from_adapter(cls, folder: str | Path, base: str | Path | None = None) -> MultiMoE:
        """The fine-tuned model of an adapter folder (``save_adapter``), built on ``base`` (default: the
        checkpoint or saved model its config names), adapters unmerged."""
        folder = Path(folder)
        saved = json.loads((folder / ADAPTER_CONFIG).read_text())
        config = MultiMoEConfig.from_dict(saved["config"])
        model = _on_base(config, saved.get("labels"), saved.get("vocab"), base)
        weights = load_file(folder / ADAPTER_WEIGHTS)
        unknown = sorted(set(weights) - set(model.state_dict()))
        if unknown:
            where = folder / ADAPTER_WEIGHTS
            raise ValueError(f"{where}: weight {unknown[0]!r} is not in the model its config builds")
        model.load_state_dict(weights, strict=False)
        return model

    def sliced(self, modalities: list[str], classify: bool = True, caption: bool = True) -> MultiMoE:
        """A new model that keeps only what inputs of ``modalities`` reach, and the heads asked for
        (``surgery.sliced_config``): on such inputs it computes what this model does. Adapters are merged."""
        source = self
        if self.config.lora.enabled:
            source = copy.deepcopy(self)
            lora.merge(source)
        config = sliced_config(source.config, modalities, classify, caption)
        model = build_model(config, source.labels if config.classifier.num_classes else [], source.vocab)
        transfer(source, model)
        return model.train(self.training)

    @classmethod
    def from_saved(cls, saved: dict[str, Any], backbone_files: Path) -> MultiMoE:
        config = MultiMoEConfig.from_dict(saved["config"])
        return build_model(config, saved.get("labels"), saved.get("vocab"), saved=backbone_files)

    def save_backbone_files(self, folder: Path) -> None:
        for key, encoder in self.encoders.items():
            cast(Pretrained, encoder).save_backbone_files(folder / key)


def _on_base(
    config: MultiMoEConfig, labels: list[str] | None, vocab: list[str] | None, base: str | Path | None
) -> MultiMoE:
    """A model of ``config`` (with LoRA adapters at their start) carrying the weights of its base model:
    ``base``, or the checkpoint or saved model ``config.lora.base`` names."""
    source = base or config.lora.base
    if not source:
        raise ValueError("the adapters name no base model; pass base= (the checkpoint they were trained on)")
    if not Path(source).exists() and Path(source).suffix == ".ckpt":
        raise FileNotFoundError(f"base model of the adapters not found: {source} (pass base=...)")
    start = MultiMoE.from_pretrained(source)
    if start.config.lora.enabled:  # fine-tuned from a LoRA model: its adapters are part of the base
        lora.merge(start)
    model = build_model(config, labels, vocab)
    transfer(start, model)
    return model


def build_model(
    config: MultiMoEConfig,
    labels: list[str] | None = None,
    vocab: list[str] | None = None,
    saved: Path | None = None,
) -> MultiMoE:
    """The composition root: the only place that maps configs to concrete modules.

    ``saved``: the backbone files of a saved model (``MultiMoE.from_pretrained`` passes them); the encoders
    rebuild their architecture from them and download nothing."""
    d = config.trunk.d_model
    modalities = [Modality.from_name(name) for name in config.modalities]
    encoders: dict[Modality, TextEncoder | ImageEncoder | AudioEncoder] = {}
    for m in modalities:
        files = None if saved is None else saved / m.key
        if m is Modality.TEXT:
            encoders[m] = TextEncoder(config.text, saved=files)
        elif m is Modality.IMAGE:
            encoders[m] = ImageEncoder(config.image, saved=files)
        else:
            encoders[m] = AudioEncoder(config.audio, saved=files)
    projectors = {m: Projector(encoders[m].out_dim, d) for m in modalities}
    blocks = [
        Block(d, config.trunk.num_heads, _ffn(config, i, modalities), config.trunk.dropout)
        for i in range(config.trunk.depth)
    ]
    trunk = SharedTransformer(blocks, d, config.trunk.activation_checkpointing, config.trunk.compile)
    classifier = None
    if config.classifier.num_classes > 0:
        head = config.classifier
        classifier = ClassificationHead(d, head.num_classes, head.depth, config.trunk.num_heads, head.d_ff)
    captioner = None
    if config.caption.vocab_size > 0:
        c = config.caption
        captioner = CaptionDecoder(c.vocab_size, d, c.depth, c.num_heads, c.d_ff, c.max_length)
    model = MultiMoE(config, encoders, projectors, trunk, classifier, captioner, labels, vocab)
    if config.lora.enabled:
        lora.attach(model, config.lora)
    return model


def _ffn(config: MultiMoEConfig, index: int, modalities: list[Modality]) -> MLP | MoELayer:
    moe, d = config.moe, config.trunk.d_model
    if not moe.is_moe_block(index):
        return MLP(d, config.trunk.d_ff)
    allowed = modality_expert_mask(
        [int(m) for m in modalities], len(Modality), moe.experts_per_modality, moe.num_cross_experts(index)
    )
    shared = MLP(d, moe.expert_d_ff * moe.shared_experts) if moe.shared_experts > 0 else None
    top_k = min(moe.top_k, moe.experts_per_modality + moe.num_cross_experts(index))
    if top_k < moe.top_k:
        warnings.warn(
            f"MoE block {index} (below moe.cross_modal_from_layer={moe.cross_modal_from_layer}): a modality "
            f"may use {top_k} experts there, fewer than top_k={moe.top_k}, so its tokens use all {top_k}",
            stacklevel=3,
        )
    router = Router(
        d,
        allowed,
        top_k,
        moe.router,
        jitter=moe.router_jitter,
        batch_priority=moe.batch_priority,
        bias_rate=moe.bias_update_rate,
    )
    experts = Experts(allowed.shape[1], d, moe.expert_d_ff, moe.expert_activation)
    capacities = (moe.capacity_factor, moe.eval_capacity_factor)
    return MoELayer(router, experts, shared, moe.dispatch, *capacities, balance_groups=moe.balance_groups)
