"""Evaluation scores: the COCO caption metrics (BLEU-1..4, CIDEr-D, ROUGE-L, and METEOR where Java and
pycocoevalcap are installed) and a per-class report from a confusion matrix.

BLEU, CIDEr-D and ROUGE-L follow pycocoevalcap's code exactly (tests/test_metrics.py checks them against it
on the same captions): corpus BLEU with the closest reference length, CIDEr-D with clipped n-gram counts, a
Gaussian length penalty (sigma 6) and document frequencies from the evaluated references, ROUGE-L with
beta 1.2 averaged over samples. Captions are lower-cased and punctuation is dropped, as COCO's tokenizer does.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Sequence

import torch

_WORD = re.compile(r"\w+")
Ngrams = Counter[tuple[str, ...]]


def tokenize(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def caption_metrics(
    predictions: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = False
) -> dict[str, float]:
    """``bleu1``..``bleu4``, ``cider_d``, ``rouge_l`` (and ``meteor`` if asked and possible) of the
    predictions against each sample's references (samples without references are skipped)."""
    pairs = [
        (tokenize(p), [tokenize(r) for r in refs])
        for p, refs in zip(predictions, references, strict=True)
        if refs
    ]
    if not pairs:
        return {}
    hyps, refs = [p for p, _ in pairs], [r for _, r in pairs]
    scores = {f"bleu{n}": b for n, b in enumerate(bleu(hyps, refs), start=1)}
    scores |= {"cider_d": cider_d(hyps, refs), "rouge_l": rouge_l(hyps, refs)}
    if meteor and (value := meteor_score(predictions, references)) is not None:
        scores["meteor"] = value
    return scores


def _ngrams(words: list[str], n: int) -> Ngrams:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: clipped n-gram precisions summed over the corpus, brevity penalty against the
    reference closest in length to each hypothesis (ties: the shorter)."""
    tiny, small = 1e-15, 1e-9  # pycocoevalcap's smoothing: a zero count gives ~0, never a division by zero
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        max_counts: Ngrams = Counter()
        for ref in hyp_refs:
            max_counts |= _ngrams(ref, n)  # element-wise max
        for gram, count in _ngrams(hyp, n).items():
            correct[len(gram) - 1] += min(count, max_counts[gram])
        for k in range(n):
            guess[k] += max(0, len(hyp) - k)
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in hyp_refs)[1]
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1 / (k + 1)) * penalty)
    return scores


def cider_d(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (x10, as reported): mean over samples and n-gram sizes of the clipped TF-IDF cosine between
    the hypothesis and each reference, times a Gaussian penalty on their length difference."""
    ref_grams = [[_ngrams(r, n) for r in rs] for rs in refs]
    doc_freq: Counter[tuple[str, ...]] = Counter(g for grams in ref_grams for g in set().union(*grams))
    log_docs = math.log(len(refs))

    def vector(grams: Ngrams) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        for gram, tf in grams.items():
            vec[len(gram) - 1][gram] = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(v * v for v in d.values())) for d in vec]
        length = sum(tf for gram, tf in grams.items() if len(gram) == 2)  # pycocoevalcap counts bigrams
        return vec, norms, length

    total = 0.0
    for hyp, grams in zip(hyps, ref_grams, strict=True):
        vec, norm, length = vector(_ngrams(hyp, n))
        score = [0.0] * n
        for ref in grams:
            vec_r, norm_r, length_r = vector(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and norm_r[k] != 0:
                    dot /= norm[k] * norm_r[k]
                score[k] += dot * penalty
        total += 10.0 * sum(score) / n / len(grams)
    return total / len(hyps)


def rouge_l(hyps: list[list[str]], refs: list[list[list[str]]], beta: float = 1.2) -> float:
    """Mean over samples of the LCS F-measure, with the best precision and best recall over the references."""
    total = 0.0
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        lcs = [_lcs(hyp, r) for r in hyp_refs]
        precision = max(c / len(hyp) if hyp else 0.0 for c in lcs)
        recall = max(c / len(r) if r else 0.0 for c, r in zip(lcs, hyp_refs, strict=True))
        if precision and recall:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(hyps)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, start=1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def meteor_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float | None:
    """METEOR 1.5 through pycocoevalcap's Java jar; ``None`` without Java or pycocoevalcap."""
    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None
    pairs = [(p, refs) for p, refs in zip(predictions, references, strict=True) if refs]
    gts = {i: [" ".join(tokenize(r)) for r in refs] for i, (_, refs) in enumerate(pairs)}
    res = {i: [" ".join(tokenize(p))] for i, (p, _) in enumerate(pairs)}
    scorer = Meteor()  # a Java process, ended when the scorer is deleted
    score, _ = scorer.compute_score(gts, res)
    del scorer
    return float(score)


def classification_report(confusion: torch.Tensor, labels: Sequence[str]) -> dict[str, object]:
    """Accuracy, macro-F1, per-class precision / recall / F1 / support and the matrix itself, from a
    confusion matrix ``(C, C)`` of counts (rows: true class, columns: predicted)."""
    counts = confusion.double()
    tp, support, predicted = counts.diag(), counts.sum(1), counts.sum(0)
    precision = tp / predicted.clamp_min(1)
    recall = tp / support.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    per_class = {
        name: {"precision": p, "recall": r, "f1": f, "support": int(s)}
        for name, p, r, f, s in zip(
            labels, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist(), strict=True
        )
    }
    return {
        "accuracy": float(tp.sum() / counts.sum().clamp_min(1)),
        "macro_f1": float(f1.mean()),
        "per_class": per_class,
        "confusion_matrix": confusion.long().tolist(),
        "labels": list(labels),
    }
