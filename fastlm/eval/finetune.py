"""GLUE-style fine-tuning: a BERT sequence classifier (or regressor) trained on a local
TSV / JSONL file of sentences or sentence pairs with labels, then scored on a validation
file the way GLUE scores its tasks; the ``fastlm finetune`` job.

1. examples: ``read_examples`` takes the text column(s) and the label column by name (a
   TSV's header row, as GLUE's own files have: SST-2 ``sentence``/``label``, MRPC
   ``#1 String``/``#2 String``/``Quality``) or JSONL fields;
2. labels: a :class:`Task` numbers the training file's label names (integers in numeric
   order, other strings sorted) and is saved beside the model; a validation label the
   training file lacks is an error, not a silent extra class;
3. features: ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` with token types 0/1, truncated
   longest-first to ``max_length``, padded to the longest example of the split (the
   Trainer stacks equal shapes; that is usually far below ``max_length``);
4. model: :class:`BertForSequenceClassification` whose encoder comes from a ``fastlm train
   --model bert`` checkpoint or a Hugging Face BERT directory (the classifier starts fresh),
   or a preset trained from scratch with a BPE tokenizer fitted to the training texts;
5. training: :class:`fastlm.train.Trainer` (AdamW, linear warmup over 10% of the steps then
   linear decay to 0, as BERT fine-tunes), validating with GLUE's metrics each
   ``eval_every`` steps; the checkpoint (with ``tokenizer.json`` and ``labels.json``) loads
   back with :func:`load_classifier`.

Metrics: accuracy, F1 and Matthews correlation for classification (F1 of the positive class
for two labels, as GLUE's MRPC/QQP, else the macro average over classes), Pearson and
Spearman correlation for regression (``num_labels`` 1, STS-B).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fastlm.data import Tokenizer
from fastlm.data.corpus import iter_jsonl
from fastlm.eval import metrics
from fastlm.models import presets
from fastlm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)
from fastlm.models.hf import from_hf
from fastlm.parallel import unwrap
from fastlm.parallel.checkpoint import load_sharded
from fastlm.train import Trainer, TrainingDiverged
from fastlm.train import checkpoint as ckpt
from fastlm.train import run as train_run
from fastlm.train.config import PRECISIONS, TrainConfig
from fastlm.train.run import model_of

LABELS_FILE = "labels.json"  # in each checkpoint: the Task (label names by id)
PREDICTIONS_FILE = "predictions.jsonl"
RESULTS_FILE = "results.json"

# fastlm's trained tokenizers name the special tokens <cls>/<sep>/<pad>, BERT's vocabularies
# [CLS]/[SEP]/[PAD].
_SPECIALS = {"cls": ("<cls>", "[CLS]"), "sep": ("<sep>", "[SEP]"), "pad": ("<pad>", "[PAD]")}
_INTEGER = re.compile(r"[+-]?\d+")


# -- examples --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
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
    raise ValueError(f"{where}: label {value!r} must be an int or a string for "
                     f"classification (a number needs --regression)")  # fmt: skip


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
            raise ValueError(f"{path} has no column {', '.join(map(repr, missing))}; its "
                             f"columns: {', '.join(map(repr, names))}")  # fmt: skip
        width, columns = len(names), [names.index(f) for f in fields]
    else:
        bad = [f for f in fields if not f.isdigit()]
        if bad:
            raise ValueError(f"without a header row, fields are 0-based column numbers, got "
                             f"{', '.join(map(repr, bad))}")  # fmt: skip
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
            raise ValueError(f"{path}:{line}: no field {', '.join(map(repr, missing))}; "
                             f"fields: {', '.join(map(repr, record))}")  # fmt: skip
        out.append((line, [record[f] for f in fields]))
    return out


def read_examples(path: str | Path, text_fields: Sequence[str], label_field: str,
                  regression: bool = False, header: bool = True) -> list[Example]:  # fmt: skip
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
                raise ValueError(f"{where}: field {field!r} must be a string, got "
                                 f"{type(text).__name__}")  # fmt: skip
        label = values[-1]
        label = _regression_target(label, where) if regression else _label_name(label, where)
        examples.append(Example(line, tuple(values[:-1]), label))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


# -- labels ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """What the classifier predicts: ``labels``, the class names by id, or none for
    regression (one output, a real number)."""

    labels: tuple[str, ...] = ()

    @classmethod
    def from_examples(cls, examples: Sequence[Example], regression: bool) -> Task:
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

    def targets(self, examples: Sequence[Example], path: str | Path) -> Tensor:
        """The labels of ``examples`` (read from ``path``) as model targets: (N,) int64
        class ids, or float32 numbers for regression."""
        if self.regression:
            return torch.tensor([float(e.label) for e in examples], dtype=torch.float32)
        ids = {name: i for i, name in enumerate(self.labels)}
        for e in examples:
            if e.label not in ids:
                raise ValueError(f"{path}:{e.line}: label {e.label!r} does not occur in the "
                                 f"training file (its labels: "
                                 f"{', '.join(map(repr, self.labels))})")  # fmt: skip
        return torch.tensor([ids[e.label] for e in examples], dtype=torch.int64)

    def save(self, path: Path) -> None:
        kind = "regression" if self.regression else "classification"
        path.write_text(json.dumps({"task": kind, "labels": list(self.labels)}, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Task:
        return cls(tuple(json.loads(path.read_text())["labels"]))


# -- features --------------------------------------------------------------------------------


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of the classification token, the separator and padding: fastlm's
    ``<cls>``/``<sep>``/``<pad>`` or BERT's ``[CLS]``/``[SEP]``/``[PAD]``."""
    ids = {}
    for role, names in _SPECIALS.items():
        found = [i for i in map(tokenizer.token_id, names) if i is not None]
        if not found:
            raise ValueError(f"the tokenizer has no {' or '.join(names)} token (needed for "
                             f"sentence classification)")  # fmt: skip
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


def encode(tokenizer: Tokenizer, texts: Sequence[tuple[str, ...]],
           max_length: int) -> dict[str, Tensor]:  # fmt: skip
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
        raise ValueError(f"max_length {max_length} leaves no room for text after the "
                         f"special tokens")  # fmt: skip
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
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "token_type_ids": token_type_ids}  # fmt: skip


class ClassificationDataset(Dataset):
    """Encoded examples with their targets: item ``i`` is a dict of (L,) ``input_ids``,
    ``attention_mask``, ``token_type_ids`` and a scalar ``labels``, the forward keyword
    arguments of :class:`BertForSequenceClassification` (what the Trainer reads)."""

    def __init__(self, features: dict[str, Tensor], labels: Tensor) -> None:
        if any(t.shape[0] != labels.shape[0] for t in features.values()):
            raise ValueError(f"features and labels must hold the same number of examples, "
                             f"got {[t.shape[0] for t in features.values()]} and "
                             f"{labels.shape[0]}")  # fmt: skip
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {**{k: v[index] for k, v in self.features.items()}, "labels": self.labels[index]}


# -- metrics ---------------------------------------------------------------------------------


def pearson(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Pearson's correlation coefficient (NaN when either side is constant: undefined)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"x and y must be 1-D of one length >= 2, got shapes "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")  # fmt: skip
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    return float((xc * yc).sum()) / den if den else math.nan


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks from 0, ties sharing the mean of the ranks they span."""
    order = torch.argsort(x, stable=True)
    _, group, counts = torch.unique_consecutive(x[order], return_inverse=True,
                                                return_counts=True)  # fmt: skip
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(x)
    ranks[order] = (ends - (counts.double() + 1) / 2)[group]
    return ranks


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman's rank correlation: Pearson's on the ranks, ties averaged (as SciPy's)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must be 1-D of one length, got shapes {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")  # fmt: skip
    return pearson(_average_ranks(x), _average_ranks(y))


def glue_metrics(task: Task, outputs: Tensor, labels: Tensor,
                 positive: int = 1) -> dict[str, float]:  # fmt: skip
    """GLUE's scores of ``outputs`` (N, num_labels) against ``labels`` (N,): accuracy, F1
    (of class id ``positive`` for two labels, macro-averaged otherwise) and Matthews
    correlation; for regression Pearson and Spearman correlation."""
    if task.regression:
        predicted = outputs[:, 0].double()
        return {"pearson": pearson(predicted, labels), "spearman": spearman(predicted, labels)}
    predicted, gold = outputs.argmax(-1).tolist(), labels.tolist()
    binary = task.num_labels == 2
    f1 = metrics.precision_recall_f1(predicted, gold, average="binary" if binary else "macro",
                                     positive=positive)["f1"]  # fmt: skip
    return {"accuracy": metrics.accuracy(predicted, gold), "f1": f1,
            "matthews_corrcoef": metrics.matthews_corrcoef(predicted, gold)}  # fmt: skip


@torch.no_grad()
def predict(model: nn.Module, data: ClassificationDataset, batch_size: int = 64) -> Tensor:
    """The model's outputs (N, num_labels) float32 for every example of ``data``, in order,
    in eval mode (restored afterwards) on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs = []
    for start in range(0, len(data), batch_size):
        batch = {k: v[start : start + batch_size].to(device) for k, v in data.features.items()}
        outputs.append(model(**batch).logits.float().cpu())
    model.train(was_training)
    return torch.cat(outputs)


def _loss(task: Task, outputs: Tensor, labels: Tensor) -> float:
    if task.regression:
        return torch.nn.functional.mse_loss(outputs[:, 0].double(), labels.double()).item()
    return torch.nn.functional.cross_entropy(outputs.double(), labels).item()


# -- models ----------------------------------------------------------------------------------


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory, or a run directory's newest (as ``run.load_model`` reads)."""
    if (path / "trainer.json").is_file():
        return path
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise ValueError(f"{path} is neither a checkpoint nor a run directory with one")
    return latest


def load_classifier(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[BertForSequenceClassification, Tokenizer, Task]:  # fmt: skip
    """The fine-tuned model (eval mode), tokenizer and task of a ``fastlm finetune``
    checkpoint, or of its run directory (the newest checkpoint)."""
    path = _checkpoint_dir(Path(path))
    if not (path / LABELS_FILE).is_file():
        raise ValueError(f"{path} is not a fastlm finetune checkpoint (no {LABELS_FILE})")
    model = model_of(path)
    if not isinstance(model, BertForSequenceClassification):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a sequence classifier")
    load_sharded(model, path)
    return model.to(device).eval(), Tokenizer.load(path), Task.load(path / LABELS_FILE)


def _hf_tokenizer(path: Path) -> Tokenizer:
    """A Hugging Face model directory's tokenizer: its ``tokenizer.json``, or BERT's
    WordPiece rebuilt from ``vocab.txt`` (directories written by the slow tokenizer)."""
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path)
    vocab = path / "vocab.txt"
    if not vocab.is_file():
        raise ValueError(f"{path} has no tokenizer.json or vocab.txt")
    settings = path / "tokenizer_config.json"
    settings = json.loads(settings.read_text()) if settings.is_file() else {}
    wordpiece = tokenizers.models.WordPiece.from_file(str(vocab), unk_token="[UNK]")
    tok = tokenizers.Tokenizer(wordpiece)
    # BertTokenizer's default: lowercase (the "uncased" checkpoints) unless told otherwise.
    tok.normalizer = tokenizers.normalizers.BertNormalizer(
        lowercase=settings.get("do_lower_case", True)
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
                            if tok.token_to_id(t) is not None])  # fmt: skip
    return Tokenizer(tok)


def pretrained_encoder(path: str | Path) -> tuple[BertModel, Tokenizer]:
    """The BERT encoder and tokenizer of ``path``: a ``fastlm train --model bert`` checkpoint
    or run directory (a ``fastlm finetune`` one too), or a Hugging Face BERT directory
    (``config.json``, ``*.safetensors``, and ``tokenizer.json`` or ``vocab.txt``)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    if (path / "config.json").is_file():
        try:
            model = from_hf(path)
        except (FileNotFoundError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: {e.args[0]}") from e
        tokenizer = _hf_tokenizer(path)
    elif (path / "trainer.json").is_file() or (path / "checkpoints").is_dir():
        if (_checkpoint_dir(path) / LABELS_FILE).is_file():
            model, tokenizer, _ = load_classifier(path)
        else:
            model, tokenizer = train_run.load_model(path)
    else:
        raise ValueError(f"{path} is neither a fastlm checkpoint (trainer.json) or run "
                         f"directory nor a Hugging Face model directory (config.json)")  # fmt: skip
    if isinstance(model, (BertForMaskedLM, BertForSequenceClassification)):
        model = model.bert
    if not isinstance(model, BertModel):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a BERT model")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, more than "
                         f"the model's {model.config.vocab_size} embeddings")  # fmt: skip
    return model, tokenizer


def classifier_from(encoder: BertModel, num_labels: int) -> BertForSequenceClassification:
    """A float32 :class:`BertForSequenceClassification` with ``encoder``'s weights (pooler
    included) and a freshly initialized classifier of ``num_labels`` outputs."""
    config = dataclasses.replace(encoder.config, num_labels=num_labels)
    model = BertForSequenceClassification(config)
    model.bert.load_state_dict(encoder.state_dict())
    return model


# -- the job ---------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (``fastlm finetune`` flags). Exactly one of ``init`` (a
    pretrained encoder, :func:`pretrained_encoder`) and ``model`` (a BERT preset or
    ``bert``, trained from scratch: tests and demos) is given."""

    train: str
    validation: str
    init: str | None = None
    model: str | None = None
    text_fields: tuple[str, ...] = ("sentence",)
    label_field: str = "label"
    header: bool = True  # TSV files open with a header row naming the columns
    regression: bool = False  # one real-valued output (STS-B), scored by correlation
    positive_label: str | None = None  # F1's class for two labels; None: the second id
    max_length: int = 128
    epochs: int = 3
    # None: 2e-5 from a pretrained encoder (BERT's fine-tuning range is 2e-5..5e-5); 1e-3
    # from scratch, where nothing learned is there to preserve.
    lr: float | None = None
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 0  # steps between validations; 0: once per epoch
    vocab_size: int = 4096  # of the BPE trained for a model from scratch
    precision: str = "auto"
    device: str = "auto"
    out_dir: str = "runs/finetune"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.init is None) == (self.model is None):
            raise ValueError("give exactly one of init (a pretrained encoder) and model (a "
                             "preset trained from scratch)")  # fmt: skip
        self.text_fields = tuple(self.text_fields)
        if len(self.text_fields) not in (1, 2) or not all(self.text_fields):
            raise ValueError(f"text_fields must name one or two fields, got "
                             f"{list(self.text_fields)}")  # fmt: skip
        for name in ("max_length", "epochs", "batch_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")  # fmt: skip
        if self.regression and self.positive_label is not None:
            raise ValueError("positive_label is for classification, not regression")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.init is not None else 1e-3


class FinetuneTrainer(Trainer):
    """The Trainer, validating with GLUE's metrics on the whole validation set (not
    perplexity on its first batches). The last validation's outputs stay in
    ``outputs``."""

    def __init__(self, model: nn.Module, config: TrainConfig, train_data: ClassificationDataset,
                 eval_data: ClassificationDataset, task: Task, positive: int,
                 save_extra: Any) -> None:  # fmt: skip
        super().__init__(model, config, train_data, eval_data, save_extra=save_extra)
        self.task, self.positive = task, positive
        self.outputs: Tensor | None = None

    def evaluate(self) -> dict[str, float]:
        with self.precision.autocast():
            self.outputs = predict(unwrap(self.model), self.eval_data, self.config.batch_size)
        labels = self.eval_data.labels
        loss = _loss(self.task, self.outputs, labels)
        scores = glue_metrics(self.task, self.outputs, labels, self.positive)
        # The Trainer logs val_ppl; for a regression loss there is none.
        ppl = math.nan if self.task.regression else math.exp(min(loss, 700.0))
        return {"val_loss": loss, "val_ppl": ppl, **{f"val_{k}": v for k, v in scores.items()}}


def _say(message: str) -> None:
    print(f"[fastlm finetune] {message}", flush=True)


def _model_and_tokenizer(config: FinetuneConfig, task: Task, train: list[Example]
                         ) -> tuple[BertForSequenceClassification, Tokenizer, str]:  # fmt: skip
    torch.manual_seed(config.seed)  # the classifier's initialization (or the whole model's)
    if config.init is not None:
        encoder, tokenizer = pretrained_encoder(config.init)
        return classifier_from(encoder, task.num_labels), tokenizer, config.init
    preset, overrides = train_run.FAMILIES.get(config.model, (config.model, {}))
    base = presets.config(preset)
    if not isinstance(base, BertConfig):
        raise ValueError(f"model {config.model!r} is not a BERT preset")
    tokenizer = Tokenizer.train([t for e in train for t in e.texts], config.vocab_size)
    positions = max(base.max_position_embeddings, config.max_length)
    fields = {**overrides, "vocab_size": tokenizer.vocab_size, "num_labels": task.num_labels,
              "pad_token_id": special_ids(tokenizer)["pad"],
              "max_position_embeddings": positions}  # fmt: skip
    model = BertForSequenceClassification(presets.config(preset, **fields))
    return model, tokenizer, f"{config.model} from scratch, BPE of {tokenizer.vocab_size} tokens"


def _positive(config: FinetuneConfig, task: Task) -> int:
    if config.positive_label is None:
        return 1
    if task.num_labels != 2:
        raise ValueError(f"positive_label is for two-label tasks; this one has "
                         f"{task.num_labels}")  # fmt: skip
    if config.positive_label not in task.labels:
        raise ValueError(f"positive_label {config.positive_label!r} is not a training label "
                         f"({', '.join(map(repr, task.labels))})")  # fmt: skip
    return task.labels.index(config.positive_label)


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune and score as ``config`` says; writes the checkpoint, ``predictions.jsonl``
    (one line per validation example, in file order: its line, gold label and prediction)
    and ``results.json`` (the scores) into ``out_dir``, and returns the results."""
    t0 = time.perf_counter()
    read = dict(text_fields=config.text_fields, label_field=config.label_field,
                regression=config.regression, header=config.header)  # fmt: skip
    train_examples = read_examples(config.train, **read)
    val_examples = read_examples(config.validation, **read)
    task = Task.from_examples(train_examples, config.regression)
    train_labels = task.targets(train_examples, config.train)
    val_labels = task.targets(val_examples, config.validation)
    positive = _positive(config, task)
    if len(train_examples) < config.batch_size:
        raise ValueError(f"{config.train} holds {len(train_examples)} examples, fewer than "
                         f"batch_size {config.batch_size}")  # fmt: skip
    model, tokenizer, source = _model_and_tokenizer(config, task, train_examples)
    mc = model.config
    if config.max_length > mc.max_position_embeddings:
        raise ValueError(f"max_length {config.max_length} exceeds the model's "
                         f"{mc.max_position_embeddings} positions")  # fmt: skip
    if len(config.text_fields) == 2 and mc.type_vocab_size < 2:
        raise ValueError(f"sentence pairs need two token types; the model has "
                         f"{mc.type_vocab_size}")  # fmt: skip
    train_features = encode(tokenizer, [e.texts for e in train_examples], config.max_length)
    val_features = encode(tokenizer, [e.texts for e in val_examples], config.max_length)
    train_data = ClassificationDataset(train_features, train_labels)
    val_data = ClassificationDataset(val_features, val_labels)
    steps_per_epoch = len(train_data) // config.batch_size
    steps = config.epochs * steps_per_epoch
    train_config = TrainConfig(
        model=config.model or "bert", seq_len=train_features["input_ids"].shape[1],
        batch_size=config.batch_size, max_steps=steps, lr=config.learning_rate,
        warmup_steps=int(config.warmup_ratio * steps), schedule="linear", min_lr_ratio=0.0,
        weight_decay=config.weight_decay, betas=(0.9, 0.999),
        eval_every=config.eval_every or steps_per_epoch,
        log_every=min(10, steps), save_every=steps, keep_last=1, out_dir=config.out_dir,
        seed=config.seed, device=config.device, precision=config.precision,
        progress=config.progress)  # fmt: skip
    kind = "regression" if task.regression else f"{task.num_labels} labels"
    _say(f"{config.train}: {len(train_data)} training, {config.validation}: {len(val_data)} "
         f"validation examples ({kind}); padded to {train_config.seq_len} / "
         f"{val_features['input_ids'].shape[1]} tokens")  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    _say(f"model: {source}, {params / 1e6:.2f}M parameters; {steps} steps ({config.epochs} "
         f"epochs of {steps_per_epoch}), lr {config.learning_rate:g}; set-up took "
         f"{time.perf_counter() - t0:.1f} s")  # fmt: skip

    def save_extra(directory: Path) -> None:
        tokenizer.save(directory / "tokenizer.json")
        task.save(directory / LABELS_FILE)

    trainer = FinetuneTrainer(model, train_config, train_data, val_data, task, positive,
                              save_extra)  # fmt: skip
    t1 = time.perf_counter()
    final = trainer.fit()
    _say(f"trained in {time.perf_counter() - t1:.0f} s; checkpoint: {trainer.last_checkpoint}")
    scores = {k[len("val_") :]: v for k, v in final.items()
              if k.startswith("val_") and k not in ("val_loss", "val_ppl")}  # fmt: skip
    results: dict[str, Any] = {
        "task": "regression" if task.regression else "classification",
        "labels": list(task.labels), "train": config.train, "validation": config.validation,
        "model": source, "num_train": len(train_data), "num_validation": len(val_data),
        "steps": steps, "metrics": scores, "loss": final["val_loss"],
        "checkpoint": str(trainer.last_checkpoint),
        "predictions": str(Path(config.out_dir) / PREDICTIONS_FILE),
    }  # fmt: skip
    if not task.regression:
        results["f1_average"] = "binary" if task.num_labels == 2 else "macro"
        if task.num_labels == 2:
            results["positive_label"] = task.labels[positive]
    if trainer.main:
        _write_outputs(Path(config.out_dir), task, val_examples, trainer.outputs, results)
    return results


def _write_outputs(out_dir: Path, task: Task, examples: list[Example], outputs: Tensor,
                   results: dict[str, Any]) -> None:  # fmt: skip
    with (out_dir / PREDICTIONS_FILE).open("w") as f:
        for e, out in zip(examples, outputs, strict=True):
            prediction = float(out[0]) if task.regression else task.labels[int(out.argmax())]
            record = {"line": e.line, "label": e.label, "prediction": prediction}
            f.write(json.dumps(record) + "\n")
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")


def _metric_name(key: str, results: dict[str, Any]) -> str:
    if key != "f1":
        return key
    if "positive_label" in results:
        return f"f1 (binary, positive {results['positive_label']!r})"
    return f"f1 ({results['f1_average']})"


def format_results(results: dict[str, Any]) -> str:
    """The scores as a two-column table, F1's averaging spelled out."""
    rows = [(_metric_name(k, results), v) for k, v in results["metrics"].items()]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'metric':<{width}}value"]
    lines += [f"{name:<{width}}{value:.4f}" for name, value in rows]
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def parse(argv: Sequence[str]) -> FinetuneConfig:
    parser = argparse.ArgumentParser(
        prog="fastlm finetune",
        description="fine-tune a BERT classifier on a TSV/JSONL file and score it as GLUE does",
    )
    parser.add_argument("--train", required=True, metavar="FILE", help=".tsv or .jsonl")
    parser.add_argument("--validation", required=True, metavar="FILE", help=".tsv or .jsonl")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--init",
        metavar="DIR",
        help="a fastlm train --model bert checkpoint or run directory, or a "
        "Hugging Face BERT directory",
    )
    source.add_argument("--model", help="a BERT preset (bert-tiny, ...) trained from scratch")
    parser.add_argument(
        "--text-fields",
        default="sentence",
        metavar="A[,B]",
        help="the text column(s): one, or two for sentence pairs",
    )
    parser.add_argument("--label-field", default="label")
    parser.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="TSV files have no header row; fields are 0-based column numbers",
    )
    parser.add_argument(
        "--regression",
        action="store_true",
        help="a real-valued label (STS-B): one output, Pearson/Spearman",
    )
    parser.add_argument(
        "--positive-label", help="F1's class for two labels (default: the second label in id order)"
    )
    for name, kind in (
        ("max-length", int),
        ("epochs", int),
        ("lr", float),
        ("batch-size", int),
        ("warmup-ratio", float),
        ("weight-decay", float),
        ("eval-every", int),
        ("vocab-size", int),
        ("seed", int),
    ):
        default = getattr(FinetuneConfig, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default=FinetuneConfig.out_dir)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    values = vars(args)
    values["text_fields"] = tuple(f.strip() for f in args.text_fields.split(","))
    return FinetuneConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastlm finetune``: 0 on success, 1 on bad input (the message on stderr)."""
    try:
        results = finetune(parse(sys.argv[1:] if argv is None else argv))
    except (ValueError, TrainingDiverged) as e:
        print(f"fastlm finetune: {e}", file=sys.stderr)
        return 1
    _say(f"validation ({results['num_validation']} examples):\n{format_results(results)}")
    _say(f"predictions: {results['predictions']}")
    return 0
