#!/usr/bin/env python
"""Build MM-Digits: handwritten image + spoken word + written word, labelled with the sum of the digits.

Usage: python datasets/mmdigits/prepare.py [--out DIR] [--train N] [--val N] [--test N]
           [--utterances-per-digit TRAIN VAL TEST] [--seed 0] [--force]

Images come from scikit-learn's bundled digits, speech is synthesised offline with the libespeak-ng that
the espeakng-loader wheel ships. See README.md next to this file for the format and the split policy.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from build_util import SPLITS, build_atomically, run_main, write_manifest

FORMAT_VERSION = 1
MODALITIES = ("image", "audio", "text")  # fixed order, also in captions
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BUILD_ENTRIES = {f"{split}.jsonl" for split in SPLITS} | {"images", "audio", "build.json"}
IMAGE_HOLDOUT = 0.15  # share of each digit's images in val and in test (train keeps the rest)
MISSING_PROB = 0.15  # chance that a sample lacks exactly one modality
VOICES = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-029",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-us-nyc",
)
VARIANTS = (
    "",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "m8",
    "croak",
    "klatt",
    "klatt2",
    "klatt3",
    "whisper",
    "Annie",
    "aunty",
    "boris",
    "david",
    "linda",
    "max",
    "quincy",
    "rob",
)
RATES = (110, 230)  # words per minute, inclusive
PITCHES = (25, 75)  # espeak pitch 0..100, inclusive
RAND_SEED = 1  # seed for espeak's noise sources, reset before each speaker setting
SILENCE = 200  # |sample| at or below this counts as silence when trimming (int16 scale)

# espeak-ng C API constants (speak_lib.h)
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000
PARAM_RATE, PARAM_PITCH = 1, 3
POS_CHARACTER = 1
CHARS_UTF8 = 1
SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class VoiceSetting:
    """One synthetic speaker: an espeak voice name (with optional +variant), a rate and a pitch."""

    voice: str
    rate: int
    pitch: int


class Espeak:
    """Minimal ctypes binding to libespeak-ng in synchronous mode.

    espeak-ng keeps internal synthesiser state between utterances (even across Terminate/Initialize) and
    uses libc rand() for breath noise, so the same call can give a different waveform. Each instance
    therefore dlopens a fresh copy of the library (unloaded again in close()) and reseeds the random
    sources: what it synthesises depends only on the calls made on it.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self.data_path = espeakng_loader.get_data_path()
        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        self._lib.espeak_Info.restype = ctypes.c_char_p
        self.sample_rate = int(
            self._lib.espeak_Initialize(
                AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), INITIALIZE_DONT_EXIT
            )
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data path {self.data_path}")
        self.version = self._lib.espeak_Info(None).decode()
        # breathy variants (f2, f3, f5, whisper, ...) draw noise from libc rand(), which dlclose doesn't reset
        ctypes.CDLL(None).srand(RAND_SEED)
        self._lib.espeak_ng_SetRandSeed(ctypes.c_long(RAND_SEED))
        self._chunks: list[np.ndarray] = []
        self._callback = SynthCallback(self._collect)  # keep a reference: C holds only the pointer
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, n: int, _events: Any) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0 = continue synthesis

    def synthesize(self, text: str, setting: VoiceSetting) -> np.ndarray:
        """Return int16 mono samples of `text` spoken with `setting`."""
        if self._lib.espeak_SetVoiceByName(setting.voice.encode()) != 0:
            raise ValueError(f"unknown espeak voice {setting.voice!r}")
        self._lib.espeak_SetParameter(PARAM_RATE, setting.rate, 0)
        self._lib.espeak_SetParameter(PARAM_PITCH, setting.pitch, 0)
        self._chunks = []
        data = text.encode() + b"\0"
        # Python ignores exceptions raised inside ctypes callbacks, so a Ctrl-C or SIGTERM handled while
        # _collect runs would be lost: hold those signals until the C call returns.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            status = self._lib.espeak_Synth(data, len(data), 0, POS_CHARACTER, 0, CHARS_UTF8, None, None)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if status != 0:
            raise RuntimeError(f"espeak_Synth failed for {text!r} with {setting}")
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)

    def close(self) -> None:
        self._lib.espeak_Terminate()
        import _ctypes

        _ctypes.dlclose(self._lib._handle)  # drop the library so the next instance starts from clean state

    def __enter__(self) -> Espeak:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def check_variants(data_path: str) -> None:
    """Fail early on a missing variant: espeak silently ignores unknown `+variant` suffixes."""
    missing = [v for v in VARIANTS if v and not (Path(data_path) / "voices" / "!v" / v).is_file()]
    if missing:
        raise RuntimeError(f"espeak-ng data at {data_path} lacks voice variants {missing}")


def trim_silence(samples: np.ndarray, pad: int) -> np.ndarray:
    """Cut leading and trailing silence, keeping `pad` samples of margin on each side."""
    loud = np.flatnonzero(np.abs(samples.astype(np.int32)) > SILENCE)
    if loud.size == 0:
        raise RuntimeError("espeak produced silence")
    return samples[max(int(loud[0]) - pad, 0) : int(loud[-1]) + 1 + pad]


def split_images(labels: np.ndarray, rng: np.random.Generator) -> dict[str, list[int]]:
    """Stratified disjoint split of image indices into train/val/test pools (about 70/15/15)."""
    pools: dict[str, list[int]] = {split: [] for split in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_hold = round(IMAGE_HOLDOUT * len(idx))
        pools["test"] += idx[:n_hold].tolist()
        pools["val"] += idx[n_hold : 2 * n_hold].tolist()
        pools["train"] += idx[2 * n_hold :].tolist()
    return {split: sorted(pool) for split, pool in pools.items()}


def draw_settings(n: int, rng: np.random.Generator, taken: set[VoiceSetting]) -> list[VoiceSetting]:
    """Draw `n` speaker settings not in `taken` (so no utterance is duplicated across splits)."""
    settings: list[VoiceSetting] = []
    while len(settings) < n:
        variant = VARIANTS[int(rng.integers(len(VARIANTS)))]
        voice = VOICES[int(rng.integers(len(VOICES)))] + (f"+{variant}" if variant else "")
        setting = VoiceSetting(
            voice, int(rng.integers(RATES[0], RATES[1] + 1)), int(rng.integers(PITCHES[0], PITCHES[1] + 1))
        )
        if setting not in taken:
            taken.add(setting)
            settings.append(setting)
    return settings


def write_images(images: np.ndarray, pools: dict[str, list[int]], out: Path) -> None:
    """Save each pool image as an 8x8 8-bit grayscale PNG named <split>_<row in load_digits()>.png."""
    from PIL import Image

    pixels = np.rint(images * (255 / 16)).astype(np.uint8)
    for split, pool in pools.items():
        for idx in pool:
            Image.fromarray(pixels[idx]).save(out / "images" / f"{split}_{idx:04d}.png")


def write_audio(settings: dict[str, list[VoiceSetting]], out: Path) -> None:
    """Speak all ten digits with every setting; file index = 10 * setting index + digit."""
    import soundfile as sf

    for split, split_settings in settings.items():
        for k, setting in enumerate(split_settings):
            with Espeak() as tts:  # fresh engine per setting: its files don't depend on the other settings
                for digit, word in enumerate(WORDS):
                    samples = trim_silence(tts.synthesize(word, setting), pad=tts.sample_rate // 100)
                    sf.write(
                        out / "audio" / f"{split}_{10 * k + digit:04d}.wav",
                        samples,
                        tts.sample_rate,
                        subtype="PCM_16",
                    )


def join_parts(parts: list[str]) -> str:
    """'a, b and c' / 'a and b'."""
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_samples(
    split: str, n: int, pool: list[int], labels: np.ndarray, n_settings: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    """Draw `n` manifest records; each modality's digit is independent and uniform."""
    by_digit = [[idx for idx in pool if labels[idx] == d] for d in range(10)]
    records = []
    for i in range(n):
        d_img, d_aud, d_txt = (int(d) for d in rng.integers(0, 10, size=3))
        img = by_digit[d_img][int(rng.integers(len(by_digit[d_img])))]
        utt = 10 * int(rng.integers(n_settings)) + d_aud
        dropped = int(rng.integers(3)) if rng.random() < MISSING_PROB else -1
        present = [m for m in range(3) if m != dropped]
        digits = (d_img, d_aud, d_txt)
        values = (f"images/{split}_{img:04d}.png", f"audio/{split}_{utt:04d}.wav", WORDS[d_txt])
        phrases = (f"a handwritten {d_img}", f"a spoken {WORDS[d_aud]}", f"the word {WORDS[d_txt]}")
        record = {"id": f"{split}-{i:06d}"} | {MODALITIES[m]: values[m] for m in present}
        record["label"] = str(sum(digits[m] for m in present))
        record["caption"] = join_parts([phrases[m] for m in present])
        records.append(record)
    return records


def build(config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Write the whole dataset into the empty folder `tmp`; return what build.json adds to the config."""
    from sklearn.datasets import load_digits

    seed, utts = config["seed"], dict(zip(SPLITS, config["utterances_per_digit"], strict=True))
    with Espeak() as tts:
        check_variants(tts.data_path)
        espeak_version, sample_rate = tts.version, tts.sample_rate
    (tmp / "images").mkdir()
    (tmp / "audio").mkdir()
    digits = load_digits()
    labels = np.asarray(digits.target)
    pools = split_images(labels, np.random.default_rng([seed, 0]))
    write_images(np.asarray(digits.images), pools, tmp)

    taken: set[VoiceSetting] = set()
    settings = {
        s: draw_settings(utts[s], np.random.default_rng([seed, 1, i]), taken) for i, s in enumerate(SPLITS)
    }
    write_audio(settings, tmp)

    counts: dict[str, dict[str, int]] = {}
    for i, split in enumerate(SPLITS):
        records = draw_samples(
            split, config[split], pools[split], labels, utts[split], np.random.default_rng([seed, 2, i])
        )
        write_manifest(tmp / f"{split}.jsonl", records)
        counts[split] = {
            "samples": len(records),
            "images": len(pools[split]),
            "utterances": 10 * utts[split],
            "missing_one_modality": sum(not set(MODALITIES) <= r.keys() for r in records),
        }
    return {"counts": counts, "sample_rate": sample_rate, "espeak_ng": espeak_version}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--train", type=int, default=8000)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument(
        "--utterances-per-digit",
        type=int,
        nargs=3,
        default=[100, 30, 30],
        metavar=("TRAIN", "VAL", "TEST"),
        help="speaker settings per split (each says all digits)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if DIR is up to date")
    args = p.parse_args(argv)
    for split, n_utt in zip(SPLITS, args.utterances_per_digit, strict=True):
        if getattr(args, split) < 0 or n_utt < 0 or (getattr(args, split) > 0 and n_utt == 0):
            p.error(f"{split}: need non-negative counts and at least one utterance per digit for samples")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    config = {
        "format_version": FORMAT_VERSION,
        "seed": args.seed,
        "train": args.train,
        "val": args.val,
        "test": args.test,
        "utterances_per_digit": list(args.utterances_per_digit),
    }
    start = time.perf_counter()
    meta = build_atomically(out, config, lambda tmp: build(config, tmp), BUILD_ENTRIES, args.force)
    if meta is None:
        print(f"{out} is up to date (remove it or pass --force to rebuild)")
        return 0
    for split, c in meta["counts"].items():
        print(
            f"{split:>5}: {c['samples']:6d} samples ({c['missing_one_modality']} missing one modality), "
            f"{c['images']} images, {c['utterances']} utterances"
        )
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    run_main(main)
