"""Caption generation: the key/value cache changes nothing, beam search finds the best caption, sampling is
seeded, and the limits (max length, stop token, no-repeat n-grams) hold."""

from __future__ import annotations

import itertools

import pytest
import torch

from multimoe.config import ConfigError, GenerationConfig
from multimoe.heads.captioning import CaptionDecoder
from multimoe.heads.generation import ban_repeated_ngrams, filter_logits

BOS, EOS = 2, 3


def decoder_and_memory(vocab: int = 12, max_length: int = 10, batch: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    decoder = CaptionDecoder(vocab, d_model=16, depth=2, num_heads=2, d_ff=32, max_length=max_length).eval()
    torch.nn.init.normal_(decoder.embed.weight, std=1.0)  # peaked, varied next-token distributions
    memory = torch.randn(batch, 7, 16)
    mask = torch.ones(batch, 7, dtype=torch.bool)
    mask[1, 4:] = False  # padded memory rows, as in a batch with a missing modality
    mask[-1, :2] = False
    return decoder, memory, mask


def generate(decoder, memory, mask, **options) -> torch.Tensor:
    return decoder.generate(memory, mask, BOS, EOS, GenerationConfig(**options))


def test_cached_steps_give_the_full_forward_logits() -> None:
    decoder, memory, mask = decoder_and_memory()
    ids = torch.randint(4, 12, (5, 8))
    full = decoder(ids, memory, mask)  # (B, L, V)
    cache = decoder.start(memory, mask)
    steps = [decoder.step(ids[:, :3], cache)]  # a prefix of 3 at once, then one token at a time
    steps += [decoder.step(ids[:, i : i + 1], cache) for i in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 8


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "greedy"},
        {"strategy": "beam", "num_beams": 3, "length_penalty": 0.7, "no_repeat_ngram_size": 2},
        {"strategy": "sample", "seed": 3, "top_k": 5, "top_p": 0.9},
    ],
)
def test_generation_with_the_cache_equals_generation_without(options: dict) -> None:
    decoder, memory, mask = decoder_and_memory()
    cached = generate(decoder, memory, mask, **options)
    plain = generate(decoder, memory, mask, use_cache=False, **options)
    assert torch.equal(cached, plain)


def test_one_beam_without_length_penalty_is_greedy() -> None:
    decoder, memory, mask = decoder_and_memory(batch=8)
    greedy = generate(decoder, memory, mask)
    beam = generate(decoder, memory, mask, strategy="beam", num_beams=1, length_penalty=0.0)
    assert torch.equal(beam, greedy)


def caption_scores(decoder, memory, mask, seqs: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """Score of each caption ``seqs (S, L)`` (ends at its first EOS, or is cut at L) for one memory row."""
    ids = torch.cat([torch.full((len(seqs), 1), BOS), seqs], dim=1)
    n = len(seqs)
    logp = decoder(ids[:, :-1], memory.expand(n, -1, -1), mask.expand(n, -1)).log_softmax(-1)
    token_logp = logp.gather(2, seqs[:, :, None])[:, :, 0].cumsum(dim=1)  # (S, L)
    is_eos = seqs == EOS
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, seqs.shape[1])  # (S,)
    return token_logp.gather(1, length[:, None] - 1)[:, 0] / length.float() ** length_penalty


@torch.no_grad()
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_finds_the_best_caption_of_all(length_penalty: float) -> None:
    vocab, max_new = 5, 3
    decoder, memory, mask = decoder_and_memory(vocab=vocab, max_length=max_new + 1, batch=3, seed=1)
    beam = generate(decoder, memory, mask, strategy="beam", num_beams=vocab**2, length_penalty=length_penalty)
    greedy = generate(decoder, memory, mask)
    every = torch.tensor(list(itertools.product(range(vocab), repeat=max_new)))  # all, cut at max_new
    for b in range(3):
        m, k = memory[b : b + 1], mask[b : b + 1]
        best = caption_scores(decoder, m, k, every, length_penalty).max()
        found = caption_scores(decoder, m, k, torch.stack([beam[b], greedy[b]]), length_penalty)
        assert float(found[0]) == pytest.approx(float(best), abs=1e-5)
        assert found[0] >= found[1] - 1e-6


def test_max_length_and_stop_token() -> None:
    decoder, memory, mask = decoder_and_memory(max_length=10)
    for options in ({}, {"strategy": "beam", "num_beams": 2}, {"strategy": "sample", "seed": 0}):
        assert generate(decoder, memory, mask, max_length=4, **options).shape[1] <= 4
        ids = generate(decoder, memory, mask, **options)
        assert ids.shape[1] <= 9  # positions left after the BOS
        for row in ids.tolist():  # nothing but the stop token after the first one
            assert EOS not in row or set(row[row.index(EOS) :]) == {EOS}


def test_no_repeat_ngram() -> None:
    ids = torch.tensor([[BOS, 5, 6, 5], [BOS, 5, 6, 7]])
    banned = ban_repeated_ngrams(torch.zeros(2, 9), ids, 2).isinf()
    assert banned[0].nonzero().flatten().tolist() == [6]  # "5 6" was seen and the row ends in 5
    assert not banned[1].any()
    unigrams = ban_repeated_ngrams(torch.zeros(2, 9), ids, 1).isinf()
    assert unigrams[1].nonzero().flatten().tolist() == [2, 5, 6, 7]
    decoder, memory, mask = decoder_and_memory()
    for strategy in ("greedy", "beam"):
        for row in generate(decoder, memory, mask, strategy=strategy, no_repeat_ngram_size=1).tolist():
            words = row[: row.index(EOS)] if EOS in row else row
            assert len(words) == len(set(words))


def test_filter_logits_top_k_and_top_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).clamp_min(1e-9).log()
    assert filter_logits(logits, 2, 1.0).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 0, 0.6).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 0, 0.4).isfinite().tolist() == [[True, False, False, False]]
    assert filter_logits(logits, 0, 1.0).isfinite().all()


def test_sampling_is_seeded_and_top_k_1_is_greedy() -> None:
    decoder, memory, mask = decoder_and_memory(batch=16)
    a = generate(decoder, memory, mask, strategy="sample", seed=1)
    assert torch.equal(a, generate(decoder, memory, mask, strategy="sample", seed=1))
    assert not torch.equal(a, generate(decoder, memory, mask, strategy="sample", seed=2))
    greedy = generate(decoder, memory, mask)
    assert torch.equal(generate(decoder, memory, mask, strategy="sample", seed=5, top_k=1), greedy)


def test_bad_generation_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"GenerationConfig\.top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ConfigError, match=r"GenerationConfig\.strategy"):
        GenerationConfig(strategy="nucleus")  # type: ignore[arg-type]
