"""The cleaning pipeline, normalize -> scrub PII -> quality filters -> exact dedup -> near
dedup, streaming over a corpus of any size; and the ``fastlm data clean`` command.

Documents go through in batches of about :data:`BATCH_CHARS` characters: the filters'
n-gram hashing and MinHash are vectorized over a batch, and memory holds one batch plus the
deduplication state (see :mod:`fastlm.data.dedup`), never the corpus. Every step keeps the
order of the documents it keeps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from fastlm import errors
from fastlm.data.clean import (
    NORMAL_FORMS,
    SHINGLES,
    CleanConfig,
    QualityFilter,
    Report,
    normalize,
)
from fastlm.data.corpus import corpus_files, iter_file
from fastlm.data.dedup import ExactDedup, NearDedup, batches
from fastlm.data.privacy import PIIScrubber

# 64K characters: large enough that numpy's per-call overhead is amortized over ~100
# documents, small enough that the per-batch arrays stay in cache and in malloc's reused
# memory (fresh multi-megabyte arrays cost page faults on every batch).
BATCH_CHARS = 1 << 16


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class Cleaner:
    """The pipeline of a :class:`CleanConfig`: ``cleaner(docs)`` yields the documents kept,
    cleaned, lazily; ``cleaner.report`` (a :class:`Report`) counts as they go and is
    complete once the iterator is exhausted. Deduplication state lives in the cleaner, so
    calling it again on more documents deduplicates them against the earlier ones."""

    def __init__(self, config: CleanConfig | None = None) -> None:
        self.config = config or CleanConfig()
        self.report = Report(self.config)
        c = self.config
        self._scrub = PIIScrubber() if c.scrub_pii else None
        self._filter = QualityFilter(c) if c.filters else None
        self._exact = ExactDedup() if c.exact_dedup else None
        self._near = (
            NearDedup(c.threshold, c.num_perm, c.shingle, c.shingle_size, c.seed)
            if c.near_dedup
            else None
        )

    def __call__(self, docs: Iterable[str]) -> Iterator[str]:
        if isinstance(docs, str):
            raise TypeError("docs must be an iterable of strings, got a single str")
        for batch in batches(docs, BATCH_CHARS):
            yield from self._batch(batch)

    def _batch(self, batch: list[str]) -> list[str]:
        r, form = self.report, self.config.normalization
        r.docs_in += len(batch)
        r.bytes_in += sum(map(_utf8_len, batch))
        t0 = time.perf_counter()
        texts = [normalize(d, form) for d in batch]
        r.normalized += sum(a != b for a, b in zip(texts, batch, strict=True))
        # ASCII text is in every normal form: only the others can change code points.
        r.unicode_normalized += sum(
            not d.isascii() and not unicodedata.is_normalized(form, d) for d in batch
        )
        t1 = time.perf_counter()
        r.seconds["normalize"] += t1 - t0
        if self._scrub is not None:
            texts = [self._scrub(t) for t in texts]
            r.pii = dict(self._scrub.counts)
        t2 = time.perf_counter()
        r.seconds["scrub"] += t2 - t1
        kept = texts
        if self._filter is not None:
            reasons = self._filter(texts)
            kept = [t for t, reason in zip(texts, reasons, strict=True) if reason is None]
            for reason in reasons:
                if reason is not None:
                    r.removed[reason] += 1
        t3 = time.perf_counter()
        r.seconds["filter"] += t3 - t2
        if self._exact is not None:
            unique = [t for t in kept if self._exact.add(t) is None]
            r.removed["exact_duplicate"] += len(kept) - len(unique)
            kept = unique
        t4 = time.perf_counter()
        r.seconds["exact_dedup"] += t4 - t3
        if self._near is not None and kept:
            matches = self._near.add(kept)
            r.removed["near_duplicate"] += sum(m is not None for m in matches)
            kept = [t for t, m in zip(kept, matches, strict=True) if m is None]
        r.seconds["near_dedup"] += time.perf_counter() - t4
        r.docs_out += len(kept)
        r.bytes_out += sum(map(_utf8_len, kept))
        return kept


def clean_corpus(
    docs: Iterable[str], config: CleanConfig | None = None
) -> tuple[list[str], Report]:
    """Clean ``docs`` (:class:`Cleaner`): the documents kept, in order, and the report."""
    cleaner = Cleaner(config)
    return list(cleaner(docs)), cleaner.report


# ---------------------------------------------------------------------------------------------
# fastlm data clean


def _dup_ngram(value: str) -> tuple[int, float]:
    n, sep, fraction = value.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(n), float(fraction)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N=FRACTION (e.g. 5=0.15), got {value!r}"
        ) from None


def _parser() -> argparse.ArgumentParser:
    d = CleanConfig()
    parser = argparse.ArgumentParser(
        prog="fastlm data clean",
        description="Clean a text corpus: normalize, scrub personal data, filter, deduplicate. "
        'Writes one JSON object {"text": ...} per kept document.',
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="IN",
        help=".txt files (one document each), .jsonl files or directories",
    )
    parser.add_argument("output", metavar="OUT", help="the .jsonl file to write")
    parser.add_argument(
        "--text-field",
        default="text",
        help="the JSONL field holding a document's text (default: text)",
    )
    s = argparse.SUPPRESS  # only flags given override CleanConfig's defaults
    parser.add_argument(
        "--normalization",
        choices=NORMAL_FORMS,
        default=s,
        help=f"Unicode normalization form (default {d.normalization})",
    )
    parser.add_argument(
        "--scrub",
        dest="scrub_pii",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="replace e-mail addresses, phone numbers, IP addresses "
        "and card numbers by placeholders (default on)",
    )
    parser.add_argument(
        "--filters",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="apply the quality filters below (default on)",
    )
    parser.add_argument(
        "--min-chars", type=int, default=s, help=f"drop documents shorter (default {d.min_chars})"
    )
    parser.add_argument(
        "--max-chars", type=int, default=s, help=f"drop documents longer (default {d.max_chars})"
    )
    parser.add_argument(
        "--min-alpha-fraction",
        type=float,
        default=s,
        help="drop documents with a smaller fraction of letters among visible "
        f"characters (default {d.min_alpha_fraction})",
    )
    parser.add_argument(
        "--max-repeated-line-fraction",
        type=float,
        default=s,
        help="drop documents with a larger fraction of repeated lines "
        f"(default {d.max_repeated_line_fraction})",
    )
    parser.add_argument(
        "--max-dup-ngram-fraction",
        type=_dup_ngram,
        nargs="*",
        default=s,
        metavar="N=FRACTION",
        help="drop documents with a larger fraction of "
        "characters in duplicated word N-grams; no value turns it off (default "
        + " ".join(f"{n}={f}" for n, f in d.max_dup_ngram_fraction.items())
        + ", Gopher's)",
    )
    parser.add_argument(
        "--exact-dedup",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="drop documents identical to an earlier one (default on)",
    )
    parser.add_argument(
        "--near-dedup",
        action=argparse.BooleanOptionalAction,
        default=s,
        help="drop near-duplicates of an earlier document (default on)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=s,
        help=f"near-duplicate Jaccard similarity (default {d.threshold})",
    )
    parser.add_argument(
        "--num-perm", type=int, default=s, help=f"MinHash permutations (default {d.num_perm})"
    )
    parser.add_argument(
        "--shingle",
        choices=SHINGLES,
        default=s,
        help=f"shingles of words or characters (default {d.shingle})",
    )
    parser.add_argument(
        "--shingle-size",
        type=int,
        default=s,
        help=f"words or characters per shingle (default {d.shingle_size})",
    )
    parser.add_argument(
        "--seed", type=int, default=s, help=f"of the MinHash permutations (default {d.seed})"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="show a progress bar (default on)",
    )
    return parser


def _config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> CleanConfig:
    fields = {f.name for f in dataclasses.fields(CleanConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    if "max_dup_ngram_fraction" in given:
        given["max_dup_ngram_fraction"] = dict(given["max_dup_ngram_fraction"])
    try:
        return CleanConfig(**given)
    except (TypeError, ValueError) as e:
        # Config errors begin with the field's name: report them under the flag's.
        field = re.match(r"\w*", str(e)).group()
        if field not in fields:
            parser.error(str(e))
        flag = "--scrub" if field == "scrub_pii" else "--" + field.replace("_", "-")
        parser.error(f"argument {flag}: {e}")


def _documents(files: Sequence[Path], text_field: str, bar: tqdm) -> Iterator[str]:
    """The documents of ``files``, advancing ``bar`` (over the files' bytes) as they go."""
    done = 0
    for f in files:
        for doc in iter_file(f, text_field):
            bar.update(_utf8_len(doc))
            yield doc
        done += f.stat().st_size
        bar.update(done - bar.n)  # the file's markup too (JSON syntax, escapes)


def main(argv: Sequence[str] | None = None) -> int:
    """``fastlm data clean IN... OUT [options]``: 0 on success, 1 when an input cannot be
    read or OUT cannot be written, 2 for bad arguments."""
    parser = _parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)
    output = Path(args.output)
    if output.suffix != ".jsonl":
        parser.error(f"argument OUT: must end in .jsonl, got {output}")
    return errors.report("fastlm data clean", lambda: _clean(parser, args, config, output))


def _clean(
    parser: argparse.ArgumentParser, args: argparse.Namespace, config: CleanConfig, output: Path
) -> int:
    files = corpus_files(args.inputs)
    if output.exists() and any(output.samefile(f) for f in files):
        parser.error(f"argument OUT: {output} is also an input")
    cleaner = Cleaner(config)
    start = time.perf_counter()
    partial = output.with_name(output.name + ".partial")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        out = partial.open("w", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"OUT {output} cannot be written ({e.strerror}: {e.filename})") from None
    total = sum(f.stat().st_size for f in files)
    try:
        bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="cleaning",
            disable=not args.progress,
            file=sys.stderr,
        )
        with out, bar:
            for doc in cleaner(_documents(files, args.text_field, bar)):
                out.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(partial, output)  # OUT appears complete, or not at all
    finally:
        partial.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    report = cleaner.report
    print(report.table())
    rate = report.bytes_in / 1e6 / max(seconds, 1e-9)
    print(
        f"wrote {report.docs_out} documents to {output} in {seconds:.2f} s "
        f"({rate:.3g} MB/s with reading and writing)"
    )
    return 0
