"""The data-cleaning benchmark: its corpus, what each stage counts, and the report."""

from __future__ import annotations

import math

import torch

CPU = torch.device("cpu")
# Each over the 100 characters of the default length filter (EMAIL after scrubbing too).
A = (
    "A first document, long enough to pass the length filter of one hundred characters, "
    "as this sentence shows."
)
B = (
    "Another  one, written with a double space that normalization removes, and long enough "
    "for the filters too."
)
EMAIL = (
    "A third document, which mentions someone@example.com, so that scrubbing changes it; "
    "it is long enough as well, even then."
)
DOCS = [A, A, B, "short", EMAIL]


def _corpus(bench):
    return bench.Corpus(DOCS, [("crafted", len(DOCS), sum(len(d.encode()) for d in DOCS))])


def test_stages_count_documents(bench, monkeypatch):
    monkeypatch.setattr(bench, "corpus", lambda quick: _corpus(bench))
    cases = list(bench.cases(True, CPU))
    nbytes = sum(len(d.encode()) for d in DOCS)
    assert [c.op for c in cases] == [
        "data normalize",
        "data filters",
        "data normalize+filters",
        "data pii scrub",
        "data exact dedup",
        "data minhash dedup",
        "data pipeline",
    ]
    counts = {}
    for case in cases:
        assert case.provider == "fastlm" and case.dtype == torch.uint8
        assert case.shape == (5, nbytes) and case.bytes_moved == nbytes
        counts[case.op.removeprefix("data ")] = case.fn()
    # normalize changes B; the filters drop "short"; the scrubber changes EMAIL; exact
    # dedup drops the second A; MinHash finds it too; the pipeline drops both.
    assert counts == {
        "normalize": 1,
        "filters": 4,
        "normalize+filters": 4,
        "pii scrub": 1,
        "exact dedup": 4,
        "minhash dedup": 4,
        "pipeline": 3,
    }


def test_no_cases_on_gpu_runs(bench):
    assert list(bench.cases(True, torch.device("cuda"))) == []


def test_corpus_sources_add_up(bench):
    quick = bench.corpus(True)
    assert len(quick.sources) == 1 and quick.nbytes > 1_000_000
    full = bench.corpus(False)
    names = [name for name, _, _ in full.sources]
    assert names[:2] == [quick.sources[0][0], "Python help topics (pydoc_data.topics)"]
    assert sum(n for _, n, _ in full.sources) == len(full.docs)
    assert full.nbytes == sum(len(d.encode("utf-8", "surrogatepass")) for d in full.docs)
    assert full.nbytes > quick.nbytes + 400_000  # the help topics alone are ~0.46 MB


def test_report_measures_every_stage(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "corpus", lambda quick: _corpus(bench))
    rows, path = bench.report(True, tmp_path)
    assert [r.stage for r in rows][:2] == ["normalize", "filters"] and len(rows) == 7
    for r in rows:
        assert math.isfinite(r.mb_per_s) and r.mb_per_s > 0 and r.ms > 0, r
        assert r.status in ("met", "NOT met") if r.target else r.status == "-"
    text = path.read_text()
    assert "| crafted" not in text and "- crafted: 5 documents" in text
    assert "| exact dedup | 4 |" in text
    assert "MB/s per core" in capsys.readouterr().out
