"""Data cleaning throughput on English text, one CPU thread: normalization, quality filters,
PII scrubbing, exact deduplication, MinHash near-deduplication and the whole pipeline.

Rate: MB/s = UTF-8 bytes of the input documents / seconds of one pass over them (the
harness's GB/s column times 1000). Each stage is timed alone, on the documents it sees in
the pipeline: normalization on the raw text, the other stages on normalized text. The
stages run in one Python thread (numpy's element-wise and sorting kernels are
single-threaded), so MB/s is per core. Targets (from the issue): at least 50 MB/s per core
for the filters and for exact deduplication, at least 5 MB/s for MinHash.

Text: English prose that ships with Python and with the installed packages, no download:

* the docstrings of the standard library (``fastlm.data.default_corpus()``, 1.2 MB);
* with ``--full``, also the help topics of the Python documentation bundled in
  ``pydoc_data.topics`` (0.46 MB on 3.11) and the descriptions (README text) in the
  ``METADATA`` of every installed distribution (``importlib.metadata``; ~1.9 MB in the dev
  environment, so the total depends on what is installed: the report states it).

``python -m bench.bench_data [--full]`` prints the table and writes ``data.md`` under
``bench/results/<device>/``; ``fastlm bench --only data`` times the same cases with the
harness (on CPU runs only: this is CPU work).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable, as bench/run.py does.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch

from bench import harness
from bench.harness import Case, format_table
from fastlm.data import (
    CleanConfig,
    ExactDedup,
    NearDedup,
    PIIScrubber,
    QualityFilter,
    clean_corpus,
    default_corpus,
    normalize,
)
from fastlm.data.dedup import batches
from fastlm.data.pipeline import BATCH_CHARS

# MB/s per core the issue asks for, per stage (None: no target).
TARGETS = {"normalize+filters": 50.0, "filters": 50.0, "exact dedup": 50.0, "minhash dedup": 5.0}


@dataclasses.dataclass
class Corpus:
    docs: list[str]
    sources: list[tuple[str, int, int]]  # (source, documents, UTF-8 bytes)

    @property
    def nbytes(self) -> int:
        return sum(b for _, _, b in self.sources)


def _nbytes(docs: Sequence[str]) -> int:
    return sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)


def _metadata_descriptions() -> list[str]:
    """The description (the body after the headers) of each installed distribution's
    METADATA, in name order; empty ones skipped."""
    found = {}
    for dist in importlib.metadata.distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if body.strip() and dist.metadata["Name"]:
            found.setdefault(dist.metadata["Name"].lower(), body)
    return [found[name] for name in sorted(found)]


def corpus(quick: bool) -> Corpus:
    sources = [("stdlib docstrings (fastlm.data.default_corpus)", default_corpus())]
    if not quick:
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        help_topics = [topics[k] for k in sorted(topics)]
        sources.append(("Python help topics (pydoc_data.topics)", help_topics))
        sources.append(("installed distributions' METADATA descriptions", _metadata_descriptions()))
    docs = [d for _, part in sources for d in part]
    return Corpus(docs, [(name, len(part), _nbytes(part)) for name, part in sources])


def stages(docs: Sequence[str]) -> dict[str, Callable[[], int]]:
    """Each stage as a call over ``docs`` that returns the number of documents it kept (or
    changed, for normalization and scrubbing), in the pipeline's batches."""
    config = CleanConfig()
    clean = [normalize(d) for d in docs]

    def normalize_all() -> int:
        return sum(normalize(d) != d for d in docs)

    quality = QualityFilter(config)

    def filters(texts: Sequence[str] = clean) -> int:
        return sum(r is None for batch in batches(texts, BATCH_CHARS) for r in quality(batch))

    def normalize_filters() -> int:
        return filters([normalize(d) for d in docs])

    def scrub() -> int:
        scrubber = PIIScrubber()
        return sum(scrubber(d) != d for d in clean)

    def exact() -> int:
        dedup = ExactDedup()
        return sum(dedup.add(d) is None for d in clean)

    def minhash() -> int:
        dedup = NearDedup(config.threshold, config.num_perm, config.shingle, config.shingle_size)
        return sum(m is None for batch in batches(clean, BATCH_CHARS) for m in dedup.add(batch))

    def pipeline() -> int:
        return len(clean_corpus(docs, config)[0])

    return {
        "normalize": normalize_all,
        "filters": filters,
        "normalize+filters": normalize_filters,
        "pii scrub": scrub,
        "exact dedup": exact,
        "minhash dedup": minhash,
        "pipeline": pipeline,
    }


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    if device.type != "cpu":  # text processing is CPU work: timed in CPU runs only
        return
    text = corpus(quick)
    for name, fn in stages(text.docs).items():
        yield Case(
            f"data {name}", "fastlm", (len(text.docs), text.nbytes), torch.uint8, fn, text.nbytes
        )


@dataclasses.dataclass
class Row:
    stage: str
    documents: int  # the stage's count (kept, or changed)
    ms: float
    mb_per_s: float
    target: float | None

    @property
    def status(self) -> str:
        if self.target is None:
            return "-"
        return "met" if self.mb_per_s >= self.target else "NOT met"


def measure(text: Corpus, rep_ms: float) -> list[Row]:
    rows = []
    for name, fn in stages(text.docs).items():
        documents = fn()
        ms = harness.measure(fn, torch.device("cpu"), rep_ms).ms
        rows.append(Row(name, documents, ms, text.nbytes / ms / 1e3, TARGETS.get(name)))
    return rows


HEADERS = ("stage", "documents out", "ms", "MB/s per core", "target MB/s", "")


def _cells(r: Row) -> tuple[str, ...]:
    target = "-" if r.target is None else f"{r.target:g}"
    return (r.stage, str(r.documents), f"{r.ms:.1f}", f"{r.mb_per_s:.1f}", target, r.status)


def markdown(text: Corpus, rows: Sequence[Row], env: harness.Environment, load: float) -> str:
    lines = [
        f"# Data cleaning throughput: {env.device}",
        "",
        "| device | torch | commit | date | load average before |",
        "| --- | --- | --- | --- | --- |",
        f"| {env.device} ({os.cpu_count()} cores) | {env.torch} | {env.commit} "
        f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} | {load:.2f} |",
        "",
        f"{len(text.docs)} documents, {text.nbytes / 1e6:.2f} MB of UTF-8 English text; one "
        "thread; median time of one pass (`python -m bench.bench_data`; method in "
        "`bench/bench_data.py`). Sources:",
        "",
        *(f"- {name}: {n} documents, {b / 1e6:.2f} MB" for name, n, b in text.sources),
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---" for _ in HEADERS) + " |",
        *("| " + " | ".join(_cells(r)) + " |" for r in rows),
        "",
        "documents out: kept (filters, deduplication, pipeline) or changed (normalize, pii scrub).",
    ]
    return "\n".join(lines) + "\n"


def report(quick: bool, out: Path | None = None) -> tuple[list[Row], Path]:
    """Measure every stage, print the table, write ``data.md`` to ``out`` (default
    ``bench/results/<device>/``)."""
    env = harness.environment(torch.device("cpu"))
    load = os.getloadavg()[0]  # other work on the cores slows every row
    text = corpus(quick)
    rows = measure(text, 100 if quick else 400)
    print(f"{len(text.docs)} documents, {text.nbytes / 1e6:.2f} MB; load average {load:.2f}")
    print(format_table(HEADERS, [_cells(r) for r in rows]))
    path = (out or harness.RESULTS / env.slug) / "data.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(text, rows, env, load))
    print(f"wrote {path}")
    return rows, path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--full", action="store_true", help="the larger corpus, longer timing")
    parser.add_argument("--out", type=Path, help="folder of data.md (default bench/results/<cpu>)")
    args = parser.parse_args(argv)
    rows, _ = report(not args.full, args.out)
    return 0 if all(math.isfinite(r.mb_per_s) and r.mb_per_s > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
