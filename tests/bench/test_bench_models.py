"""The model benchmark: every provider's cases run on CPU and time the same weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")


def test_quick_cpu_cases_run_for_every_provider(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), ([("gpt2-tiny", 2, 8)], ((1, 2), 4, 3)))
    cases = list(bench.cases(True, torch.device("cpu")))
    providers = {"fastlm", "transformers-eager", "transformers-sdpa", "transformers+fastlm.patch"}
    assert {c.provider for c in cases} == providers
    assert {c.op for c in cases} == {"gpt2-tiny fwd", "gpt2-tiny fwd+bwd", "gpt2-tiny decode"}
    decoded = {}
    for case in cases:
        out = case.fn()
        assert case.tokens > 0 and case.flops > 0
        if case.op.endswith("decode"):
            assert out.shape == (case.shape[0], case.shape[1] + case.shape[2])
            decoded.setdefault(case.shape, []).append(out)
    # The same prompts and weights for every provider: the same greedy tokens.
    for outs in decoded.values():
        assert len(outs) == len(providers)
        assert all(torch.equal(o, outs[0]) for o in outs)
