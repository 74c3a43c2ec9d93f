"""Caption metrics equal pycocoevalcap's on the same captions; the classification report, torchmetrics'."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision

from multimoe.training.metrics import caption_metrics, classification_report, meteor_score, tokenize

WORDS = [
    "a",
    "an",
    "the",
    "handwritten",
    "spoken",
    "word",
    "digit",
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
]


def captions(seed: int, count: int = 40) -> tuple[list[str], list[list[str]]]:
    """Hypotheses that copy, edit, shorten or replace one of 1-3 references of 3-12 words."""
    rng = random.Random(seed)
    hyps, refs = [], []
    for _ in range(count):
        sample_refs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 3))]
        words = rng.choice(sample_refs).split()
        kind = rng.randrange(4)
        if kind == 1:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        elif kind == 2:
            words = words[: rng.randint(1, len(words))]
        elif kind == 3:
            words = rng.choices(WORDS, k=rng.randint(2, 14))
        hyps.append(" ".join(words))
        refs.append(sample_refs)
    return hyps, refs


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_metrics_equal_pycocoevalcap(seed: int) -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap (the dev extra) is the reference")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = captions(seed)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [h] for i, h in enumerate(hyps)}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    expected = {f"bleu{n}": value for n, value in enumerate(bleu, start=1)}
    expected["cider_d"] = Cider().compute_score(gts, res)[0]
    expected["rouge_l"] = Rouge().compute_score(gts, res)[0]
    ours = caption_metrics(hyps, refs)
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 < ours["bleu4"] < ours["bleu1"] < 1.0 and ours["cider_d"] > 0.5


def test_caption_metrics_are_perfect_on_the_references_and_tokenize_like_coco() -> None:
    _, refs = captions(2, count=10)
    perfect = caption_metrics([r[0] for r in refs], refs)
    assert perfect["bleu4"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert tokenize("A handwritten 3, a spoken Seven.") == ["a", "handwritten", "3", "a", "spoken", "seven"]
    assert caption_metrics(["a b"], [[]]) == {}  # no references: nothing to score


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR runs on Java")
@pytest.mark.skipif(
    not os.environ.get("MULTIMOE_TEST_METEOR"), reason="starts a JVM (20-70 s): MULTIMOE_TEST_METEOR=1"
)
def test_meteor_where_java_is_available() -> None:
    pytest.importorskip("pycocoevalcap")
    same = meteor_score(["a handwritten seven"], [["a handwritten seven"]])
    other = meteor_score(["the spoken two"], [["a handwritten seven"]])
    assert same is not None and other is not None and same > 0.9 > 0.2 > other


def test_meteor_is_left_out_without_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert meteor_score(["a b"], [["a b"]]) is None
    assert "meteor" not in caption_metrics(["a b"], [["a b"]], meteor=True)


def test_classification_report_equals_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    num_classes = 5
    target = torch.randint(0, num_classes - 1, (200,), generator=g)  # class 4 never occurs
    preds = torch.where(torch.rand(200, generator=g) < 0.6, target, torch.randint(0, 5, (200,), generator=g))
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((target, preds), torch.ones_like(target), accumulate=True)
    report = classification_report(confusion, [f"c{i}" for i in range(num_classes)])
    acc = MulticlassAccuracy(num_classes, average="micro")(preds, target)
    macro_f1 = MulticlassF1Score(num_classes, average="macro")(preds, target)
    per_class_f1 = MulticlassF1Score(num_classes, average=None)(preds, target)
    per_class_precision = MulticlassPrecision(num_classes, average=None)(preds, target)
    assert report["accuracy"] == pytest.approx(float(acc))
    assert report["macro_f1"] == pytest.approx(float(macro_f1))
    per_class = report["per_class"]
    assert isinstance(per_class, dict)
    assert [per_class[f"c{i}"]["f1"] for i in range(5)] == pytest.approx(per_class_f1.tolist())
    assert [per_class[f"c{i}"]["precision"] for i in range(5)] == pytest.approx(per_class_precision.tolist())
    assert per_class["c4"]["support"] == 0 and sum(c["support"] for c in per_class.values()) == 200
