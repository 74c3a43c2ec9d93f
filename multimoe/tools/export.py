"""Export a model sliced to the modalities a device will see and the heads it needs:

    python -m multimoe.tools.export CHECKPOINT OUT --modalities image,audio [--heads classify|caption|both]

``CHECKPOINT``: anything ``MultiMoE.from_pretrained`` takes. ``OUT`` is a saved model folder
(``MultiMoE.from_pretrained(OUT)``) that keeps the chosen modalities' encoders and projectors, their
modality experts with the cross-modal and shared ones, the router rows those experts need, and the heads
asked for (``MultiMoE.sliced``). On inputs made of those modalities it computes what the
whole model computes. A model with LoRA adapters is merged first. Prints parameters and bytes before and
after.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HEADS = {"classify": (True, False), "caption": (False, True), "both": (True, True)}


def export(source: str | Path, out: str | Path, modalities: list[str], heads: str = "both") -> dict[str, Any]:
    """Write the slice to ``out``; returns its size against the whole model's."""
    from multimoe.model import MultiMoE

    model = MultiMoE.from_pretrained(source)
    sliced = model.sliced(modalities, *HEADS[heads])
    sliced.save_pretrained(out)
    return {
        "modalities": sliced.config.modalities,
        "heads": heads,
        "parameters": {"before": _count(model), "after": _count(sliced)},
        "bytes": {"before": _bytes(model), "after": _bytes(sliced)},
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
    parser.add_argument("--modalities", required=True, help="comma-separated, e.g. image,audio")
    parser.add_argument("--heads", choices=list(HEADS), default="both")
    args = parser.parse_args(argv)
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    try:
        report = export(args.checkpoint, args.out, modalities, args.heads)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    before, after = report["bytes"]["before"], report["bytes"]["after"]
    print(json.dumps(report))
    kept = ", ".join(report["modalities"])
    share = f"{after:,} of {before:,} bytes ({after / before:.0%})"
    print(f"saved {kept} ({args.heads} heads) to {args.out}: {share}")


if __name__ == "__main__":
    main()
