"""The quick norm and attention benchmarks on CPU, end to end through ``bench.run.main``."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_main(monkeypatch):
    # As ``fastlm bench`` does: the repo root on sys.path makes ``bench`` importable.
    monkeypatch.syspath_prepend(str(REPO))
    from bench import run

    return run.main


def test_quick_norm_bench_on_cpu_writes_one_row_per_provider(run_main, tmp_path):
    from bench import bench_norm

    assert run_main(["--only", "norm", "--device", "cpu", "--out", str(tmp_path)]) == 0

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert rows == [
        {k: "" if v is None else str(v) for k, v in row.items()}
        for row in json.loads((tmp_path / "results.json").read_text())
    ]
    m, hidden = bench_norm.SIZES[("cpu", True)]
    providers = sorted(bench_norm.providers(True, 8, torch.device("cpu"), torch.float32, True))
    ops = {
        "layer_norm fwd",
        "layer_norm fwd+bwd",
        "rms_norm fwd",
        "rms_norm fwd+bwd",
        "rms_norm+residual fwd",
    }
    for op in ops:
        for n in hidden:
            found = sorted(
                r["provider"] for r in rows if r["op"] == op and r["shape"] == f"{m}x{n}"
            )
            assert found == providers, (op, n)
    assert len(rows) == len(ops) * len(hidden) * len(providers)
    for row in rows:
        for key in ("ms", "gbps"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row)
        # No roofline on a CPU: its caches outrun any DRAM copy on small shapes.
        assert row["roofline_pct"] == row["device_gbps"] == "", row
        assert row["device"] and row["torch"]


def test_norm_bytes_formula():
    from bench.bench_norm import norm_bytes

    m, n, e = 8, 16, 2
    # LayerNorm forward: x and y, weight and bias, fp32 mean and rstd.
    assert norm_bytes(m, n, e, rms=False, residual=False, backward=False) == (
        2 * m * n * e + 2 * n * e + 2 * 4 * m
    )
    # RMSNorm with residual: x, residual in; y, sum out; weight; rstd.
    assert norm_bytes(m, n, e, rms=True, residual=True, backward=False) == (
        4 * m * n * e + n * e + 4 * m
    )
    fwd = norm_bytes(m, n, e, rms=True, residual=False, backward=False)
    # Backward adds dy, x in and dx out, the weight, rstd, and fp32 dweight.
    assert norm_bytes(m, n, e, rms=True, residual=False, backward=True) == (
        fwd + 3 * m * n * e + n * e + 4 * m + 4 * n
    )


def test_quick_attention_bench_on_cpu_writes_one_row_per_provider(run_main, tmp_path):
    from bench import bench_attention

    assert run_main(["--only", "attention", "--device", "cpu", "--out", str(tmp_path)]) == 0

    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    sweep = bench_attention.SWEEPS[("cpu", True)]
    shapes = [
        f"{max(1, sweep.tokens // s)}x{sweep.hidden // d}x{d}x{s}"
        for d in sweep.head_dims
        for s in sweep.seqlens
    ]
    ops = {
        f"attention d{d} {mode}{causal}"
        for d in sweep.head_dims
        for mode in ("fwd", "fwd+bwd")
        for causal in ("", " causal")
    }
    for op in ops:
        for shape in shapes:
            found = sorted(r["provider"] for r in rows if r["op"] == op and r["shape"] == shape)
            assert found == ["fastlm-torch", "sdpa-math", "torch"], (op, shape)
    assert len(rows) == len(ops) * len(shapes) * 3
    for row in rows:
        assert row["dtype"] == "float32"
        for key in ("ms", "gbps", "tflops", "flops", "bytes_moved"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, row)


def test_attention_cost_formulas():
    from bench.bench_attention import attention_bytes, attention_flops, decode_bytes

    b, h, s, d = 2, 4, 16, 8
    fwd = 4 * b * h * s * s * d
    assert attention_flops(b, h, s, s, d, causal=False, mode="fwd") == fwd
    assert attention_flops(b, h, s, s, d, causal=True, mode="fwd") == fwd // 2
    assert attention_flops(b, h, s, s, d, causal=False, mode="bwd") == fwd * 5 // 2
    assert attention_flops(b, h, s, s, d, causal=True, mode="fwd+bwd") == fwd // 2 * 7 // 2
    # q, k, v read and o written once; backward reads q, k, v, o, dO and writes dq, dk, dv.
    e, h_kv = 2, 2
    q, kv = b * s * h * d * e, b * s * h_kv * d * e
    assert attention_bytes(b, h, h_kv, s, s, d, e, "fwd") == 2 * q + 2 * kv
    assert attention_bytes(b, h, h_kv, s, s, d, e, "fwd+bwd") == 6 * q + 6 * kv
    # Decode: the valid K and V cache once, plus the query in and the output out.
    assert (
        decode_bytes(b, h, h_kv, 1, 1000, d, e) == 2 * b * 1000 * h_kv * d * e + 2 * b * h * d * e
    )


def _result(op: str, provider: str, ms: float):
    from bench import harness

    return harness.Result(
        op,
        provider,
        "4x8",
        "float32",
        ms,
        1,
        0,
        1.0,
        0.0,
        None,
        0.0,
        None,
        None,
        "cpu",
        "",
        None,
        None,
    )


def test_ratios_pair_fastlm_torch_rows_with_plain_torch_rows_by_suffix(run_main):
    from bench import harness

    results = [
        _result("norm", "fastlm-torch", 2.0),
        _result("norm", "torch", 4.0),
        _result("attn", "fastlm-torch softcap=30", 3.0),
        _result("attn", "torch softcap=30", 2.0),
        _result("attn", "fastlm-torch", 1.0),  # no plain row of its own: left out
        _result("attn", "torch.compile", 1.0),
    ]
    lines = harness.ratios(results).splitlines()[2:]
    assert len(lines) == 2, lines
    assert lines[0].split()[-2:] == ["0.500", "-2000.0"], lines[0]
    assert lines[1].split()[-2:] == ["1.500", "+1000.0"], lines[1]


def test_alternating_rounds_time_every_provider_in_every_round(run_main):
    from bench import harness

    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    times = harness.time_alternating(fns, torch.device("cpu"), rep_ms=5)
    assert len(times) == 3 and all(math.isfinite(t) and t > 0 for t in times), times
    # Each round holds one block per provider, the order rotating: every provider is timed
    # in every round and opens some of them.
    blocks = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    rounds = harness._rounds(5)
    # One block each to size the rounds (two single calls), then one per round.
    assert [blocks.count(p) for p in "abc"] == [rounds + 1] * 3, blocks
    assert [blocks[3 + 3 * r] for r in range(3)] == ["a", "b", "c"], blocks


def test_calls_slower_than_a_round_get_three_rounds_of_one_call(run_main):
    from bench import harness

    calls: list[str] = []

    def slow(name):  # each call takes longer than a round (5 ms over 7 rounds)
        return lambda: calls.append(name) or time.sleep(0.002)

    # The first (warm-up) calls took a second; the second ones, still slower than a round,
    # are the first of 3 rounds of one call each.
    harness.time_alternating(
        [slow("a"), slow("b")], torch.device("cpu"), rep_ms=5, first_ms=[1000.0, 1000.0]
    )
    assert calls == ["a", "b", "a", "b", "b", "a"], calls


def test_a_slow_first_call_followed_by_fast_ones_gets_full_rounds(run_main):
    """A first call that compiled is not the case's speed: the second call decides."""
    from bench import harness

    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    harness.time_alternating(fns, torch.device("cpu"), rep_ms=5, first_ms=[1000.0] * 3)
    blocks = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    # The second calls, one sizing call each, then a block per provider in every round.
    assert [blocks.count(p) for p in "abc"] == [harness._rounds(5) + 2] * 3, blocks
