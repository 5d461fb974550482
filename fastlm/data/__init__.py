"""Data for training fastlm models: corpora, cleaning, tokenization, packing, sampling,
objectives.

The pipeline, each step a plain function or class:

1. documents: ``default_corpus()`` (the Python standard library's docstrings, no download)
   or ``read_corpus(paths)`` (``corpus_files`` + ``iter_file`` to stream them instead);
2. cleaning: ``clean_corpus(docs, CleanConfig(...))`` -> (docs, ``Report``), streaming with
   ``Cleaner``: ``normalize`` (Unicode, whitespace, control characters), ``PIIScrubber``
   (e-mail, phone, IP, card numbers -> placeholders), ``QualityFilter`` (length, letters,
   repeated lines and n-grams), ``ExactDedup`` and ``NearDedup`` (MinHash + LSH); also the
   ``fastlm data clean`` command;
3. split: ``split_documents`` holds out validation documents by hash; ``contamination``
   lists validation documents that duplicate training ones;
4. tokens: ``Tokenizer.train(docs, vocab_size)`` or ``Tokenizer.load("tokenizer.json")``,
   then ``encode_batch``;
5. rows: ``pack(token_lists, seq_len, separator=tokenizer.eos_id)`` -> (N, seq_len) int32;
6. examples: ``CausalLMDataset``, ``MaskedLMDataset`` or ``SpanCorruptionDataset`` over the
   rows, each example a pure function of (seed, epoch, index);
7. batches: ``ResumableSampler`` indices -> ``collate`` -> model ``forward(**batch)``.

Fine-tuning files: :mod:`fastlm.data.glue` reads GLUE-style TSV / JSONL classification
files (examples, their label set, BERT's sentence-pair encoding).
"""

from fastlm import lazy

__getattr__, __dir__, __all__ = lazy.exports(
    __name__,
    {
        "fastlm.data.clean": (
            "CleanConfig",
            "QualityFilter",
            "Report",
            "alpha_fraction",
            "alpha_fractions",
            "dup_ngram_fractions",
            "normalize",
            "repeated_line_fraction",
            "repeated_line_fractions",
        ),
        "fastlm.data.corpus": (
            "corpus_files",
            "default_corpus",
            "iter_file",
            "read_corpus",
            "split_documents",
        ),
        "fastlm.data.dedup": (
            "Contamination",
            "ExactDedup",
            "LSHIndex",
            "MinHasher",
            "NearDedup",
            "contamination",
            "jaccard",
            "lsh_params",
        ),
        "fastlm.data.objectives": (
            "IGNORE_INDEX",
            "CausalLMDataset",
            "MaskedLMDataset",
            "SpanCorruptionDataset",
            "collate",
            "span_corruption_lengths",
        ),
        "fastlm.data.packing": ("ResumableSampler", "pack"),
        "fastlm.data.pipeline": ("Cleaner", "clean_corpus"),
        "fastlm.data.privacy": ("PIIScrubber", "luhn_valid"),
        "fastlm.data.tokenizer": ("NUM_SENTINELS", "SPECIAL_TOKENS", "Tokenizer"),
    },
)
