"""Search strategies over a next-token function: greedy, beam search and top-k / top-p sampling, batched.

``step(ids (R, L)) -> logits (R, vocab)`` gives the next token's logits after each row's prefix;
``step.reorder(index)`` keeps and repeats rows of its state (a key/value cache, or the memory): beam search
needs it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from multimoe.config import GenerationConfig


class Step(Protocol):
    def __call__(self, ids: torch.Tensor) -> torch.Tensor: ...

    def reorder(self, index: torch.Tensor) -> None: ...


def search(
    step: Step,
    batch: int,
    bos_id: int,
    eos_id: int,
    max_new: int,
    config: GenerationConfig,
    device: torch.device,
) -> torch.Tensor:
    """ids ``(batch, <= max_new)`` without the BOS, ``eos_id`` after each sequence's end."""
    if config.strategy == "beam":
        return beam_search(step, batch, bos_id, eos_id, max_new, config, device)
    generator = None
    if config.strategy == "sample" and config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    ids = torch.full((batch, 1), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new):
        logits = ban_repeated_ngrams(step(ids).float(), ids, config.no_repeat_ngram_size)
        if config.strategy == "sample":
            probs = filter_logits(logits / config.temperature, config.top_k, config.top_p).softmax(dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            next_id = logits.argmax(dim=-1)
        next_id = next_id.masked_fill(done, eos_id)
        ids = torch.cat([ids, next_id[:, None]], dim=1)
        done |= next_id == eos_id
        if bool(done.all()):
            break
    return ids[:, 1:]


def beam_search(
    step: Step,
    batch: int,
    bos_id: int,
    eos_id: int,
    max_new: int,
    config: GenerationConfig,
    device: torch.device,
) -> torch.Tensor:
    """Keep ``num_beams`` live hypotheses per sample; a hypothesis that emits ``eos_id`` is finished and
    scored ``sum log p / length ** length_penalty`` (length counts the EOS). A sample stops when it has
    ``num_beams`` finished ones and its best live one, scored at its current length, is worse than all of them
    (exact for ``length_penalty=0``, where one beam is greedy decoding)."""
    k = config.num_beams
    if max_new == 0:
        return torch.empty(batch, 0, dtype=torch.long, device=device)
    step.reorder(torch.arange(batch, device=device).repeat_interleave(k))
    ids = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start equal: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for length in range(1, max_new + 1):
        logp = ban_repeated_ngrams(step(ids).float(), ids, config.no_repeat_ngram_size).log_softmax(dim=-1)
        vocab = logp.shape[-1]
        total = (scores.view(-1, 1) + logp).view(batch, k * vocab)  # (B, K * V)
        top, flat = total.topk(2 * k, dim=-1)  # at most K end in EOS, so K live ones remain
        beam, token = flat // vocab, flat % vocab  # (B, 2K)
        live_beam = torch.zeros(batch, k, dtype=torch.long, device=device)
        live_token = torch.full((batch, k), eos_id, dtype=torch.long, device=device)
        new_scores = torch.full((batch, k), float("-inf"), device=device)
        for b in range(batch):
            kept = 0
            candidates = zip(top[b].tolist(), beam[b].tolist(), token[b].tolist(), strict=True)
            for rank, (score, j, t) in enumerate(candidates):
                if score == float("-inf") or kept == k:
                    break
                if t == eos_id or length == max_new:
                    if rank < k and not done[b]:  # an ending outside the best K is not taken (as in HF)
                        seq = [*ids[b * k + j, 1:].tolist(), t]
                        finished[b].append((score / length**config.length_penalty, seq))
                    continue
                live_beam[b, kept], live_token[b, kept], new_scores[b, kept] = j, t, score
                kept += 1
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:k]
            best_live = new_scores[b, 0].item() / length**config.length_penalty
            done[b] = done[b] or (len(finished[b]) == k and best_live < finished[b][-1][0])
        if all(done) or length == max_new:
            break
        rows = (torch.arange(batch, device=device)[:, None] * k + live_beam).view(-1)
        step.reorder(rows)
        ids = torch.cat([ids[rows], live_token.view(-1, 1)], dim=1)
        scores = new_scores
    out = torch.full((batch, max(len(h[0][1]) for h in finished)), eos_id, dtype=torch.long, device=device)
    for b, hyps in enumerate(finished):
        out[b, : len(hyps[0][1])] = torch.tensor(hyps[0][1], device=device)
    return out


def ban_repeated_ngrams(logits: torch.Tensor, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``-inf`` for every token that would complete an n-gram already in its row of ``ids (R, L)``."""
    if n <= 0 or ids.shape[1] < n:
        return logits
    grams = ids.unfold(1, n, 1)  # (R, G, n)
    prefix = ids[:, ids.shape[1] - n + 1 :]  # (R, n - 1): the last n - 1 tokens
    hit = (grams[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (R, G)
    banned = torch.zeros_like(logits).scatter_add_(1, grams[:, :, -1], hit.to(logits.dtype)) > 0
    return logits.masked_fill(banned, float("-inf"))


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the ``top_k`` largest logits per row (0 = all) and the smallest set whose probability reaches
    ``top_p``; the rest become ``-inf``. The most likely token always stays."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
