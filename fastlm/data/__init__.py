"""Data for training fastlm models: corpora, tokenization, packing, sampling, objectives.

The pipeline, each step a plain function or class:

1. documents: ``default_corpus()`` (the Python standard library's docstrings, no download)
   or ``read_corpus(paths)``; ``split_documents`` holds out validation documents by hash;
2. tokens: ``Tokenizer.train(docs, vocab_size)`` or ``Tokenizer.load("tokenizer.json")``,
   then ``encode_batch``;
3. rows: ``pack(token_lists, seq_len, separator=tokenizer.eos_id)`` -> (N, seq_len) int32;
4. examples: ``CausalLMDataset``, ``MaskedLMDataset`` or ``SpanCorruptionDataset`` over the
   rows, each example a pure function of (seed, epoch, index);
5. batches: ``ResumableSampler`` indices -> ``collate`` -> model ``forward(**batch)``.
"""

from fastlm.data.corpus import default_corpus, read_corpus, split_documents
from fastlm.data.objectives import (
    IGNORE_INDEX,
    CausalLMDataset,
    MaskedLMDataset,
    SpanCorruptionDataset,
    collate,
    span_corruption_lengths,
)
from fastlm.data.packing import ResumableSampler, pack
from fastlm.data.tokenizer import NUM_SENTINELS, SPECIAL_TOKENS, Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "NUM_SENTINELS",
    "SPECIAL_TOKENS",
    "CausalLMDataset",
    "MaskedLMDataset",
    "ResumableSampler",
    "SpanCorruptionDataset",
    "Tokenizer",
    "collate",
    "default_corpus",
    "pack",
    "read_corpus",
    "span_corruption_lengths",
    "split_documents",
]
