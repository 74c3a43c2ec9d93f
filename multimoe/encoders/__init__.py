"""Modality encoders. One contract: ``forward(**inputs) -> (tokens (B, N, out_dim), mask (B, N))``."""

from multimoe.encoders.audio import AudioEncoder
from multimoe.encoders.image import ImageEncoder
from multimoe.encoders.projector import Projector
from multimoe.encoders.text import TextEncoder

__all__ = ["AudioEncoder", "ImageEncoder", "Projector", "TextEncoder"]
