"""Export a model for inference: sliced to the modalities a device will see and the heads it needs, as a saved
model folder or as ONNX graphs.

    python -m multimoe.tools.export CHECKPOINT OUT [--modalities image,audio] [--heads classify|caption|both]
        [--onnx]

``CHECKPOINT``: anything ``MultiMoE.from_pretrained`` takes. ``OUT`` is a saved model folder
(``MultiMoE.from_pretrained(OUT)``) that keeps the chosen modalities' encoders and projectors, their
modality experts with the cross-modal and shared ones, the router rows those experts need, and the heads
asked for (``MultiMoE.sliced``). On inputs made of those modalities it computes what the
whole model computes. A model with LoRA adapters is merged first. With ``--onnx``, ``OUT`` holds the slice's
ONNX graphs instead (``multimoe.portable``: ``OnnxModel(OUT)`` runs them). Prints parameters and bytes
before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HEADS = {"classify": (True, False), "caption": (False, True), "both": (True, True)}


def export(
    source: str | Path,
    out: str | Path,
    modalities: list[str] | None = None,
    heads: str = "both",
    onnx: bool = False,
) -> dict[str, Any]:
    """Write the slice to ``out`` (``modalities``: default all); returns its size against the whole
    model's."""
    from multimoe.model import MultiMoE

    model = MultiMoE.from_pretrained(source)
    sliced = model.sliced(modalities or model.config.modalities, *HEADS[heads])
    if onnx:
        from multimoe.portable import export_onnx

        written = sum(path.stat().st_size for path in export_onnx(sliced, out))
    else:
        sliced.save_pretrained(out)
        written = _bytes(sliced)
    return {
        "modalities": sliced.config.modalities,
        "heads": heads,
        "format": "onnx" if onnx else "folder",
        "parameters": {"before": _count(model), "after": _count(sliced)},
        "bytes": {"before": _bytes(model), "after": written},
    }


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model: Any) -> int:
    """Of every weight and buffer, as ``model.safetensors`` holds them."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multimoe.tools.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="a .ckpt written by train.py, or a saved model or adapter folder")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--modalities", help="comma-separated, e.g. image,audio (default: all the model has)")
    parser.add_argument("--heads", choices=list(HEADS), default="both")
    parser.add_argument("--onnx", action="store_true", help="write ONNX graphs (needs the deploy extra)")
    args = parser.parse_args(argv)
    modalities = [m.strip() for m in (args.modalities or "").split(",") if m.strip()] or None
    try:
        report = export(args.checkpoint, args.out, modalities, args.heads, args.onnx)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    before, after = report["bytes"]["before"], report["bytes"]["after"]
    print(json.dumps(report))
    kept = ", ".join(report["modalities"])
    share = f"{after:,} of {before:,} bytes ({after / before:.0%})"
    print(f"saved {kept} ({args.heads} heads, {report['format']}) to {args.out}: {share}")


if __name__ == "__main__":
    main()
