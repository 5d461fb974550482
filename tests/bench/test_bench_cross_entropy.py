"""The cross-entropy benchmark: its formulas, its cases on CPU, and the memory measurement."""

from __future__ import annotations

import torch


def test_bytes_and_flops_formulas(bench):
    assert bench.ce_bytes(4, 10, 2, backward=False) == 4 * 10 * 2 + 32
    assert bench.ce_bytes(4, 10, 2, backward=True) == 3 * 4 * 10 * 2 + 32
    assert bench.ce_flops(4, 10, backward=True) == 2 * bench.ce_flops(4, 10, backward=False)


def test_quick_cpu_cases_run(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), (16, (300,), 8))
    cases = list(bench.cases(True, torch.device("cpu")))
    assert {c.op for c in cases} == {
        "cross_entropy fwd",
        "cross_entropy fwd+bwd",
        "linear_cross_entropy fwd",
        "linear_cross_entropy fwd+bwd",
        "linear_cross_entropy fwd+bwd softcap=30",
    }
    for case in cases:
        case.fn()


def test_fused_linear_cross_entropy_peak_memory_is_a_fraction_of_unfused(bench):
    report = bench.memory_report(n=1024, v=4000, hidden=64)
    assert report["unfused_mib"] > 3 * 1024 * 4000 * 4 / 2**20  # logits, log-softmax, grads
    assert report["ratio"] <= 0.25


def test_speed_report_times_both_and_leaves_the_thread_count(bench):
    threads = torch.get_num_threads()
    report = bench.speed_report(n=64, v=300, hidden=16, rounds=2)
    assert torch.get_num_threads() == threads
    for key in ("fused", "unfused", "fused_fwd", "unfused_fwd"):
        assert report[key] > 0, report
    assert report["ratio"] == report["fused"] / report["unfused"]
    assert report["fwd_ratio"] == report["fused_fwd"] / report["unfused_fwd"]
