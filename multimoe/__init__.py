"""multimoe: multimodal Mixture-of-Experts models.

Importing the package is cheap: torch, timm and transformers load only when a model is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from multimoe.config import MultiMoEConfig
    from multimoe.model import MultiMoE, build_model

__all__ = ["MultiMoE", "MultiMoEConfig", "build_model"]


def __getattr__(name: str) -> Any:
    if name == "MultiMoEConfig":
        from multimoe.config import MultiMoEConfig

        return MultiMoEConfig
    if name in ("MultiMoE", "build_model"):
        from multimoe import model

        return getattr(model, name)
    raise AttributeError(f"module 'multimoe' has no attribute {name!r}")
