"""Checks of image and audio files, from cheap (headers, done before training) to full (decode, the checker).

Each returns ``None`` for a good file or a short reason (``"truncated: ..."``) that callers locate.
"""

from __future__ import annotations

import struct
from pathlib import Path


def header_problem(kind: str, path: Path) -> str | None:
    """What a quick look at the file's header finds wrong: not an image / audio file, no samples, a WAV
    whose data chunk is cut short. Costs one small read per file."""
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as image:
                if image.width == 0 or image.height == 0:
                    return "the image has no pixels"
            return None
        import soundfile

        info = soundfile.info(str(path))
        if info.frames == 0:
            return "the audio file holds no samples"
        return wav_truncation(path)
    except Exception as error:  # PIL and libsndfile raise many types; all mean "unreadable"
        return f"not a readable {kind} file ({_reason(error)})"


def decode_problem(kind: str, path: Path) -> str | None:
    """``header_problem`` plus a full decode of the pixels or samples (what the checker does), audio in
    blocks so that a long recording needs little memory."""
    problem = header_problem(kind, path)
    if problem is not None:
        return problem
    try:
        if kind == "image":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
        else:
            import numpy as np
            import soundfile

            for block in soundfile.blocks(str(path), blocksize=1 << 16, dtype="float32", always_2d=True):
                if not np.isfinite(block).all():
                    return "the audio holds NaN or infinite samples"
    except Exception as error:
        return f"cannot decode the {kind} ({_reason(error)})"
    return None


def wav_truncation(path: Path) -> str | None:
    """For a RIFF/WAVE file: whether its ``data`` chunk claims more bytes than the file holds (libsndfile
    silently reads the part that is there)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                have = size - offset - 8
                if chunk_size != 0xFFFFFFFF and have < chunk_size:
                    return f"truncated: the data chunk declares {chunk_size} bytes but {have} are there"
                return None
            offset += 8 + chunk_size + (chunk_size & 1)
    return None


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
