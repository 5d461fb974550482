"""The quantized-matmul benchmark: its cases on CPU, each provider's numbers, the bytes
formula, and the SQNR table."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastlm.quant import dequantize_weight, quantize_weight

CPU = torch.device("cpu")


def test_quick_cpu_cases_run_and_sweep_m(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), ((1, 5), (128,)))
    cases = list(bench.cases(True, CPU))
    formats = ("int8", "int4-g128", "nf4-g64", "w8a8")
    providers = {"fp32 F.linear", "bf16 F.linear"}
    providers |= {f"{who} {f}" for who in ("fastlm-torch", "torch") for f in formats}
    assert {c.op for c in cases} == {"quant_matmul N=K=128"}
    assert sorted((c.provider, c.shape) for c in cases) == sorted(
        (p, (128, 128, m)) for p in providers for m in (1, 5)
    )
    for case in cases:
        n, k, m = case.shape
        y = case.fn()
        assert y.shape == (m, n) and y.dtype == case.dtype, case.provider
        assert torch.isfinite(y).all(), case.provider
        assert case.flops == 2 * m * n * k


def test_full_cpu_sizes_give_every_m_and_size(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", False), ((1, 3), (128, 256)))
    shapes = {c.shape for c in bench.cases(False, CPU)}
    assert shapes == {(s, s, m) for s in (128, 256) for m in (1, 3)}


@pytest.mark.parametrize("m", [1, 7])
def test_providers_match_the_dequantized_weight(bench, m):
    n, k = 96, 256
    w = torch.randn(n, k) * 0.02
    x = torch.randn(m, k)
    found = bench.providers(w)
    formats = ("int8", "int4-g128", "nf4-g64", "w8a8")
    assert {f"{who} {f}" for who in ("fastlm-torch", "torch") for f in formats} <= set(found)
    exact = F.linear(x.double(), w.double())
    for name, p in found.items():
        y = p.fn(x.to(p.dtype)).double()
        if p.qw is None:  # the float GEMMs: against the fp32 weight
            ref, tol = exact, 1e-5 if p.dtype == torch.float32 else 1e-2
        else:
            ref = F.linear(x, dequantize_weight(p.qw)).double()
            # w8a8 also rounds x to int8 per token: under 1% of the output norm on Gaussians.
            tol = 2e-2 if name.endswith("w8a8") else 1e-5
        err = (y - ref).norm() / ref.norm()
        assert err < tol, (name, err.item())
    # The weight-only formats are not the identity: their error against w is visible.
    int4 = found["fastlm-torch int4-g128"].fn(x).double()
    assert (int4 - exact).norm() / exact.norm() > 1e-3


def test_bytes_formula_int4_g128(bench):
    n, k, m = 256, 512, 16
    qw = quantize_weight(torch.randn(n, k), bits=4, group_size=128)
    # Packed nibbles, then per group one fp16 scale and one uint8 zero point.
    stored = n * k // 2 + n * k // 128 * (2 + 1)
    assert bench.weight_bytes(qw) == stored
    assert bench.quant_bytes(m, n, k, stored, 2) == stored + (m * k + m * n) * 2
    p = bench.providers(torch.randn(n, k) * 0.02)
    for who in ("fastlm-torch", "torch"):
        assert p[f"{who} int4-g128"].weight_bytes == stored
        assert p[f"{who} int8"].weight_bytes == n * k + 4 * n
        assert p[f"{who} nf4-g64"].weight_bytes == n * k // 2 + 2 * n * k // 64
    assert p["fp32 F.linear"].weight_bytes == 4 * n * k
    assert p["bf16 F.linear"].weight_bytes == 2 * n * k


def test_cases_state_the_formula(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), ((3,), (128,)))
    n = k = 128
    by_provider = {c.provider: c for c in bench.cases(True, CPU)}
    int4 = by_provider["fastlm-torch int4-g128"]
    assert int4.bytes_moved == n * k // 2 + n * k // 128 * 3 + (3 * k + 3 * n) * 4
    assert by_provider["bf16 F.linear"].bytes_moved == 2 * n * k + (3 * k + 3 * n) * 2


@pytest.mark.parametrize("fmt", ["int8", "int4-g128", "nf4-g64", "w8a8"])
def test_cpu_pairs_compute_the_same_numbers(bench, fmt):
    # fastlm's torch path and the plain PyTorch provider it is timed against: the same
    # formula, so the same bits (w8a8: its per-token rounding, then exact integer sums).
    found = bench.providers(torch.randn(48, 256) * 0.02)
    x = torch.randn(5, 256)
    got, want = found[f"fastlm-torch {fmt}"].fn(x), found[f"torch {fmt}"].fn(x)
    assert torch.equal(got, want), (got - want).abs().max().item()


def test_sqnr_table(bench):
    n, k = 64, 512
    rows = {r["format"]: r for r in bench.sqnr_table(n, k, seed=1)}
    assert set(rows) == set(bench.SQNR_FORMATS)
    for r in rows.values():
        for key in ("sqnr_gaussian_db", "sqnr_student_t3_db"):
            assert math.isfinite(r[key]) and r[key] > 5, (r["format"], key)
    gauss = {name: r["sqnr_gaussian_db"] for name, r in rows.items()}
    assert gauss["int8 (per channel)"] > gauss["int4 g32"] > gauss["int4 g128"]
    assert gauss["int4 g32"] > gauss["int4 g64"] > gauss["int4 g128"]
    # Heavy tails hurt per-channel int8 most: one outlier sets a whole row's scale.
    assert rows["int8 (per channel)"]["sqnr_student_t3_db"] < gauss["int8 (per channel)"] - 6

    blocks = n * k // 64
    expected = {
        "int8 (per channel)": 8 + 32 / k,
        "int4 g32": 4 + 24 / 32,
        "int4 g64": 4 + 24 / 64,
        "int4 g128": 4 + 24 / 128,
        "int4 g128 symmetric": 4 + 16 / 128,
        "nf4 g64": 4 + 16 / 64,
        # int8 absmax per block, fp32 second-level scale per 256 blocks, one fp32 mean.
        "nf4 g64 double-quant": 4 + 8 / 64 + 32 * (math.ceil(blocks / 256) + 1) / (n * k),
    }
    for name, bits in expected.items():
        assert rows[name]["bits_per_weight"] == pytest.approx(bits, rel=1e-12), name


def test_sqnr_markdown_lists_every_format(bench, capsys):
    assert bench.main(["--sqnr", "--n", "32", "--k", "256"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| format (32x256) | bits/weight |")
    assert len(out) == 2 + len(bench.SQNR_FORMATS)
    assert all(line.startswith("| ") and line.endswith(" |") for line in out)
