"""The generation benchmark: its tables, its cache-byte formulas checked against the caches
themselves, and its cases for ``fastlm bench``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastlm.models import create


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    pytest.importorskip("transformers")
    sizes = dataclasses.replace(
        bench.SIZES[True], uneven=(3, 13, 6), new=5, many=(5, 2, 2, 7), batch_vs_hf=(2, 5, 4)
    )
    out = tmp_path_factory.mktemp("generate")
    results, path = bench.report(True, torch.device("cpu"), out, sizes=sizes)
    return sizes, results, path.read_text()


def test_report_tables(measured):
    sizes, results, text = measured
    assert [r["provider"] for r in results["uneven"]] == ["padded", "paged"]
    assert [r["provider"] for r in results["many"]] == ["static batches", "continuous"]
    assert [r["provider"] for r in results["hf"]] == ["transformers", "fastlm", "fastlm paged"]
    for table in results.values():
        for row in table:
            assert row["ms"] > 0 and row["tokens_per_s"] > 0
    for heading in ("Padded vs paged", "Continuous vs static", "fastlm vs transformers"):
        assert heading in text
    assert f"| {torch.__version__} |" in text


def test_cache_bytes_follow_the_tokens_held(bench, measured):
    """The padded row is batch x (longest prompt + new) positions; the paged peak is the
    pages each row's own tokens fill (prompt + new - 1 tokens), by hand here."""
    sizes, results, _ = measured
    model = create("gpt2", dropout=0.0, **sizes.model)
    c = model.config
    per_token = c.num_layers * 2 * c.hidden_size * 4  # k and v of every layer, fp32
    padded, paged = results["uneven"]
    positions = len(sizes.uneven) * (max(sizes.uneven) + sizes.new)
    assert padded["peak_mb"] * 2**20 == pytest.approx(positions * per_token, abs=0.5)
    pages = sum(-(-(n + sizes.new - 1) // sizes.page_size) for n in sizes.uneven)
    assert paged["peak_mb"] * 2**20 == pytest.approx(pages * sizes.page_size * per_token, abs=0.5)
    assert paged["peak_mb"] < padded["peak_mb"]
    # Continuous batching decodes the tokens wanted; static groups wait for their longest.
    static, continuous = results["many"]
    assert continuous["decoded"] == continuous["tokens"] <= static["decoded"]


def test_cases_run_padded_and_paged(bench, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "report", lambda quick, device: None)
    cases = list(bench.cases(True, torch.device("cpu")))
    assert [c.provider for c in cases] == ["padded", "paged"]
    outs = [c.fn() for c in cases]
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[1] == sum(cases[0].shape[1:])


def test_compiled_table(bench, tmp_path):
    """The compiled-step table (traced by aot_eager here: Inductor's C++ build takes most of
    a minute): its providers, transformers' when installed, and the compile timed apart."""
    torch._dynamo.reset()
    sizes = dataclasses.replace(bench.SIZES[True], batch_vs_hf=(2, 5, 4), rounds=1)
    results, path = bench.report_compiled(
        True, torch.device("cpu"), tmp_path, sizes=sizes, compile={"backend": "aot_eager"}
    )
    names = ["fastlm eager", "fastlm static, eager step", "fastlm compiled step"]
    if bench._transformers_available():
        names.append("transformers")
    assert len(results) == 2
    for rows, timing, _ in results.values():
        assert [r["provider"] for r in rows] == names
        assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
        assert timing["first_s"] > 0
    text = path.read_text()
    assert path.name == "generate_compiled.md" and text.count("Compile (once per batch") == 2
    torch._dynamo.reset()
