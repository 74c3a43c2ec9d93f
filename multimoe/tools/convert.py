"""Convert a Lightning checkpoint from ``train.py`` into a saved model folder (config.json, model.safetensors
and any backbone files), or export one of its encoders alone:

    python -m multimoe.tools.convert CHECKPOINT OUT_DIR [--encoder text|image|audio]

Load the result with ``MultiMoE.from_pretrained(OUT_DIR)``, or an exported encoder with
``ImageEncoder.from_pretrained(OUT_DIR)`` (likewise text and audio). Rebuilding the model here fetches a
pretrained backbone as training did (or finds it in the cache); the folder written needs nothing but itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multimoe.config import MODALITY_NAMES


def convert(checkpoint: str | Path, out: str | Path, encoder: str | None = None) -> Path:
    """Write the checkpoint's model (or only its ``encoder``) to ``out`` with ``save_pretrained``."""
    from multimoe.model import MultiMoE
    from multimoe.pretrained import Pretrained

    model = MultiMoE.from_checkpoint(checkpoint)
    part: Pretrained = model
    if encoder is not None:
        if encoder not in model.encoders:
            raise ValueError(f"the model has no {encoder} encoder; it has {', '.join(model.encoders)}")
        part = model.encoders[encoder]  # type: ignore[assignment]
    part.save_pretrained(out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.convert",
        description="Convert a train.py checkpoint to a save_pretrained folder (safetensors + config.json).",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--encoder", choices=MODALITY_NAMES, help="export only this encoder")
    args = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out, args.encoder)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
    what = f"its {args.encoder} encoder" if args.encoder else "the model"
    print(f"saved {what} from {args.checkpoint} to {out}")


if __name__ == "__main__":
    main()
