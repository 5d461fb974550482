"""Shared fixtures for the data tests: the default corpus and a small trained tokenizer."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from fastlm.data import Tokenizer, default_corpus

VOCAB_SIZE = 600  # small, so that training takes milliseconds


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return default_corpus()


@pytest.fixture(scope="session")
def tokenizer(corpus) -> Tokenizer:
    return Tokenizer.train(corpus[:300], VOCAB_SIZE)


def _foreign_tokenizer(special_tokens: list[str]) -> Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=len(special_tokens) + 300,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a small corpus, a small corpus"] * 20, trainer)
    return Tokenizer(tok)


@pytest.fixture
def foreign_tokenizer():
    """Factory of byte-level BPE tokenizers built without fastlm that hold only the given
    special tokens (e.g. GPT-2's lone <|endoftext|>)."""
    return _foreign_tokenizer
