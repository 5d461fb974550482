"""Shared fixtures of the evaluation tests: a small trained tokenizer."""

from __future__ import annotations

import pytest

from fastlm.data import Tokenizer, default_corpus


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(default_corpus()[:300], 600)
