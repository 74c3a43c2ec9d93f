"""Convert a Lightning checkpoint from ``train.py`` into a saved model folder (config.json, model.safetensors
and any backbone files), export one of its encoders alone, or save a LoRA fine-tune's adapters alone:

    python -m multimoe.tools.convert CHECKPOINT OUT_DIR [--encoder text|image|audio] [--merge] [--base B]

``CHECKPOINT``: anything ``MultiMoE.from_pretrained`` takes (a ``.ckpt``, a saved model or adapter folder).
A model with LoRA adapters is written as its adapters alone (``adapter.json``, ``adapter.safetensors``: a
few MB, loaded onto the base with ``MultiMoE.from_pretrained(OUT_DIR)``); ``--merge`` folds them into the
weights and writes a plain model folder instead. ``--base``: the base model, where it is not where the
fine-tune found it. Load the result with ``MultiMoE.from_pretrained(OUT_DIR)``, or an exported encoder with
``ImageEncoder.from_pretrained(OUT_DIR)`` (likewise text and audio). Rebuilding the model here fetches a
pretrained backbone as training did (or finds it in the cache); a model folder needs nothing but itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multimoe.config import MODALITY_NAMES


def convert(
    checkpoint: str | Path,
    out: str | Path,
    encoder: str | None = None,
    merge: bool = False,
    base: str | Path | None = None,
) -> str:
    """Write the checkpoint's model, its ``encoder`` or its adapters to ``out``; returns what it wrote."""
    import multimoe.lora as lora
    from multimoe.model import MultiMoE
    from multimoe.pretrained import Pretrained

    model = MultiMoE.from_pretrained(checkpoint, base=base)
    if model.config.lora.enabled:
        if not (merge or encoder):
            model.save_adapter(out, base)
            return "its LoRA adapters"
        lora.merge(model)
    part: Pretrained = model
    if encoder is not None:
        if encoder not in model.encoders:
            raise ValueError(f"the model has no {encoder} encoder; it has {', '.join(model.encoders)}")
        part = model.encoders[encoder]  # type: ignore[assignment]
    part.save_pretrained(out)
    return f"its {encoder} encoder" if encoder else "the model"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.convert",
        description="Convert a train.py checkpoint to a save_pretrained folder (safetensors + config.json).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a saved model or adapter folder")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--encoder", choices=MODALITY_NAMES, help="export only this encoder")
    parser.add_argument("--merge", action="store_true", help="fold LoRA adapters into the weights")
    parser.add_argument("--base", help="the base model of LoRA adapters (default: the one they name)")
    args = parser.parse_args(argv)
    try:
        what = convert(args.checkpoint, args.out, args.encoder, args.merge, args.base)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    print(f"saved {what} from {args.checkpoint} to {args.out}")


if __name__ == "__main__":
    main()
