"""Classify and caption one sample given as files on the command line:

    python -m multimoe.tools.infer CHECKPOINT [--image a.png] [--audio b.wav] [--text "four"] [--strategy ...]

Prints one JSON object: the predicted label and its probability, and the generated caption. Any
``GenerationConfig`` field is an option (``--strategy``, ``--num_beams``, ``--top_p``, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch

from multimoe.config import GenerationConfig, GenerationStrategy

if TYPE_CHECKING:
    from multimoe.data.collate import Batch
    from multimoe.model import MultiMoE


def infer(
    checkpoint: str | Path,
    image: str | Path | None = None,
    audio: str | Path | None = None,
    text: str | None = None,
    generation: GenerationConfig | None = None,
) -> dict[str, Any]:
    """``{"label", "probability", "caption"}`` (as the model has those heads) for one sample; ``checkpoint``
    is a ``.ckpt`` written by ``train.py`` or a saved model folder."""
    from multimoe.model import MultiMoE

    model = MultiMoE.from_pretrained(checkpoint).eval()
    return model.predict(one_sample(model, image, audio, text).inputs, generation)[0]


def one_sample(
    model: MultiMoE, image: str | Path | None = None, audio: str | Path | None = None, text: str | None = None
) -> Batch:
    """A batch of one sample made of the given files and text, prepared as ``model`` was trained."""
    from multimoe.data.collate import Collator
    from multimoe.data.dataset import IGNORE_INDEX, Sample
    from multimoe.data.manifest import path_problem
    from multimoe.data.processors import AudioProcessor, ImageProcessor

    files = {"image": image, "audio": audio}
    for name, path in files.items():
        if path is not None and (problem := path_problem(Path(path))) is not None:
            raise FileNotFoundError(f"--{name} {path}: {problem}")
    if text is not None and not text.strip():
        raise ValueError(f"--text: expected non-empty text, got {text!r}")
    config = model.config
    given = {name for name, value in (*files.items(), ("text", text)) if value is not None}
    if not given & set(config.modalities):
        raise ValueError(f"give at least one of the model's inputs: --{', --'.join(config.modalities)}")
    if unused := given - set(config.modalities):
        raise ValueError(f"this model reads no {', '.join(sorted(unused))}")
    assert model.words is not None
    sample = Sample(
        id="cli",
        text=text,
        pixels=None if image is None else _load(ImageProcessor(config.image), image, "image"),
        waveform=None if audio is None else _load(AudioProcessor(config.audio), audio, "audio"),
        label=IGNORE_INDEX,
        caption_ids=None,
        references=[],
    )
    return Collator.for_model(config, model.words)([sample])


def _load(processor: Any, path: str | Path, name: str) -> torch.Tensor:
    try:
        return processor(Path(path))
    except Exception as error:  # an unreadable file gets one line naming it
        raise ValueError(f"--{name} {path}: cannot read it: {error}") from error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.infer", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a saved model folder")
    parser.add_argument("--image", help="an image file (png, jpg, ...)")
    parser.add_argument("--audio", help="an audio file (wav, flac, ...), any sample rate")
    parser.add_argument("--text", help="the text input")
    generation = parser.add_argument_group("generation (see GenerationConfig)")
    for field in dataclasses.fields(GenerationConfig):
        if field.name == "strategy":
            generation.add_argument("--strategy", choices=get_args(GenerationStrategy), default=field.default)
        elif field.name != "use_cache":
            kind = int if field.default is None else type(field.default)
            generation.add_argument(f"--{field.name}", type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    options = {f.name: args[f.name] for f in dataclasses.fields(GenerationConfig) if f.name in args}
    try:
        result = infer(
            args["checkpoint"], args["image"], args["audio"], args["text"], GenerationConfig(**options)
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
