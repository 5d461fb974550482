"""n-shot evaluation on tasks read from local JSONL files, one example per line.

Three formats, told apart by their fields (or named with ``format``):

- ``mmlu``: ``question``, ``choices`` (a list, usually 4), ``answer`` (the index, or the
  letter "A", "B", ...); an optional ``subject`` adds MMLU's header line. The prompt is
  the original MMLU layout (as lm-evaluation-harness's ``mmlu``): the question, one line
  per choice ``A. ...``, then ``Answer:``; the model scores each answer letter (`` A``,
  `` B``, ...) as the continuation.
- ``winogrande``: ``sentence`` with one ``_`` blank, ``option1``, ``option2``, ``answer``
  ("1" or "2"). Partial scoring, as lm-evaluation-harness's ``winogrande`` and the
  WinoGrande paper's: the context is the sentence up to the blank with an option filled
  in, and the model scores the rest of the sentence after the blank, the same text for both
  options; the option under which it is likelier wins.
- ``bbh`` (BIG-Bench Hard): ``input``, ``target``. The prompt ends ``Q: <input>\\nA:``; the
  model generates greedily until a newline or EOS, and the answer counts when it equals
  the target exactly (after stripping surrounding whitespace; no SQuAD normalization, which
  would erase answers made of brackets or a minus sign).

k-shot prompts put k solved examples from a dev split before the question, separated by
blank lines (MMLU: the question with its answer letter; WinoGrande: the sentence with the
right option in the blank; BBH: ``Q: ... A: <target>``). The dev split is a separate file
of the same format, or, when there is none, k examples of the task file held out (drawn
with the seed) and not scored; then every scored example sees those k, in its own order
(and runs with different k score different examples: give a dev file to compare shots on
the same ones).
Each scored example draws its k demonstrations from the dev split with a generator seeded
by ``seed`` and the example's line, so a result does not depend on ``limit`` or on which
other examples run; a dev example identical to the scored one is never drawn.

Multiple choice reports ``accuracy`` (the likeliest choice) and ``acc_norm`` (the likeliest
per character of the choice's text, without the space before it: lm-evaluation-harness's
``acc_norm``). Letter answers (MMLU) and WinoGrande's shared continuation are the same
length for every choice, so there acc_norm equals accuracy. BBH reports ``exact_match``.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastlm.data.corpus import iter_jsonl

if TYPE_CHECKING:
    from torch import nn

    from fastlm.data import Tokenizer

_LETTERS = string.ascii_uppercase
_SEPARATOR = "\n\n"  # between demonstrations, and before the question


@dataclasses.dataclass(frozen=True)
class Example:
    """One line of a task file: its 1-based line number and its JSON object."""

    line: int
    record: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
    path: Path
    format: str
    examples: list[Example]


def _text(record: dict, field: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} must be a string, got {type(value).__name__}")
    return value


class _MMLU:
    fields = ("question", "choices", "answer")

    def check(self, r: dict) -> None:
        _text(r, "question")
        choices = r["choices"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(_LETTERS):
            raise ValueError(
                f"field 'choices' must be a list of 2 to {len(_LETTERS)} strings, got {choices!r}"
            )
        if not all(isinstance(c, str) for c in choices):
            raise ValueError(f"field 'choices' must hold strings, got {choices!r}")
        if "subject" in r:
            _text(r, "subject")
        self.gold(r)

    def gold(self, r: dict) -> int:
        answer, n = r["answer"], len(r["choices"])
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
            return answer
        if isinstance(answer, str) and len(answer) == 1 and answer in _LETTERS[:n]:
            return _LETTERS.index(answer)
        raise ValueError(
            f"field 'answer' must be a choice index 0..{n - 1} or a letter "
            f"{_LETTERS[0]}..{_LETTERS[n - 1]}, got {answer!r}"
        )

    def _header(self, r: dict) -> str:
        if "subject" not in r:
            return ""
        subject = r["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"

    def _question(self, r: dict) -> str:
        lines = [r["question"].strip()]
        lines += [f"{_LETTERS[i]}. {c}" for i, c in enumerate(r["choices"])]
        return "\n".join([*lines, "Answer:"])

    def demo(self, r: dict) -> str:
        return f"{self._question(r)} {_LETTERS[self.gold(r)]}"

    def requests(self, r: dict, prefix: str) -> list[tuple[str, str]]:
        context = self._header(r) + prefix + self._question(r)
        return [(context, f" {_LETTERS[i]}") for i in range(len(r["choices"]))]


class _WinoGrande:
    fields = ("sentence", "option1", "option2", "answer")

    def check(self, r: dict) -> None:
        sentence = _text(r, "sentence")
        _text(r, "option1")
        _text(r, "option2")
        if sentence.count("_") != 1:
            raise ValueError(f"field 'sentence' must hold one '_' blank, got {sentence!r}")
        if not sentence[sentence.index("_") + 1 :].strip():
            raise ValueError(f"field 'sentence' has nothing after its blank to score: {sentence!r}")
        self.gold(r)

    def gold(self, r: dict) -> int:
        answer = r["answer"]
        if answer not in ("1", "2", 1, 2) or isinstance(answer, bool):
            raise ValueError(f'field \'answer\' must be "1" or "2", got {answer!r}')
        return int(answer) - 1

    def demo(self, r: dict) -> str:
        return r["sentence"].replace("_", r[f"option{self.gold(r) + 1}"])

    def requests(self, r: dict, prefix: str) -> list[tuple[str, str]]:
        before, after = r["sentence"].split("_")
        return [(prefix + before + r[option], after) for option in ("option1", "option2")]


class _BBH:
    fields = ("input", "target")

    def check(self, r: dict) -> None:
        _text(r, "input")
        if not _text(r, "target").strip():
            raise ValueError("field 'target' is empty")

    def demo(self, r: dict) -> str:
        return f"Q: {r['input']}\nA: {r['target']}"

    def requests(self, r: dict, prefix: str) -> list[tuple[str, str]]:
        # The prompt, and the continuation a perfect model writes.
        return [(f"{prefix}Q: {r['input']}\nA:", f" {r['target']}")]


FORMATS = {"mmlu": _MMLU(), "winogrande": _WinoGrande(), "bbh": _BBH()}


def detect_format(record: dict) -> str:
    """The format whose fields ``record`` has (see the module docstring)."""
    found = [name for name, f in FORMATS.items() if all(k in record for k in f.fields)]
    if len(found) == 1:
        return found[0]
    expected = "; ".join(f"{name}: {', '.join(f.fields)}" for name, f in FORMATS.items())
    what = f"fields of {' and '.join(found)}" if found else "no known set of fields"
    raise ValueError(
        f"cannot tell the task format: the first example has {what} (keys "
        f"{sorted(record)}); expected {expected}; or name the format"
    )


def load_task(path: str | Path, format: str | None = None) -> Task:
    """The examples of the JSONL file ``path``, checked against ``format`` (detected from
    the first example's fields when None). Blank lines are skipped."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    examples = []
    for line, record in iter_jsonl(path):
        try:
            if format is None:
                format = detect_format(record)
            spec = FORMATS[format]
            missing = [k for k in spec.fields if k not in record]
            if missing:
                raise ValueError(f"missing {', '.join(map(repr, missing))} for the {format} format")
            spec.check(record)
        except ValueError as e:
            raise ValueError(f"{path}, line {line}: {e}") from None
        examples.append(Example(line, record))
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return Task(path, format, examples)


def split_dev(
    task: Task, dev: Task | None, shots: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """The examples to score and the dev pool to draw demonstrations from: all of ``task``
    and ``dev``'s examples, or, without ``dev``, ``shots`` examples of ``task`` held out
    (chosen with ``seed``) and the rest."""
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ValueError(f"shots must be a non-negative int, got {shots!r}")
    if dev is not None:
        if dev.format != task.format:
            raise ValueError(f"dev split {dev.path} is {dev.format} but the task is {task.format}")
        if shots > len(dev.examples):
            raise ValueError(
                f"{shots} shots exceed the {len(dev.examples)} examples of the dev split {dev.path}"
            )
        return task.examples, dev.examples
    if shots >= len(task.examples):
        raise ValueError(
            f"{shots} shots held out of the {len(task.examples)} examples of "
            f"{task.path} leave none to score; give a dev split"
        )
    held = set(random.Random(seed).sample(range(len(task.examples)), shots))
    scored = [e for i, e in enumerate(task.examples) if i not in held]
    return scored, [e for i, e in enumerate(task.examples) if i in held]


def draw_demos(example: Example, pool: Sequence[Example], shots: int, seed: int) -> list[Example]:
    """``shots`` examples of ``pool`` (never one equal to ``example``), in a random order
    fixed by ``seed`` and the example's line number."""
    candidates = [d for d in pool if d.record != example.record]
    if shots > len(candidates):
        raise ValueError(
            f"{shots} shots, but only {len(candidates)} dev examples differ from "
            f"the one on line {example.line}"
        )
    return random.Random(f"{seed}/{example.line}").sample(candidates, shots)


def requests(format: str, example: Example, demos: Sequence[Example]) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` texts of ``example`` after ``demos``: one per choice
    for multiple choice; for BBH the prompt and the target (with its leading space)."""
    spec = FORMATS[format]
    prefix = "".join(spec.demo(d.record) + _SEPARATOR for d in demos)
    return spec.requests(example.record, prefix)


def evaluate(
    model: nn.Module,
    tokenizer: Tokenizer,
    task: Task,
    dev: Task | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    limit: int | None = None,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate ``model`` (a GPT or T5) on ``task`` with ``shots`` demonstrations per example,
    on the first ``limit`` examples to score (all when None).

    Returns the results (``format``, ``n``, ``shots``, ``seed``, and ``accuracy`` and
    ``acc_norm``, or ``exact_match`` for BBH) and one record per scored example: its
    ``line``, the dev lines of its ``demos``, and per choice the ``loglikelihoods`` with the
    ``prediction`` (an index), or the generated ``prediction`` and the ``target``.
    """
    # Here, not at the top: reading and checking task files (fastlm eval's own checks, before
    # any model loads) needs no torch.
    from fastlm.eval import metrics
    from fastlm.eval.scoring import check_model, encode_pair, generate_until, score

    check_model(model)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    scored, pool = split_dev(task, dev, shots, seed)
    scored = scored[:limit]
    demos = [draw_demos(e, pool, shots, seed) for e in scored]
    texts = [requests(task.format, e, d) for e, d in zip(scored, demos, strict=True)]
    results: dict[str, Any] = {
        "format": task.format,
        "n": len(scored),
        "shots": shots,
        "seed": seed,
    }
    records = [
        {"line": e.line, "demos": [d.line for d in ds]} for e, ds in zip(scored, demos, strict=True)
    ]
    if task.format == "bbh":
        prompts = [t[0][0] for t in texts]
        outputs = generate_until(
            model, tokenizer, prompts, max_new_tokens, ("\n",), batch_size, progress=progress
        )
        predictions = [o.strip() for o in outputs]
        targets = [e.record["target"].strip() for e in scored]
        results["exact_match"] = metrics.exact_match(predictions, targets, normalize=False)
        for record, p, t in zip(records, predictions, targets, strict=True):
            record.update(prediction=p, target=t, correct=p == t)
        return results, records
    pairs = [encode_pair(tokenizer, c, k) for t in texts for c, k in t]
    scores = iter(score(model, pairs, batch_size, progress=progress))
    golds, preds, preds_norm = [], [], []
    for e, t, record in zip(scored, texts, records, strict=True):
        lls = [next(scores).logprob for _ in t]
        chars = [len(k.lstrip()) for _, k in t]
        pred = max(range(len(lls)), key=lambda i: lls[i])
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / chars[i])
        gold = FORMATS[task.format].gold(e.record)
        golds.append(gold)
        preds.append(pred)
        preds_norm.append(pred_norm)
        record.update(
            gold=gold,
            loglikelihoods=lls,
            prediction=pred,
            prediction_norm=pred_norm,
            correct=pred == gold,
        )
    results["accuracy"] = metrics.accuracy(preds, golds)
    results["acc_norm"] = metrics.accuracy(preds_norm, golds)
    return results, records
