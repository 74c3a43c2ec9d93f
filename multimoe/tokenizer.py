"""A word-level tokenizer built from the training manifest: used by the from-scratch text encoder and by the
caption decoder (whose vocabulary is the captions' words)."""

from __future__ import annotations

import re
from collections.abc import Iterable

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_WORD = re.compile(r"\w+|[^\w\s]")
_SPACE_BEFORE_PUNCT = re.compile(r" ([^\w\s])")


class WordTokenizer:
    """Lower-cased words and punctuation marks; ids 0-3 are ``<pad> <unk> <bos> <eos>``."""

    def __init__(self, vocab: list[str]) -> None:
        if tuple(vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary starts with the special tokens {SPECIALS}, got {vocab[:4]}")
        self.vocab = list(vocab)
        self.index = {word: i for i, word in enumerate(vocab)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(len(SPECIALS))

    @classmethod
    def build(cls, texts: Iterable[str], base: list[str] | None = None) -> WordTokenizer:
        """The sorted words of ``texts``; with a ``base`` vocabulary, its words keep their ids and only the
        new words are appended (fine-tuning)."""
        vocab = list(base or SPECIALS)
        words = {word for text in texts for word in cls.split(text)} - set(vocab)
        return cls([*vocab, *sorted(words)])

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self.index.get(word, self.unk_id) for word in self.split(text)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Iterable[int]) -> str:
        """Words up to the first ``<eos>``, specials dropped, punctuation attached to the word before it."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                words.append(self.vocab[i])
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(words))

    def normalize(self, text: str) -> str:
        """The form ``decode`` gives back for ``text``: what a generated caption is compared with."""
        return _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(self.split(text)))
