"""Task metrics against hand-computed values, and BLEU/chrF/ROUGE against the libraries
called directly."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fastlm.eval import metrics

# Six examples, three classes (rows: true class, columns: predicted class):
#
#            pred 0  pred 1  pred 2     TP  FP  FN   P    R    F1
#   true 0      1       1       0        1   0   1   1    1/2  2/3
#   true 1      0       2       1        2   1   1   2/3  2/3  2/3
#   true 2      0       0       1        1   1   0   1/2  1    2/3
#
# macro P = R = (1 + 2/3 + 1/2) / 3 = 13/18, macro F1 = 2/3; micro P = R = F1 = 4/6.
# MCC (Gorodkin): s = 6, c = 4, pred counts (1, 3, 2), true counts (2, 3, 1):
# (4*6 - (1*2 + 3*3 + 2*1)) / sqrt((36 - 14) * (36 - 14)) = 11 / 22 = 1/2.
REFS3 = [0, 0, 1, 1, 1, 2]
PREDS3 = [0, 1, 1, 1, 2, 2]

# Binary, positive = 1: TP = 1 (index 0), FP = 1 (index 3), FN = 2 (indices 1, 2), TN = 1.
# P = 1/2, R = 1/3, F1 = 2 * (1/6) / (5/6) = 2/5.
# Positive = 0: TP = 1 (index 4), predicted 0 three times, true 0 twice: P = 1/3, R = 1/2,
# F1 = 2/5. MCC = (TP*TN - FP*FN) / sqrt(2 * 3 * 2 * 3) = (1 - 2) / 6 = -1/6.
REFS2 = [1, 1, 1, 0, 0]
PREDS2 = [1, 0, 0, 1, 0]


def approx(d: dict[str, float]) -> dict[str, float]:
    return pytest.approx(d, abs=1e-12)


def test_accuracy():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert metrics.accuracy(PREDS3, REFS3) == pytest.approx(4 / 6)
    assert metrics.accuracy(["a", "b"], ["a", "b"]) == 1.0
    # Tensors are compared by value.
    got = metrics.accuracy(torch.tensor([2, 0, 1]), torch.tensor([2, 1, 1]))
    assert got == pytest.approx(2 / 3)


def test_exact_match_normalizes_like_squad():
    preds = ["The Cat!", "a dog", "Paris ", "london", "an  old, man"]
    refs = ["cat", "dog", "paris", "Paris", "old man"]
    # Normalized: cat=cat, dog=dog, paris=paris, london!=paris, "old man"="old man".
    assert metrics.exact_match(preds, refs) == pytest.approx(4 / 5)
    assert metrics.exact_match(preds, refs, normalize=False) == 0.0
    assert metrics.normalize_answer("  The Eiffel\tTower.") == "eiffel tower"
    # "theatre" keeps its "the": articles go only as whole words.
    assert metrics.normalize_answer("The theatre") == "theatre"


def test_exact_match_with_several_answers():
    preds = ["NYC", "Rome", "Oslo"]
    refs = [["New York", "nyc"], ["Milan"], "oslo"]
    assert metrics.exact_match(preds, refs) == pytest.approx(2 / 3)


def test_precision_recall_f1_macro_micro():
    assert metrics.precision_recall_f1(PREDS3, REFS3, "macro") == approx(
        {"precision": 13 / 18, "recall": 13 / 18, "f1": 2 / 3}
    )
    assert metrics.precision_recall_f1(PREDS3, REFS3, "micro") == approx(
        {"precision": 4 / 6, "recall": 4 / 6, "f1": 4 / 6}
    )


def test_precision_recall_f1_binary():
    assert metrics.precision_recall_f1(PREDS2, REFS2, "binary") == approx(
        {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5}
    )
    assert metrics.precision_recall_f1(PREDS2, REFS2, "binary", positive=0) == approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5}
    )
    # String labels: positive "spam" is never predicted, so P = R = F1 = 0, not NaN.
    out = metrics.precision_recall_f1(["ham", "ham"], ["spam", "ham"], "binary", "spam")
    assert out == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_precision_recall_f1_zero_division_counts_as_zero():
    # true (0, 1), pred (0, 0): class 0 P = 1/2, R = 1, F1 = 2/3; class 1 never predicted:
    # P = R = F1 = 0. Macro F1 = 1/3, macro P = 1/4, macro R = 1/2.
    assert metrics.precision_recall_f1([0, 0], [0, 1], "macro") == approx(
        {"precision": 1 / 4, "recall": 1 / 2, "f1": 1 / 3}
    )


def test_matthews_corrcoef():
    assert metrics.matthews_corrcoef(PREDS2, REFS2) == pytest.approx(-1 / 6)
    assert metrics.matthews_corrcoef(PREDS3, REFS3) == pytest.approx(1 / 2)
    assert metrics.matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
    # A constant prediction: the denominator vanishes, MCC is 0.
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0


def test_classification_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    for n, k in [(1, 2), (7, 2), (20, 3), (33, 5)]:
        preds = torch.randint(0, k, (n,), generator=g).tolist()
        refs = torch.randint(0, k, (n,), generator=g).tolist()
        for average in ("macro", "micro"):
            p, r, f, _ = sk.precision_recall_fscore_support(
                refs, preds, average=average, zero_division=0
            )
            got = metrics.precision_recall_f1(preds, refs, average)
            assert got == approx({"precision": p, "recall": r, "f1": f})
        if len(set(preds) | set(refs)) > 1:
            assert metrics.matthews_corrcoef(preds, refs) == pytest.approx(
                sk.matthews_corrcoef(refs, preds), abs=1e-12
            )


HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hello there"]
REFS = [
    "the cat is sitting on the mat",
    "the quick brown fox jumped over the lazy dog",
    "hello there general",
]


def test_bleu_and_chrf_match_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    assert metrics.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert metrics.chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    plus = sacrebleu.corpus_chrf(HYPS, [REFS], word_order=2).score
    assert metrics.chrf(HYPS, REFS, word_order=2) == pytest.approx(plus)
    lower = sacrebleu.corpus_bleu([h.upper() for h in HYPS], [REFS], lowercase=True).score
    assert metrics.bleu([h.upper() for h in HYPS], REFS, lowercase=True) == pytest.approx(lower)
    # A perfect corpus scores 100.
    assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
    assert metrics.chrf(REFS, REFS) == pytest.approx(100.0)


def test_bleu_with_several_references():
    sacrebleu = pytest.importorskip("sacrebleu")
    second = ["a cat sat on the mat", "a quick brown fox jumps over the lazy dog", "hi there"]
    per_hyp = [[a, b] for a, b in zip(REFS, second, strict=True)]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, second]).score
    assert metrics.bleu(HYPS, per_hyp) == pytest.approx(expected)
    expected = sacrebleu.corpus_chrf(HYPS, [REFS, second]).score
    assert metrics.chrf(HYPS, per_hyp) == pytest.approx(expected)
    # A different number of references per hypothesis: sacrebleu's None marks the gap.
    ragged = [[REFS[0], second[0]], [REFS[1]], [REFS[2], second[2]]]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, [second[0], None, second[2]]]).score
    assert metrics.bleu(HYPS, ragged) == pytest.approx(expected)


def test_rouge_matches_rouge_score():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    types = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(types))
    expected = {
        t: sum(scorer.score(r, h)[t].fmeasure for h, r in zip(HYPS, REFS, strict=True)) / len(HYPS)
        for t in types
    }
    assert metrics.rouge(HYPS, REFS) == pytest.approx(expected)
    stem = rouge_scorer.RougeScorer(["rougeLsum"], use_stemmer=True)
    expected = sum(stem.score(r, h)["rougeLsum"].fmeasure for h, r in zip(HYPS, REFS, strict=True))
    got = metrics.rouge(HYPS, REFS, types=["rougeLsum"], use_stemmer=True)
    assert got == pytest.approx({"rougeLsum": expected / len(HYPS)})


def test_rouge_by_hand():
    pytest.importorskip("rouge_score")
    # "the cat sat" vs "the cat sat down": unigrams P = 3/3, R = 3/4, F = 6/7; bigrams
    # P = 2/2, R = 2/3, F = 4/5; the LCS is the whole prediction: as rouge1.
    got = metrics.rouge(["the cat sat"], ["the cat sat down"])
    assert got == pytest.approx({"rouge1": 6 / 7, "rouge2": 4 / 5, "rougeL": 6 / 7})
    # With two references the better one counts: the identical one gives 1.
    assert metrics.rouge(["the cat sat"], [["a dog", "the cat sat"]], types=["rouge1"]) == {
        "rouge1": pytest.approx(1.0)
    }


def test_demographic_parity_difference():
    preds = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    groups = ["a", "a", "a", "a", "b", "b", "b", "b", "c", "c"]
    # Positive rates: a 3/4, b 1/4, c 2/2.
    assert metrics.positive_rates(preds, groups) == approx({"a": 3 / 4, "b": 1 / 4, "c": 1.0})
    assert metrics.demographic_parity_difference(preds, groups) == pytest.approx(3 / 4)
    # Rates of the other class: a 1/4, b 3/4, c 0.
    assert metrics.demographic_parity_difference(preds, groups, positive=0) == pytest.approx(3 / 4)
    assert metrics.demographic_parity_difference([1, 0], ["x", "x"]) == 0.0
    assert metrics.demographic_parity_difference([1, 0, 1, 0], [0, 0, 1, 1]) == 0.0


@pytest.mark.parametrize(
    "fn", [metrics.accuracy, metrics.matthews_corrcoef, metrics.precision_recall_f1]
)
def test_classification_errors(fn):
    with pytest.raises(ValueError, match="predictions has 2 items but references has 3"):
        fn([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="predictions is empty"):
        fn([], [])
    with pytest.raises(TypeError, match="predictions must be a sequence"):
        fn(3, [1])
    with pytest.raises(TypeError, match="single string"):
        fn("abc", ["a", "b", "c"])


def test_argument_errors():
    with pytest.raises(ValueError, match="average must be"):
        metrics.precision_recall_f1([0], [0], average="weighted")
    with pytest.raises(ValueError, match="average='binary' needs at most two labels"):
        metrics.precision_recall_f1([0, 1, 2], [0, 1, 2], average="binary")
    with pytest.raises(ValueError, match="predictions has 2 items but references has 1"):
        metrics.exact_match(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"predictions\[1\] must be a str"):
        metrics.exact_match(["a", 3], ["a", "b"])
    with pytest.raises(ValueError, match=r"references\[0\] has no reference"):
        metrics.exact_match(["a"], [[]])
    with pytest.raises(ValueError, match="hypotheses is empty"):
        metrics.bleu([], [])
    with pytest.raises(TypeError, match=r"hypotheses\[0\] must be a str"):
        metrics.chrf([None], ["x"])
    with pytest.raises(ValueError, match="word_order"):
        metrics.chrf(["a"], ["a"], word_order=-1)
    with pytest.raises(ValueError, match="types must name"):
        metrics.rouge(["a"], ["a"], types=["rouge0"])
    with pytest.raises(ValueError, match="predictions has 2 items but groups has 1"):
        metrics.demographic_parity_difference([1, 0], ["a"])


def test_missing_libraries_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails, as when not installed
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
    with pytest.raises(ImportError, match=r"fastlm\[eval\].*sacrebleu"):
        metrics.bleu(["a"], ["a"])
    with pytest.raises(ImportError, match=r"fastlm\[eval\].*sacrebleu"):
        metrics.chrf(["a"], ["a"])
    with pytest.raises(ImportError, match=r"fastlm\[eval\].*rouge-score"):
        metrics.rouge(["a"], ["a"])


def test_imports_without_the_eval_extra():
    # Block sacrebleu and rouge_score (as on a machine without them): fastlm.eval.metrics
    # must still import and compute what needs neither.
    code = (
        "import sys; sys.modules['sacrebleu'] = None; sys.modules['rouge_score'] = None\n"
        "from fastlm.eval import metrics\n"
        "print(metrics.accuracy([1, 0], [1, 1]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert math.isclose(float(out.stdout), 0.5)
