"""bench/bench_overhead.py: its rows, and the stub that leaves only the host work."""

from __future__ import annotations

import math

import pytest
import torch
from fastlm.kernels import launch

import fastlm
from fastlm import ops


def test_rows_per_op_through_the_harness(bench):
    from bench import harness

    cpu = torch.device("cpu")
    env = harness.environment(cpu)
    results, errors = harness.run_cases(
        bench.cases(True, cpu, only=("rms_norm", "cross_entropy")), cpu, env, None, 5
    )
    assert errors == []
    found = sorted((r.op, r.provider) for r in results)
    expected = sorted(
        (f"{op} eager", provider)
        for op in ("rms_norm", "cross_entropy")
        for provider in ("torch", "fastlm-torch", bench.STUBBED)
    )
    assert found == expected
    for r in results:
        assert math.isfinite(r.ms) and r.ms > 0, r
    table = harness.ratios(results)
    assert "rms_norm eager" in table and "cross_entropy eager" in table


def test_every_op_has_a_fastlm_and_a_plain_call_that_agree(bench):
    # The plain call is the same computation, so the overhead compares like with like.
    for name, _, fastlm_fn, torch_fn, moved in bench._case_inputs(
        torch.device("cpu"), torch.float64
    ):
        got, want = fastlm_fn(), torch_fn()
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert moved > 0, name
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            assert torch.allclose(g, w, rtol=1e-9, atol=1e-9), (name, (g - w).abs().max())


def test_stubbed_launches_run_no_kernel_and_restore(bench, monkeypatch):
    def interpreter_entered():
        raise AssertionError("a kernel ran under the interpreter inside stubbed_launches()")

    monkeypatch.setattr(launch, "_interpreter_fixes", interpreter_entered)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with bench.stubbed_launches(), fastlm.use_backend("triton"):
        y = ops.rms_norm(x, 16)
    assert y.shape == x.shape and y.dtype == x.dtype
    with pytest.raises(AssertionError, match="kernel ran"), fastlm.use_backend("triton"):
        ops.rms_norm(x, 16)
