"""Portable graphs: a model exported to ONNX with ``torch.onnx.export`` (dynamo), run with onnxruntime.

``export_onnx(model, folder)`` writes
- ``model.onnx``: the encoders' inputs (``text.input_ids``, ``text.attention_mask``, ``image.pixels``,
  ``audio.waveform``, ``audio.lengths``, as the model has those modalities) to ``class_logits``, and to the
  trunk's output ``memory`` with its ``memory_mask`` when the model captions. Batch, text length and audio
  length are dynamic. ``{modality}.present (B,)`` says which samples have that modality; the others get
  stand-in inputs that the graph masks out (``graph_inputs``). A device that never sees a modality is
  better served by a graph of the sliced model (``MultiMoE.sliced``), which does not run its encoder.
- ``decoder_step.onnx``: ``ids (B, L)``, ``memory``, ``memory_mask`` to the next word's logits ``(B, vocab)``.
  It reruns the prefix: the graph keeps no key/value cache.
- ``config.json``: config, labels and vocabulary, so the data pipeline of ``multimoe.data`` prepares inputs.

``OnnxModel(folder)`` runs them, with every search strategy of ``multimoe.heads.generation``.

The graph computes what the model computes, with static shapes. Eager mode runs each MoE layer on the real
tokens only, and each expert on the tokens routed to it. That needs data-dependent sizes, which ONNX
graphs from ``torch.export`` do not carry through. The graph instead runs the FFNs on every position, padding
included, and multiplies padding's update by 0. Each token runs all the experts its modality may use, and
the gates of the ones it did not choose are 0. The routing decisions are the model's own. That costs
``allowed experts / top_k`` times the experts' arithmetic (2x for the default config).

Not exported: expert-choice routing and an evaluation capacity (``moe.eval_capacity_factor > 0``), where a
token's experts depend on the other tokens of the batch; audio encoders from transformers, whose feature
extractor prepares each clip in numpy; and int8 weights (``multimoe.quantize``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

import multimoe.lora as lora
from multimoe.config import GenerationConfig, MultiMoEConfig
from multimoe.encoders import TextEncoder
from multimoe.heads.generation import search
from multimoe.modality import Modality, MultiModalInputs
from multimoe.model import MultiMoE
from multimoe.moe.kernels import activate
from multimoe.moe.layer import MoELayer
from multimoe.tokenizer import WordTokenizer
from multimoe.trunk import Block

MODEL_GRAPH, DECODER_GRAPH, CONFIG = "model.onnx", "decoder_step.onnx", "config.json"
ENCODER_INPUTS = {  # each encoder's forward arguments, in order
    Modality.TEXT: ("input_ids", "attention_mask"),
    Modality.IMAGE: ("pixels",),
    Modality.AUDIO: ("waveform", "lengths"),
}


def input_names(modalities: list[Modality]) -> list[str]:
    return [f"{m.key}.{name}" for m in modalities for name in (*ENCODER_INPUTS[m], "present")]


def graph_inputs(config: MultiMoEConfig, inputs: MultiModalInputs) -> dict[str, torch.Tensor]:
    """The named graph inputs of a batch: per modality its encoder inputs for all ``B`` samples and
    ``present (B,)``. Samples without the modality get stand-in inputs (silence, a blank image, one padding
    word) that ``present`` masks out of the trunk, as eager mode leaves them out."""
    b, named = inputs.batch_size, dict[str, torch.Tensor]()
    for m in sorted(Modality.from_name(key) for key in config.modalities):
        part = inputs.parts.get(m)
        present = torch.zeros(b, dtype=torch.bool)
        if part is None:
            tensors = _stand_in(config, m, b)
        else:
            present[part.rows] = True
            tensors = _stand_in(config, m, b, part.tensors[ENCODER_INPUTS[m][0]].shape[1:])
            for name, full in tensors.items():
                full[part.rows] = part.tensors[name]
        named |= {f"{m.key}.{n}": tensors[n] for n in ENCODER_INPUTS[m]} | {f"{m.key}.present": present}
    return named


def _stand_in(
    config: MultiMoEConfig, modality: Modality, batch: int, shape: torch.Size | None = None
) -> dict[str, torch.Tensor]:
    """Inputs for samples without ``modality`` (``shape``: of one sample's first input, as the batch's
    other samples have it): finite through the encoder, and masked out after it."""
    if modality == Modality.TEXT:
        length = 1 if shape is None else shape[0]
        mask = torch.zeros(batch, length, dtype=torch.long)
        mask[:, 0] = 1  # one real (padding) word: a row with no key at all would attend to nothing
        return {"input_ids": torch.zeros(batch, length, dtype=torch.long), "attention_mask": mask}
    if modality == Modality.IMAGE:
        size = config.image.image_size
        return {"pixels": torch.zeros(batch, *(shape or (config.image.in_chans, size, size)))}
    samples = config.audio.sample_rate // 10 if shape is None else shape[0]
    return {"waveform": torch.zeros(batch, samples), "lengths": torch.full((batch,), samples)}


class StaticModel(nn.Module):
    """``forward(*graph inputs in input_names order) -> (class_logits?, memory?, memory_mask?)``: the model
    with static shapes (see the module docstring)."""

    def __init__(self, model: MultiMoE) -> None:
        super().__init__()
        if Modality.AUDIO in model.modalities and model.config.audio.backbone != "scratch":
            raise ValueError(
                f"audio backbone {model.config.audio.backbone!r} does not export: its transformers feature "
                "extractor prepares each clip in numpy, outside what a graph can hold"
            )
        for layer in model.moe_layers():
            if layer.router.kind == "expert_choice" or layer.eval_capacity_factor > 0:
                raise ValueError(
                    "expert-choice routing and moe.eval_capacity_factor > 0 do not export: a token's "
                    "experts there depend on the other tokens of the batch"
                )
        self.model = model
        self.caption = model.captioner is not None
        # experts each modality's tokens may use, per MoE layer (python ints: constants of the graph)
        self.allowed = {
            id(layer): {m: layer.router.allowed[int(m)].nonzero()[:, 0].tolist() for m in model.modalities}
            for layer in model.moe_layers()
        }

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model, args = self.model, iter(tensors)
        parts, masks, lengths = [], [], []
        for m in model.modalities:
            tokens, mask = model.encoders[m.key](*(next(args) for _ in ENCODER_INPUTS[m]))
            present = next(args)  # (B,): samples that have modality m
            parts.append(model.projectors[m.key](tokens))  # (B, N_m, d)
            masks.append(mask & present[:, None])
            lengths.append(tokens.shape[1])
        h, mask = torch.cat(parts, dim=1), torch.cat(masks, dim=1)  # (B, N, d), (B, N)
        for block in cast(list[Block], list(model.trunk.blocks)):
            h = h + block.attn(block.attn_norm(h), key_mask=mask)
            x = block.ffn_norm(h)
            if isinstance(block.ffn, MoELayer):
                segments = x.split(lengths, dim=1)
                y = torch.cat(
                    [self._moe(block.ffn, s, m) for s, m in zip(segments, model.modalities, strict=True)], 1
                )
            else:
                y = block.ffn(x)
            h = h + y * mask[..., None].to(y.dtype)  # padding's update is 0, as in eager mode
        h = model.trunk.norm(h)
        outputs = [] if model.classifier is None else [model.classifier(h, mask)]
        return (*outputs, h, mask) if self.caption else tuple(outputs)

    def _moe(self, layer: MoELayer, x: torch.Tensor, modality: Modality) -> torch.Tensor:
        """``x (B, N, d)`` of one modality through its allowed experts, gated by the router: ``(B, N, d)``."""
        b, n, d = x.shape
        tokens = x.reshape(b * n, d)
        ids = torch.full((b * n,), int(modality), dtype=torch.long, device=x.device)
        routing = layer.router(tokens, ids)  # token choice, dropless
        gates = torch.zeros_like(routing.probs).scatter(1, routing.expert_idx, routing.weight.view(b * n, -1))
        allowed = self.allowed[id(layer)][modality]
        experts = layer.experts
        hidden = activate(tokens @ experts.w_in[allowed].transpose(1, 2), experts.activation)  # (A, T, f)
        out = hidden @ experts.down_proj[allowed].transpose(1, 2)  # (A, T, d)
        y = torch.einsum("ta,atd->td", gates[:, allowed].to(out.dtype), out)
        if layer.shared is not None:
            y = y + layer.shared(tokens)
        return y.reshape(b, n, d)


class DecoderStep(nn.Module):
    """``forward(ids (B, L), memory (B, N, d), memory_mask (B, N)) -> (B, vocab)``: the next word's logits."""

    def __init__(self, model: MultiMoE) -> None:
        super().__init__()
        assert model.captioner is not None
        self.captioner = model.captioner

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        return self.captioner(ids, memory, memory_mask)[:, -1]


def example_inputs(model: MultiMoE, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs of the right kinds and shapes to trace the graph with (batch > 1: a size-1 dim stays 1)."""
    config, named = model.config, {}
    if Modality.TEXT in model.modalities:
        vocab = cast(TextEncoder, model.encoders["text"]).backbone.config.vocab_size
        named["text.input_ids"] = torch.randint(1, vocab, (batch, 7))
        named["text.attention_mask"] = torch.ones(batch, 7, dtype=torch.long)
        named["text.present"] = torch.ones(batch, dtype=torch.bool)
    if Modality.IMAGE in model.modalities:
        size = config.image.image_size
        named["image.pixels"] = torch.randn(batch, config.image.in_chans, size, size)
        named["image.present"] = torch.ones(batch, dtype=torch.bool)
    if Modality.AUDIO in model.modalities:
        samples = config.audio.sample_rate
        named["audio.waveform"] = torch.randn(batch, samples) * 0.1
        named["audio.lengths"] = torch.linspace(samples // 2, samples, batch).long()
        named["audio.present"] = torch.ones(batch, dtype=torch.bool)
    return named


def export_onnx(model: MultiMoE, folder: str | Path) -> list[Path]:
    """Write ``model.onnx``, ``decoder_step.onnx`` (a captioning model) and ``config.json`` to ``folder``.
    A model with LoRA adapters is merged on a copy first."""
    if model.config.lora.enabled:
        model = copy.deepcopy(model)
        lora.merge(model)
    model = model.eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    graph, example = StaticModel(model).eval(), example_inputs(model)
    outputs = ["class_logits"] if model.classifier is not None else []
    outputs += ["memory", "memory_mask"] if graph.caption else []
    dims = {"text.input_ids": (0, 1), "text.attention_mask": (0, 1), "audio.waveform": (0, 1)}
    written = [folder / MODEL_GRAPH]
    _export(graph, example, outputs, {"tensors": _dynamic(example, dims)}, written[0])
    if graph.caption:
        with torch.no_grad():
            memory, memory_mask = graph(*example.values())[-2:]
        step = {"ids": torch.ones(2, 3, dtype=torch.long), "memory": memory, "memory_mask": memory_mask}
        written.append(folder / DECODER_GRAPH)
        dynamic = dict(zip(step, _dynamic(step, dict.fromkeys(step, (0, 1))), strict=True))
        _export(DecoderStep(model).eval(), step, ["logits"], dynamic, written[1])
    (folder / CONFIG).write_text(json.dumps(model.saved_config(), indent=2) + "\n")
    return [*written, folder / CONFIG]


def _dynamic(
    named: Mapping[str, torch.Tensor], dims: Mapping[str, tuple[int, ...]]
) -> tuple[dict[int, Any], ...]:
    """Per input, its dynamic dims (``dims``, default: the batch)."""
    return tuple(dict.fromkeys(dims.get(name, (0,)), torch.export.Dim.AUTO) for name in named)


def _export(
    module: nn.Module, named: dict[str, torch.Tensor], outputs: list[str], dynamic: Any, path: Path
) -> None:
    program = torch.onnx.export(
        module,
        tuple(named.values()),
        dynamo=True,
        input_names=list(named),
        output_names=outputs,
        dynamic_shapes=dynamic,
        verbose=False,
    )
    assert program is not None
    program.save(str(path))


@dataclass
class GraphOutput:
    class_logits: torch.Tensor | None  # (B, num_classes)
    memory: torch.Tensor | None  # (B, N, d): what the caption decoder reads
    memory_mask: torch.Tensor | None  # (B, N)


class OnnxModel:
    """The graphs of ``export_onnx``, run by onnxruntime: ``model(inputs)`` and ``generate(inputs)``
    take the batches of ``multimoe.data`` for the ``config`` saved beside them."""

    def __init__(self, folder: str | Path, threads: int = 0, spinning: bool = True) -> None:
        """``threads``: onnxruntime's intra-op threads (0: its default); ``spinning=False`` lets them sleep
        between runs, for a process that does other work too."""
        import onnxruntime as ort

        self.folder = folder = Path(folder)
        saved = json.loads((folder / CONFIG).read_text())
        self.config = MultiMoEConfig.from_dict(saved["config"])
        self.labels, self.vocab = list(saved["labels"]), list(saved["vocab"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(folder / MODEL_GRAPH), options)
        self.decoder = None
        if (folder / DECODER_GRAPH).is_file():
            self.decoder = ort.InferenceSession(str(folder / DECODER_GRAPH), options)
        self.outputs = [o.name for o in self.session.get_outputs()]

    @property
    def words(self) -> WordTokenizer | None:
        return WordTokenizer(self.vocab) if self.vocab else None

    def __call__(self, inputs: MultiModalInputs) -> GraphOutput:
        named = graph_inputs(self.config, inputs)
        values = self.session.run(None, {k: v.numpy() for k, v in named.items()})
        out = dict(zip(self.outputs, (torch.from_numpy(v) for v in values), strict=True))
        return GraphOutput(*(out.get(k) for k in ("class_logits", "memory", "memory_mask")))

    def generate(self, inputs: MultiModalInputs, config: GenerationConfig | None = None) -> list[str]:
        words = self.words
        if self.decoder is None or words is None:
            raise ValueError("this graph has no caption decoder")
        out = self(inputs)
        assert out.memory is not None and out.memory_mask is not None
        config = config or GenerationConfig()
        max_new = self.config.caption.max_length - 1
        max_new = min(config.max_length or max_new, max_new)
        step = _OnnxStep(self.decoder, out.memory, out.memory_mask)
        cpu = torch.device("cpu")
        ids = search(step, inputs.batch_size, words.bos_id, words.eos_id, max_new, config, cpu)
        return [words.decode(seq) for seq in ids.tolist()]


class _OnnxStep:
    def __init__(self, session: Any, memory: torch.Tensor, memory_mask: torch.Tensor) -> None:
        self.session, self.memory, self.memory_mask = session, memory.numpy(), memory_mask.numpy()

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        feeds = {"ids": ids.numpy(), "memory": self.memory, "memory_mask": self.memory_mask}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def reorder(self, index: torch.Tensor) -> None:
        self.memory, self.memory_mask = self.memory[index.numpy()], self.memory_mask[index.numpy()]
