"""The MLP benchmark: its formulas, its cases on CPU, and the saved-activation measurement."""

from __future__ import annotations

import torch


def test_flops_and_bytes_formulas(bench):
    assert bench.gemm_flops(2, 3, 5) == 60 and bench.gemm_flops(2, 3, 5, gemms=2) == 120
    assert bench.gemm_bytes(2, 3, 5, 2) == (10 + 15 + 6) * 2
    assert bench.gemm_bytes(2, 3, 5, 2, weights=2) == (10 + 30 + 6) * 2


def test_quick_cpu_cases_run(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), (8, [(12, 16)], [(16, 24)]))
    cases = list(bench.cases(True, torch.device("cpu")))
    assert {c.op for c in cases} == {
        "linear_act gelu_tanh fwd",
        "gated_linear silu fwd",
        "gated_mlp silu fwd",
        "gated_mlp silu fwd+bwd",
    }
    assert {c.provider for c in cases} == {"fastlm-torch", "torch", "gemm-only"}
    for case in cases:
        case.fn()


def test_fused_mlps_keep_less_for_the_backward_than_eager(bench):
    report = bench.saved_report(m=8, hidden=16, inter=40)
    # Gated: x, gate and up (2 bytes each); eager keeps gate, silu(gate), up, their product.
    assert report["gated_mlp"]["fused_bytes"] == 2 * (8 * 16 + 2 * 8 * 40)
    assert report["gated_mlp"]["ratio"] <= 0.5
    assert report["fused_mlp"]["fused_bytes"] == 2 * (8 * 16 + 8 * 40)
    assert report["fused_mlp"]["ratio"] < 0.6
