"""GLUE-style sentence classification data: examples read from a local TSV / JSONL file
of sentences or sentence pairs with labels, the label set, and BERT's input encoding.

1. examples: :func:`read_examples` takes the text column(s) and the label column by name (a
   TSV's header row, as GLUE's own files have: SST-2 ``sentence``/``label``, MRPC
   ``#1 String``/``#2 String``/``Quality``) or JSONL fields;
2. labels: a :class:`GlueTask` numbers the training file's label names (integers in numeric
   order, other strings sorted); a validation label the training file lacks is an error,
   not a silent extra class;
3. features: :func:`encode` gives ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with token
   types 0/1, truncated longest-first to ``max_length``, padded to the longest example of
   the split; :class:`ClassificationDataset` pairs them with the targets.

The fine-tuning job that uses them is :mod:`fastlm.train.finetune`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastlm.data.corpus import iter_jsonl
from fastlm.data.tokenizer import Tokenizer

# fastlm's trained tokenizers name the special tokens <cls>/<sep>/<pad>, BERT's vocabularies
# [CLS]/[SEP]/[PAD].
_SPECIALS = {"cls": ("<cls>", "[CLS]"), "sep": ("<sep>", "[SEP]"), "pad": ("<pad>", "[PAD]")}
_INTEGER = re.compile(r"[+-]?\d+")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class GlueExample:
    """One row of a data file: its 1-based line, its text(s) and its label as read (a label
    name, or a number for regression)."""

    line: int
    texts: tuple[str, ...]
    label: str | float


def _label_name(value: Any, where: str) -> str:
    if isinstance(value, bool):  # JSON true/false (BoolQ-style), spelled as JSON spells them
        return json.dumps(value)
    if isinstance(value, (int, str)):
        return str(value)
    raise ValueError(
        f"{where}: label {value!r} must be an int or a string for "
        f"classification (a number needs --regression)"
    )


def _regression_target(value: Any, where: str) -> float:
    target = math.nan
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # not a number: reported below
            target = float(value)
    if not math.isfinite(target):
        raise ValueError(f"{where}: label {value!r} is not a finite number (--regression)")
    return target


def _tsv_rows(path: Path, fields: Sequence[str], header: bool) -> list[tuple[int, list[str]]]:
    """(line, the ``fields`` columns) of each row; columns by header name, or 0-based number
    when ``header`` is False. Quotes are text, as in GLUE's files (``csv.QUOTE_NONE``)."""
    # utf-8-sig: MRPC's files open with a byte-order mark, which would hide the first name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = [(line, row) for line, row in enumerate(reader, 1) if row]
    if header:
        if not rows:
            raise ValueError(f"{path} is empty (a TSV file starts with a header row)")
        (_, names), rows = rows[0], rows[1:]
        missing = [f for f in fields if f not in names]
        if missing:
            raise ValueError(
                f"{path} has no column {', '.join(map(repr, missing))}; its "
                f"columns: {', '.join(map(repr, names))}"
            )
        width, columns = len(names), [names.index(f) for f in fields]
    else:
        bad = [f for f in fields if not f.isdigit()]
        if bad:
            raise ValueError(
                f"without a header row, fields are 0-based column numbers, got "
                f"{', '.join(map(repr, bad))}"
            )
        width, columns = None, [int(f) for f in fields]
    out = []
    for line, row in rows:
        if width is not None and len(row) != width:
            raise ValueError(f"{path}:{line}: {len(row)} columns, the header has {width}")
        if max(columns) >= len(row):
            raise ValueError(f"{path}:{line}: {len(row)} columns, no column {max(columns)}")
        out.append((line, [row[c] for c in columns]))
    return out


def _jsonl_rows(path: Path, fields: Sequence[str]) -> list[tuple[int, list[Any]]]:
    out = []
    for line, record in iter_jsonl(path):
        missing = [f for f in fields if f not in record]
        if missing:
            raise ValueError(
                f"{path}:{line}: no field {', '.join(map(repr, missing))}; "
                f"fields: {', '.join(map(repr, record))}"
            )
        out.append((line, [record[f] for f in fields]))
    return out


def read_examples(
    path: str | Path,
    text_fields: Sequence[str],
    label_field: str,
    regression: bool = False,
    header: bool = True,
) -> list[GlueExample]:
    """The examples of a ``.tsv`` (a header row naming the columns, unless ``header`` is
    False: then fields are 0-based column numbers, for header-less files such as GLUE's
    CoLA) or ``.jsonl`` file (one object per line). ``text_fields`` names one column
    (single sentences) or two (pairs); labels are read as names (ints and strings), or as
    numbers when ``regression``."""
    path = Path(path)
    if len(text_fields) not in (1, 2):
        raise ValueError(f"text_fields must name one or two fields, got {list(text_fields)}")
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    fields = [*text_fields, label_field]
    if path.suffix == ".tsv":
        rows: list[tuple[int, list[Any]]] = _tsv_rows(path, fields, header)
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path, fields)
    else:
        raise ValueError(f"{path}: the data format is told by the suffix, .tsv or .jsonl")
    examples = []
    for line, values in rows:
        where = f"{path}:{line}"
        for field, text in zip(text_fields, values[:-1], strict=True):
            if not isinstance(text, str):
                raise ValueError(
                    f"{where}: field {field!r} must be a string, got {type(text).__name__}"
                )
        label = values[-1]
        label = _regression_target(label, where) if regression else _label_name(label, where)
        examples.append(GlueExample(line, tuple(values[:-1]), label))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """What the classifier predicts: ``labels``, the class names by id, or none for
    regression (one output, a real number)."""

    labels: tuple[str, ...] = ()

    @classmethod
    def from_examples(cls, examples: Sequence[GlueExample], regression: bool) -> GlueTask:
        """Regression, or the label names of ``examples``: integers in numeric order (so
        GLUE's "0"/"1" get ids 0/1), else sorted as strings; stable for a given set."""
        if regression:
            return cls()
        names = {e.label for e in examples}
        if all(_INTEGER.fullmatch(n) for n in names):
            return cls(tuple(sorted(names, key=lambda n: (int(n), n))))
        return cls(tuple(sorted(names)))

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1

    def targets(self, examples: Sequence[GlueExample], path: str | Path) -> Tensor:
        """The labels of ``examples`` (read from ``path``) as model targets: (N,) int64
        class ids, or float32 numbers for regression."""
        if self.regression:
            return torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
        ids = {name: i for i, name in enumerate(self.labels)}
        for e in examples:
            if e.label not in ids:
                raise ValueError(
                    f"{path}:{e.line}: label {e.label!r} does not occur in the "
                    f"training file (its labels: "
                    f"{', '.join(map(repr, self.labels))})"
                )
        return torch.tensor([ids[e.label] for e in examples], dtype=torch.int64)

    def save(self, path: Path) -> None:
        kind = "regression" if self.regression else "classification"
        path.write_text(json.dumps({"task": kind, "labels": list(self.labels)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> GlueTask:
        try:
            labels = json.loads(path.read_text())["labels"]
        except (ValueError, KeyError, TypeError):
            labels = None
        if not (isinstance(labels, list) and all(isinstance(n, str) for n in labels)):
            expected = '{"labels": [names...]}'
            raise ValueError(f"{path}: expected {expected}, as fastlm finetune writes it")
        return cls(tuple(labels))


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of the classification token, the separator and padding: fastlm's
    ``<cls>``/``<sep>``/``<pad>`` or BERT's ``[CLS]``/``[SEP]``/``[PAD]``."""
    ids = {}
    for role, names in _SPECIALS.items():
        found = [i for i in map(tokenizer.token_id, names) if i is not None]
        if not found:
            raise ValueError(
                f"the tokenizer has no {' or '.join(names)} token (needed for "
                f"sentence classification)"
            )
        ids[role] = found[0]
    return ids


def truncated_lengths(a: int, b: int, budget: int) -> tuple[int, int]:
    """Lengths of two token lists truncated longest-first to ``a + b <= budget``, as the
    ``tokenizers`` library (Hugging Face's fast tokenizers) cuts pairs: the shorter keeps
    all of its tokens while it fits in half of the budget, else each gets half and the
    longer (the second on a tie) the odd token."""
    if a + b <= budget:
        return a, b
    if 2 * min(a, b) <= budget:
        return (a, budget - a) if a < b else (budget - b, b)
    low, high = budget // 2, budget - budget // 2
    return (high, low) if a > b else (low, high)


def encode(
    tokenizer: Tokenizer, texts: Sequence[tuple[str, ...]], max_length: int
) -> dict[str, Tensor]:
    """BERT inputs of single sentences ``(a,)`` or pairs ``(a, b)``: ``[CLS] a [SEP]`` or
    ``[CLS] a [SEP] b [SEP]``, token types 0 up to the first [SEP] and 1 after, truncated
    longest-first to ``max_length`` tokens. Returns (N, L) int64 ``input_ids``,
    ``attention_mask`` (1: token, 0: padding) and ``token_type_ids``, L the longest
    encoded example (right padding with the pad token)."""
    if not texts:
        raise ValueError("texts is empty")
    pair = len(texts[0]) == 2
    if any(len(t) != len(texts[0]) for t in texts):
        raise ValueError("texts must all be single sentences or all be pairs")
    budget = max_length - (3 if pair else 2)
    if budget < 1:
        raise ValueError(
            f"max_length {max_length} leaves no room for text after the special tokens"
        )
    ids = special_ids(tokenizer)
    first = tokenizer.encode_batch([t[0] for t in texts])
    second = tokenizer.encode_batch([t[1] for t in texts]) if pair else [[] for _ in texts]
    rows, types = [], []
    for a, b in zip(first, second, strict=True):
        la, lb = truncated_lengths(len(a), len(b), budget)
        head = [ids["cls"], *a[:la], ids["sep"]]
        tail = [*b[:lb], ids["sep"]] if pair else []
        rows.append(head + tail)
        types.append([0] * len(head) + [1] * len(tail))
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), ids["pad"], dtype=torch.int64)
    token_type_ids = torch.zeros((len(rows), length), dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, (row, row_types) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        token_type_ids[i, : len(row)] = torch.tensor(row_types)
        attention_mask[i, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }


class ClassificationDataset(Dataset):
    """Encoded examples with their targets: item ``i`` is a dict of (L,) ``input_ids``,
    ``attention_mask``, ``token_type_ids`` and a scalar ``labels``, the forward keyword
    arguments of :class:`BertForSequenceClassification` (what the Trainer reads)."""

    def __init__(self, features: dict[str, Tensor], labels: Tensor) -> None:
        if any(t.shape[0] != labels.shape[0] for t in features.values()):
            raise ValueError(
                f"features and labels must hold the same number of examples, "
                f"got {[t.shape[0] for t in features.values()]} and "
                f"{labels.shape[0]}"
            )
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {**{k: v[index] for k, v in self.features.items()}, "labels": self.labels[index]}
