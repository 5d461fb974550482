"""Task metrics on plain Python values: classification (accuracy, precision/recall/F1,
Matthews correlation), regression (Pearson and Spearman correlation), question answering
(exact match), generated text (BLEU and chrF through ``sacrebleu``, ROUGE through
``rouge-score``) and group fairness (demographic parity difference).

Inputs are sequences of equal, non-zero length; tensors and arrays are accepted and read
with ``tolist()``. Classification and QA scores are fractions in [0, 1]; BLEU and chrF are
on sacrebleu's 0-100 scale, as papers report them; ROUGE F-measures are in [0, 1], as
rouge-score returns them.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _as_list(name: str, values: Any) -> list:
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of items, got a single string")
    if hasattr(values, "tolist"):  # tensors and arrays: compare values, not objects
        values = values.tolist()
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}") from None
    if not values:
        raise ValueError(f"{name} is empty")
    return values


def _pair(a_name: str, a: Any, b_name: str, b: Any) -> tuple[list, list]:
    a, b = _as_list(a_name, a), _as_list(b_name, b)
    if len(a) != len(b):
        raise ValueError(f"{a_name} has {len(a)} items but {b_name} has {len(b)}")
    return a, b


def _check_strings(name: str, values: list) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(v).__name__}")


def _reference_lists(name: str, references: list) -> list[list[str]]:
    """Each reference as a non-empty list of strings (one string: one reference)."""
    out = []
    for i, ref in enumerate(references):
        refs = [ref] if isinstance(ref, str) else list(ref)
        if not refs:
            raise ValueError(f"{name}[{i}] has no reference")
        _check_strings(f"{name}[{i}]", refs)
        out.append(refs)
    return out


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this metric needs {package}: pip install 'fastlm[eval]' (or {package})"
        ) from e


def accuracy(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Share of positions where the prediction equals the reference."""
    predictions, references = _pair("predictions", predictions, "references", references)
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lowercase, drop punctuation and the articles a/an/the,
    collapse whitespace (so "The Eiffel  Tower." matches "eiffel tower")."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], normalize: bool = True
) -> float:
    """Share of predictions equal to their reference, after ``normalize_answer`` unless
    ``normalize`` is False. A reference may be a list of acceptable answers (SQuAD lists
    several): a prediction matching any of them counts."""
    predictions, references = _pair("predictions", predictions, "references", references)
    _check_strings("predictions", predictions)
    golds = _reference_lists("references", references)

    def norm(s: str) -> str:
        return normalize_answer(s) if normalize else s

    hits = sum(norm(p) in {norm(g) for g in gs} for p, gs in zip(predictions, golds, strict=True))
    return hits / len(predictions)


def _confusion(predictions: list, references: list) -> tuple[list, dict]:
    """Labels (sorted when they can be) and counts keyed by (reference, prediction)."""
    labels = set(predictions) | set(references)
    try:
        labels = sorted(labels)
    except TypeError:  # mixed types: any fixed order will do
        labels = sorted(labels, key=repr)
    return labels, Counter(zip(references, predictions, strict=True))


def _ratio(num: float, den: float) -> float:
    # A class never predicted (or never present) has precision (recall) 0, as scikit-learn
    # reports it by default, rather than NaN poisoning the average.
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def precision_recall_f1(
    predictions: Sequence[Hashable],
    references: Sequence[Hashable],
    average: str = "macro",
    positive: Hashable = 1,
) -> dict[str, float]:
    """Precision, recall and F1 of single-label classification, as ``{"precision",
    "recall", "f1"}``.

    ``average``: "macro" takes each metric per class (every label seen in either input),
    then the unweighted mean (F1 is the mean of per-class F1s, as scikit-learn's);
    "micro" pools true/false positives over classes (for single-label data all three then
    equal accuracy); "binary" scores the class ``positive`` alone and needs at most two
    labels. A ratio with a zero denominator is 0.
    """
    predictions, references = _pair("predictions", predictions, "references", references)
    labels, counts = _confusion(predictions, references)
    pred_count, ref_count = Counter(predictions), Counter(references)
    tp = {c: counts[(c, c)] for c in labels}
    if average == "binary":
        if len(labels) > 2:
            raise ValueError(
                f"average='binary' needs at most two labels, got {len(labels)}: {labels!r}; "
                "use 'macro' or 'micro'"
            )
        p = _ratio(tp.get(positive, 0), pred_count[positive])
        r = _ratio(tp.get(positive, 0), ref_count[positive])
        return {"precision": p, "recall": r, "f1": _f1(p, r)}
    if average == "micro":
        total_tp = sum(tp.values())
        p = _ratio(total_tp, sum(pred_count.values()))
        r = _ratio(total_tp, sum(ref_count.values()))
        return {"precision": p, "recall": r, "f1": _f1(p, r)}
    if average == "macro":
        ps = [_ratio(tp[c], pred_count[c]) for c in labels]
        rs = [_ratio(tp[c], ref_count[c]) for c in labels]
        fs = [_f1(p, r) for p, r in zip(ps, rs, strict=True)]
        n = len(labels)
        return {"precision": sum(ps) / n, "recall": sum(rs) / n, "f1": sum(fs) / n}
    raise ValueError(f"average must be 'macro', 'micro' or 'binary', got {average!r}")


def matthews_corrcoef(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Matthews correlation coefficient in [-1, 1] (GLUE's CoLA metric), in Gorodkin's
    multiclass form, which reduces to (TP*TN - FP*FN) / sqrt(...) for two classes:
    (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)) with c the
    correct count, s the total, p_k / t_k how often class k is predicted / true. 0 when a
    side is constant (the denominator vanishes), as scikit-learn returns."""
    predictions, references = _pair("predictions", predictions, "references", references)
    pred_count, ref_count = Counter(predictions), Counter(references)
    labels = set(pred_count) | set(ref_count)
    s = len(references)
    c = sum(p == r for p, r in zip(predictions, references, strict=True))
    pt = sum(pred_count[k] * ref_count[k] for k in labels)
    den = (s * s - sum(v * v for v in pred_count.values())) * (
        s * s - sum(v * v for v in ref_count.values())
    )
    return (c * s - pt) / math.sqrt(den) if den else 0.0


def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Per-hypothesis reference lists as sacrebleu's reference streams (stream j holds
    every hypothesis's j-th reference; None where a hypothesis has fewer)."""
    width = max(len(r) for r in references)
    return [[r[j] if j < len(r) else None for r in references] for j in range(width)]


def _text_inputs(hypotheses: Any, references: Any) -> tuple[list[str], list[list[str]]]:
    hypotheses, references = _pair("hypotheses", hypotheses, "references", references)
    _check_strings("hypotheses", hypotheses)
    return hypotheses, _reference_lists("references", references)


def bleu(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """Corpus BLEU (0-100) of ``hypotheses`` against ``references``: one reference string
    per hypothesis, or a list of references per hypothesis (their counts may differ).
    sacrebleu's defaults (13a tokenization, exponential smoothing), so scores compare with
    published sacrebleu numbers."""
    hypotheses, refs = _text_inputs(hypotheses, references)
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return sacrebleu.corpus_bleu(
        hypotheses, _reference_streams(refs), tokenize=tokenize, lowercase=lowercase
    ).score


def chrf(
    hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], word_order: int = 0
) -> float:
    """Corpus chrF (0-100) through sacrebleu; ``word_order=2`` is chrF++. References as in
    ``bleu``."""
    hypotheses, refs = _text_inputs(hypotheses, references)
    if not isinstance(word_order, int) or word_order < 0:
        raise ValueError(f"word_order must be a non-negative int, got {word_order!r}")
    sacrebleu = _require("sacrebleu", "sacrebleu")
    return sacrebleu.corpus_chrf(hypotheses, _reference_streams(refs), word_order=word_order).score


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = False,
) -> dict[str, float]:
    """Mean ROUGE F-measure over (prediction, reference) pairs for each of ``types``
    (rouge-score's names: "rouge1".."rouge9", "rougeL", "rougeLsum"), in [0, 1]. With
    several references per prediction, each pair takes the best-scoring one
    (rouge-score's ``score_multi``)."""
    predictions, refs = _text_inputs(predictions, references)
    types = [types] if isinstance(types, str) else list(types)
    if not types:
        raise ValueError("types is empty")
    valid = re.compile(r"rouge([1-9]|L|Lsum)")
    bad = [t for t in types if not isinstance(t, str) or not valid.fullmatch(t)]
    if bad:
        raise ValueError(f"types must name rouge1..rouge9, rougeL or rougeLsum, got {bad!r}")
    rouge_scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(types, use_stemmer=use_stemmer)
    totals = dict.fromkeys(types, 0.0)
    for pred, targets in zip(predictions, refs, strict=True):
        scores = scorer.score_multi(targets, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: total / len(predictions) for t, total in totals.items()}


def positive_rates(
    predictions: Sequence[Hashable], groups: Sequence[Hashable], positive: Hashable = 1
) -> dict[Hashable, float]:
    """Per group, the share of its members predicted ``positive``."""
    predictions, groups = _pair("predictions", predictions, "groups", groups)
    members = Counter(groups)
    hits = Counter(g for p, g in zip(predictions, groups, strict=True) if p == positive)
    return {g: hits[g] / n for g, n in members.items()}


def demographic_parity_difference(
    predictions: Sequence[Hashable], groups: Sequence[Hashable], positive: Hashable = 1
) -> float:
    """Largest minus smallest positive-prediction rate across groups: 0 when the classifier
    says ``positive`` equally often for every group (a single group gives 0)."""
    rates = positive_rates(predictions, groups, positive).values()
    return max(rates) - min(rates)


# -- correlation (regression scores: GLUE's STS-B) ----------------------------------------


def pearson(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Pearson's correlation coefficient (NaN when either side is constant: undefined)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
        raise ValueError(
            f"x and y must be 1-D of one length >= 2, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / den if den else math.nan


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks from 0, ties sharing the mean of the ranks they span."""
    order = torch.argsort(x, stable=True)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(x)
    ranks[order] = (ends - (counts.double() + 1) / 2)[group]
    return ranks


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties averaged (as SciPy's)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(
            f"x and y must be 1-D of one length, got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return pearson(_average_ranks(x), _average_ranks(y))
