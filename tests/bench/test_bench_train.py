"""The training-step benchmark: every provider runs the same loop on the same weights."""

from __future__ import annotations

import pytest
import torch

from fastlm.models import create

pytest.importorskip("transformers")


def test_every_provider_trains_the_same_weights(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", True), [("gpt2-tiny", 2, 16)])
    monkeypatch.setattr(bench, "create", lambda preset, **kw: create(preset, vocab_size=300, **kw))
    cases = list(bench.cases(True, torch.device("cpu")))
    assert {c.provider for c in cases} == {
        "fastlm",
        "fastlm+checkpointing",
        "fastlm unfused loss",
        "transformers-sdpa",
        "transformers-sdpa+checkpointing",
    }
    losses = {}
    for case in cases:
        torch.manual_seed(0)
        loss, norm, tokens, skipped = case.fn()
        assert tokens == case.tokens == 32 and not skipped and case.flops > 0
        losses[case.provider] = loss
    # Same weights, same data, third step of the same loop: the same loss everywhere.
    for provider, loss in losses.items():
        assert loss == pytest.approx(losses["fastlm"], rel=1e-4), provider
