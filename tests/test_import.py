"""Importing the package stays cheap: no torch, timm, transformers or Lightning until a model is built."""

from __future__ import annotations

import subprocess
import sys


def imported_after(code: str, heavy: tuple[str, ...]) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(m for m in {heavy!r} if m in sys.modules))"
    return subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()


def test_import_multimoe_loads_no_heavy_library() -> None:
    code = "import multimoe, multimoe.config\nmultimoe.MultiMoEConfig()"
    heavy = ("torch", "timm", "transformers", "lightning", "torchaudio", "huggingface_hub")
    assert imported_after(code, heavy) == []


def test_import_encoders_loads_no_backbone_library() -> None:
    code = "from multimoe.encoders import AudioEncoder, ImageEncoder, TextEncoder"
    assert imported_after(code, ("timm", "transformers", "lightning", "torchaudio")) == []
