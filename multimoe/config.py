"""Typed configuration of a MultiMoE model: one dataclass per component and modality, no torch import.

Every config validates itself in ``__post_init__`` and names the field and the allowed values when it refuses.
``MultiMoEConfig.to_dict`` / ``from_dict`` give the plain-dict form used in YAML files and in saved models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Literal, TypeVar, cast

T = TypeVar("T")


class Modality(IntEnum):
    """The modalities, in the fixed order in which their tokens are concatenated into the trunk sequence."""

    TEXT = 0
    IMAGE = 1
    AUDIO = 2

    @classmethod
    def from_name(cls, name: str) -> Modality:
        return cls[name.upper()]

    @property
    def key(self) -> str:
        return self.name.lower()


MODALITY_NAMES = tuple(
    m.key for m in Modality
)  # ("text", "image", "audio"): the names configs and manifests use


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field."""


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, f"{type(obj).__name__}.{name}", f"must be > 0, got {value!r}")


def _one_of(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _check(
        value in allowed,
        f"{type(obj).__name__}.{name}",
        f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}",
    )


@dataclass
class TextEncoderConfig:
    """Text encoder over transformers.

    ``backbone="scratch"`` builds a small BERT from the sizes below with the project's word-level tokenizer
    (``vocab_size`` is filled in from it); any other value is a transformers model id or local directory
    (BERT, RoBERTa, DistilBERT, MiniLM, ...), loaded with its pretrained weights and its own tokenizer, and
    the sizes below are ignored. ``train_layers``: ``None`` trains every parameter, ``0`` freezes the
    backbone, ``n`` trains only its last ``n`` layers (and what follows them, such as a final norm).
    """

    backbone: str = "scratch"
    vocab_size: int = 0
    hidden_size: int = 128
    num_layers: int = 1
    num_heads: int = 4
    intermediate_size: int = 256
    max_length: int = 32
    train_layers: int | None = None
    dropout: float = 0.1  # scratch backbone: BERT's hidden and attention dropout

    def __post_init__(self) -> None:
        _positive(self, "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_length")
        _check(
            0.0 <= self.dropout < 1.0, "TextEncoderConfig.dropout", f"must be in [0, 1), got {self.dropout}"
        )
        _check(self.vocab_size >= 0, "TextEncoderConfig.vocab_size", "must be >= 0 (set from the tokenizer)")
        _check(
            self.hidden_size % self.num_heads == 0,
            "TextEncoderConfig.hidden_size",
            f"must be divisible by num_heads={self.num_heads}, got {self.hidden_size}",
        )
        _check(
            self.train_layers is None or self.train_layers >= 0,
            "TextEncoderConfig.train_layers",
            f"must be null (train all), 0 (freeze) or a number of last layers, got {self.train_layers}",
        )


INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass
class ImageEncoderConfig:
    """Image encoder over timm: any timm model name; ``timm_kwargs`` override its architecture.

    ``pretrained`` loads the model's weights from the hub, or from ``pretrained_file`` (a local
    ``.safetensors`` or ``.pth`` in timm's layout) when set. ``mean``, ``std`` and ``interpolation`` left
    ``None`` come from the model's own timm data config; images are resized to ``image_size``.

    The default is a slim ResNet-18 (one block per stage, widths 32-128, output stride 8): from scratch it
    learns small digit images far faster than a ViT, and a 32x32 input gives a 4x4 grid of 16 tokens.
    """

    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_file: str | None = None
    image_size: int = 32
    in_chans: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    timm_kwargs: dict[str, Any] = field(
        default_factory=lambda: {"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 128], "output_stride": 8}
    )

    def __post_init__(self) -> None:
        _positive(self, "image_size", "in_chans")
        _check(
            self.pretrained or self.pretrained_file is None,
            "ImageEncoderConfig.pretrained_file",
            "is only read with pretrained: true",
        )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                _check(
                    self.in_chans == 3,
                    f"ImageEncoderConfig.{name}",
                    f"must be set when in_chans={self.in_chans} (a model's data config describes RGB)",
                )
                continue
            setattr(self, name, tuple(value))
            _check(
                len(value) == self.in_chans,
                f"ImageEncoderConfig.{name}",
                f"needs one value per channel (in_chans={self.in_chans}), got {tuple(value)}",
            )
        _check(
            self.interpolation in (None, *INTERPOLATIONS),
            "ImageEncoderConfig.interpolation",
            f"must be null (the model's own) or one of {INTERPOLATIONS}, got {self.interpolation!r}",
        )


@dataclass
class AudioEncoderConfig:
    """Audio encoder.

    ``backbone="scratch"``: a torchaudio log-mel front end (SpecAugment in training only) and a small patch
    transformer sized by the fields below. Any other value is a transformers audio encoder id or local
    directory (wav2vec2, HuBERT, Whisper's encoder, AST, ...) run on its own feature extractor; then only
    ``sample_rate`` (which must match the feature extractor's) and ``max_seconds`` apply.
    """

    backbone: str = "scratch"
    sample_rate: int = 16000
    max_seconds: float = 2.0
    n_mels: int = 40
    win_ms: float = 25.0
    hop_ms: float = 10.0
    patch_frames: int = 4
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    spec_augment: bool = True
    freq_mask: int = 6
    time_mask: int = 8

    def __post_init__(self) -> None:
        _positive(self, "sample_rate", "max_seconds", "n_mels", "win_ms", "hop_ms", "patch_frames")
        _positive(self, "hidden_size", "num_layers", "num_heads")
        _check(self.hop_ms <= self.win_ms, "AudioEncoderConfig.hop_ms", f"must be <= win_ms={self.win_ms}")
        _check(
            self.hidden_size % self.num_heads == 0,
            "AudioEncoderConfig.hidden_size",
            f"must be divisible by num_heads={self.num_heads}, got {self.hidden_size}",
        )


RouterKind = Literal["mixtral", "switch", "expert_choice"]
BalanceGroups = Literal["modality", "batch"]
DispatchKind = Literal["auto", "sorted", "grouped_mm", "reference"]
ExpertActivation = Literal["swiglu", "relu", "gelu"]


@dataclass
class MoEConfig:
    """Sparse MoE FFN layers of the shared trunk (ARCHITECTURE.md section 3; README "The MoE layer").

    Expert pool per MoE layer: ``experts_per_modality`` for each modality, ``cross_modal_experts`` that every
    modality may use (from block ``cross_modal_from_layer`` upward), and ``shared_experts`` that every token
    always uses. ``every=0`` turns MoE off (an all-dense trunk). In a block where a modality may use fewer
    than ``top_k`` experts (below ``cross_modal_from_layer``), it uses all of them.

    ``router``: ``mixtral`` (softmax, top-k, renormalised gates), ``switch`` (top-1, raw probability as gate)
    or ``expert_choice`` (each expert takes its top tokens; ``top_k`` is then the mean experts per token).
    ``router_jitter``: multiplicative noise U(1 -/+ jitter) on the router input in training.
    ``capacity_factor`` (training) and ``eval_capacity_factor`` (evaluation): 0 = dropless; otherwise an
    expert takes at most ``ceil(factor * its even share of the pairs)`` and the overflow passes through the
    residual; ``batch_priority`` lets the tokens with the highest router probability keep their place.
    ``load_balance_coef``: weight of the Switch balance loss, computed per modality over the experts it may
    use (``balance_groups="modality"``) or once over the whole batch and all experts (``"batch"``).
    ``bias_update_rate > 0``: auxiliary-loss-free balancing, a per-modality expert bias for selection only.
    ``dispatch``: ``auto`` picks the fastest kernel for the device: ``grouped_mm`` on CUDA, ``sorted`` on CPU.
    """

    every: int = 2
    experts_per_modality: int = 2
    cross_modal_experts: int = 2
    cross_modal_from_layer: int = 0
    shared_experts: int = 0
    top_k: int = 2
    router: RouterKind = "mixtral"
    router_jitter: float = 0.0
    expert_d_ff: int = 256
    expert_activation: ExpertActivation = "swiglu"
    capacity_factor: float = 0.0
    eval_capacity_factor: float = 0.0
    batch_priority: bool = False
    load_balance_coef: float = 0.01
    balance_groups: BalanceGroups = "modality"
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0
    dispatch: DispatchKind = "auto"

    def __post_init__(self) -> None:
        _check(self.every >= 0, "MoEConfig.every", f"must be >= 0 (0 = no MoE), got {self.every}")
        for name in (
            "experts_per_modality",
            "cross_modal_experts",
            "shared_experts",
            "cross_modal_from_layer",
            "capacity_factor",
            "eval_capacity_factor",
            "load_balance_coef",
            "z_loss_coef",
            "bias_update_rate",
        ):
            _check(getattr(self, name) >= 0, f"MoEConfig.{name}", f"must be >= 0, got {getattr(self, name)}")
        _check(
            self.experts_per_modality + self.cross_modal_experts > 0,
            "MoEConfig.experts_per_modality",
            "a MoE layer needs routed experts: experts_per_modality + cross_modal_experts must be > 0",
        )
        _check(
            self.experts_per_modality > 0 or self.cross_modal_from_layer == 0,
            "MoEConfig.cross_modal_from_layer",
            "must be 0 when experts_per_modality=0 (lower MoE blocks would have no experts at all)",
        )
        _positive(self, "top_k", "expert_d_ff")
        most = self.experts_per_modality + self.cross_modal_experts
        _check(
            self.top_k <= most,
            "MoEConfig.top_k",
            f"is {self.top_k}, but a modality may use at most {most} experts "
            f"(experts_per_modality + cross_modal_experts)",
        )
        _one_of(self, "router", ("mixtral", "switch", "expert_choice"))
        _one_of(self, "balance_groups", ("modality", "batch"))
        _one_of(self, "expert_activation", ("swiglu", "relu", "gelu"))
        _one_of(self, "dispatch", ("auto", "sorted", "grouped_mm", "reference"))
        _check(self.router != "switch" or self.top_k == 1, "MoEConfig.top_k", "the 'switch' router is top-1")
        _check(
            0.0 <= self.router_jitter < 1.0,
            "MoEConfig.router_jitter",
            f"must be in [0, 1), got {self.router_jitter}",
        )
        if self.router == "expert_choice":
            _check(
                self.capacity_factor > 0,
                "MoEConfig.capacity_factor",
                "must be > 0 with router='expert_choice' (each expert takes that many times its share)",
            )
            _check(
                self.bias_update_rate == 0,
                "MoEConfig.bias_update_rate",
                "must be 0 with router='expert_choice', which is balanced by construction",
            )

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def is_moe_block(self, index: int) -> bool:
        """MoE in every ``every``-th block, counting from 1 (every=2: blocks 1, 3, 5, ...)."""
        return self.enabled and (index + 1) % self.every == 0

    def num_cross_experts(self, index: int) -> int:
        return self.cross_modal_experts if index >= self.cross_modal_from_layer else 0


@dataclass
class TrunkConfig:
    """The shared pre-norm transformer; dense blocks use ``d_ff``, MoE blocks use ``MoEConfig``.

    ``activation_checkpointing``: in training, keep only each block's input and recompute the block in the
    backward pass (less memory, ~1/3 more compute). ``compile``: ``torch.compile`` each block (the MoE layer
    compiles without graph breaks; the block's real-token gather has a data-dependent shape)."""

    d_model: int = 128
    depth: int = 4
    num_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _positive(self, "d_model", "depth", "num_heads", "d_ff")
        _check(
            self.d_model % self.num_heads == 0,
            "TrunkConfig.d_model",
            f"must be divisible by num_heads={self.num_heads}, got {self.d_model}",
        )
        _check(0.0 <= self.dropout < 1.0, "TrunkConfig.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ClassifierConfig:
    """A learned query reads the trunk through ``depth`` cross-attention blocks, then a linear layer.
    ``num_classes`` is filled in from the training manifest's labels."""

    enabled: bool = True
    num_classes: int = 0
    depth: int = 2
    d_ff: int = 256

    def __post_init__(self) -> None:
        _check(self.num_classes >= 0, "ClassifierConfig.num_classes", "must be >= 0 (0 = no classifier)")
        _positive(self, "depth", "d_ff")


@dataclass
class CaptionConfig:
    """Causal caption decoder cross-attending to the trunk; ``vocab_size`` is filled in from the tokenizer."""

    enabled: bool = True
    vocab_size: int = 0
    depth: int = 2
    num_heads: int = 4
    d_ff: int = 256
    max_length: int = 24
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(self.vocab_size >= 0, "CaptionConfig.vocab_size", "must be >= 0 (0 = no caption decoder)")
        _positive(self, "depth", "num_heads", "d_ff", "max_length")
        _check(
            0.0 <= self.label_smoothing < 1.0,
            "CaptionConfig.label_smoothing",
            f"must be in [0, 1), got {self.label_smoothing}",
        )


GenerationStrategy = Literal["greedy", "beam", "sample"]


@dataclass
class GenerationConfig:
    """How captions are generated (not part of the architecture; set per command, e.g.
    ``--model.generation.strategy beam``).

    ``greedy`` takes the most likely word; ``beam`` keeps ``num_beams`` hypotheses and ranks finished ones
    by ``sum log p / length ** length_penalty``; ``sample`` draws from the ``temperature``-scaled
    distribution cut to the ``top_k`` words (0 = all) and the smallest set of probability ``top_p``, with
    ``seed`` (``None`` = torch's global generator). ``no_repeat_ngram_size > 0`` forbids repeating any
    n-gram (every strategy).
    ``max_length``: most words generated including the stop token (``None`` = up to ``caption.max_length``
    minus the start token). ``use_cache``: reuse the keys/values of earlier steps (same result, faster).
    """

    strategy: GenerationStrategy = "greedy"
    max_length: int | None = None
    num_beams: int = 4
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        _one_of(self, "strategy", ("greedy", "beam", "sample"))
        _positive(self, "num_beams", "temperature")
        _check(
            self.max_length is None or self.max_length > 0,
            "GenerationConfig.max_length",
            f"must be null (the decoder's limit) or > 0, got {self.max_length}",
        )
        for name in ("no_repeat_ngram_size", "top_k"):
            value = getattr(self, name)
            _check(value >= 0, f"GenerationConfig.{name}", f"must be >= 0, got {value}")
        _check(0.0 < self.top_p <= 1.0, "GenerationConfig.top_p", f"must be in (0, 1], got {self.top_p}")


LORA_TARGETS = ("text", "image", "audio", "attention", "experts", "router")


@dataclass
class LoraConfig:
    """LoRA adapters (PEFT) on parts of a model whose other weights stay frozen; ``r = 0``: none.

    ``targets``: any of ``LORA_TARGETS``. ``text`` / ``image`` / ``audio``: that modality's encoder (its
    linear and convolution layers; ``nn.MultiheadAttention`` stays frozen) and its projector.
    ``attention``: the trunk's attention. ``experts``: the trunk's feed-forward layers, each routed expert
    with its own adapter, the shared experts and the dense FFN of blocks without MoE. ``router``: the
    routers, trained in full (an ``(E, d)`` projection has fewer weights than one adapter pair of rank
    ``E``). The heads train in full. ``alpha``: the adapters' output is scaled by ``alpha / r``. ``base``:
    the checkpoint or saved model the adapters were trained on (``finetune.checkpoint``), which an adapter
    saved alone loads onto."""

    r: int = 0
    alpha: int = 16
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])
    base: str | None = None

    def __post_init__(self) -> None:
        _check(self.r >= 0, "LoraConfig.r", f"must be >= 0 (0 = no adapters), got {self.r}")
        _check(self.alpha > 0, "LoraConfig.alpha", f"must be > 0, got {self.alpha}")
        for name in self.targets:
            _check(
                name in LORA_TARGETS,
                "LoraConfig.targets",
                f"unknown target {name!r}; allowed: {', '.join(LORA_TARGETS)}",
            )
        _check(self.r == 0 or bool(self.targets), "LoraConfig.targets", "needs at least one target")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclass
class MultiMoEConfig:
    """The whole model: which modalities, their encoders, the shared MoE trunk and the heads."""

    modalities: list[str] = field(default_factory=lambda: list(MODALITY_NAMES))
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    image: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    audio: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _check(len(self.modalities) > 0, "MultiMoEConfig.modalities", "needs at least one modality")
        for name in self.modalities:
            _check(
                name in MODALITY_NAMES,
                "MultiMoEConfig.modalities",
                f"unknown modality {name!r}; allowed: {', '.join(MODALITY_NAMES)}",
            )
        _check(
            len(set(self.modalities)) == len(self.modalities),
            "MultiMoEConfig.modalities",
            f"lists a modality twice: {self.modalities}",
        )
        # Keep a fixed order (Modality order), whatever order the user wrote.
        self.modalities = [name for name in MODALITY_NAMES if name in self.modalities]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MultiMoEConfig:
        parts = {
            "text": TextEncoderConfig,
            "image": ImageEncoderConfig,
            "audio": AudioEncoderConfig,
            "trunk": TrunkConfig,
            "moe": MoEConfig,
            "classifier": ClassifierConfig,
            "caption": CaptionConfig,
            "lora": LoraConfig,
        }
        unknown = set(data) - set(parts) - {"modalities"}
        _check(not unknown, "MultiMoEConfig", f"unknown fields {sorted(unknown)}")
        kwargs: dict[str, Any] = {
            name: config_from_dict(parts[name], value) for name, value in data.items() if name in parts
        }
        if "modalities" in data:
            kwargs["modalities"] = list(data["modalities"])
        return cls(**kwargs)


def config_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    """One sub-config from its plain-dict form, refusing unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cast(Any, cls))}
    unknown = set(values) - names
    _check(not unknown, cls.__name__, f"unknown fields {sorted(unknown)}; allowed: {sorted(names)}")
    return cls(**values)
