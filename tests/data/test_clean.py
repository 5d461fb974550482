"""fastlm.data.clean: normalization, the document statistics, the quality filters and their
configuration. Every expected value is worked out by hand in the test."""

from __future__ import annotations

import sys
import unicodedata

import numpy as np
import pytest

from fastlm.data import (
    CleanConfig,
    QualityFilter,
    alpha_fraction,
    alpha_fractions,
    dup_ngram_fractions,
    normalize,
    repeated_line_fraction,
    repeated_line_fractions,
)

# ---------------------------------------------------------------------------------------------
# normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # \u00a0 -> space, \r\n -> \n, \x00 and \x07 removed, the inner tabs and the run of
        # spaces -> one space, the trailing spaces dropped, 3 and 4 line breaks -> 2, the
        # document stripped (indentation of the first line too); the tab indenting a line stays.
        (
            "  Hello,\u00a0world!\r\n\r\n\r\n\tIndented\t\tline   \x00\x07end  \n\n\n\nLast",
            "Hello, world!\n\n\tIndented line end\n\nLast",
        ),
        # Every line separator of str.splitlines becomes \n.
        ("a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei\rj", "a\nb\nc\nd\ne\nf\ng\nh\ni\nj"),
        # Other whitespace becomes a space (and a run of it one space).
        ("a\u3000b\u2003c\x1fd\u202f \u205fe", "a b c d e"),
        # Indentation is kept; inside the line, runs collapse.
        ("def f():\n    return  1   # one\n\n", "def f():\n    return 1 # one"),
        # C1 controls and lone surrogates are removed.
        ("a\x80b\x9fc\ud800d", "abcd"),
        # Lines of whitespace only become empty, and then a paragraph break.
        ("one\n \t \n  \n\ntwo", "one\n\ntwo"),
        ("", ""),
        (" \n\t\u00a0", ""),
    ],
)
def test_normalize_crafted_strings(raw, expected):
    assert normalize(raw) == expected
    assert normalize(expected) == expected


def test_normalize_forms():
    # "e" + combining acute -> the precomposed U+00E9 under both forms; the ligature U+FB01
    # and the superscript two are compatibility characters: only NFKC folds them.
    assert normalize("caf" + "e\u0301") == "caf\u00e9"
    assert normalize("caf" + "e\u0301", "NFKC") == "caf\u00e9"
    assert normalize("\ufb01ne x\u00b2") == "\ufb01ne x\u00b2"
    assert normalize("\ufb01ne x\u00b2", "NFKC") == "fine x2"
    # NFKC can produce spaces (U+00A8 is " " + combining diaeresis); they are collapsed too.
    assert normalize("a \u00a8b", "NFKC") == "a \u0308b"


def test_normalize_every_code_point():
    """All of Unicode at once: no control character but \\t and \\n, no whitespace but
    " \\t\\n", no surrogate, NFC-normalized, and normalizing again changes nothing."""
    text = "".join(chr(i) + ("\n" if i % 64 == 0 else "x") for i in range(sys.maxunicode + 1))
    for form in ("NFC", "NFKC"):
        out = normalize(text, form)
        bad = {
            c
            for c in set(out)
            if (unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n")
            or (c.isspace() and c not in " \t\n")
        }
        assert not bad, sorted(map(hex, map(ord, bad)))[:10]
        assert unicodedata.is_normalized(form, out)
        assert normalize(out, form) == out


def test_normalize_is_idempotent_on_the_corpus(corpus):
    once = [normalize(d) for d in corpus[:400]]
    assert [normalize(d) for d in once] == once
    assert any(a != b for a, b in zip(once, corpus, strict=False))  # it did something


def test_normalize_rejects_bad_arguments():
    with pytest.raises(TypeError, match="text"):
        normalize(b"bytes")
    with pytest.raises(ValueError, match="normalization"):
        normalize("x", "NFD")


# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ab1 2", 2 / 4),  # visible: a b 1 2
        ("h\u00e9llo w\u00f6rld 123", 10 / 13),  # 10 letters, 3 digits
        ("\u65e5\u672c\u8a9e\u3067\u3059\u3002", 5 / 6),  # the ideographic full stop is not one
        ("\u65e5\u3000\u672c", 1.0),  # the ideographic space is whitespace
        ("\u03b1\u03b2\u03b3!", 3 / 4),
        (" \n\t", 0.0),
        ("", 0.0),
    ],
)
def test_alpha_fraction(text, expected):
    assert alpha_fraction(text) == pytest.approx(expected)


def test_alpha_fractions_of_a_batch():
    # ASCII and non-ASCII batches take different paths; neighbours do not leak into each other
    # (the "\n" joining them is not counted).
    ascii_batch = ["ab1 2", "", "x\ty\x1fz\x0b!", "12"]
    assert alpha_fractions(ascii_batch).tolist() == pytest.approx([2 / 4, 0.0, 3 / 4, 0.0])
    mixed = ["ab1 2", "\u03b1\u03b2\u03b3!", "", "\u65e5\u3000\u672c"]
    assert alpha_fractions(mixed).tolist() == pytest.approx([2 / 4, 3 / 4, 0.0, 1.0])
    assert alpha_fractions([]).shape == (0,)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a\nb\na\n\nc\na", 2 / 5),  # 5 non-empty lines, 3 distinct
        ("a\nb\nc", 0.0),
        ("same\nsame\nsame\nsame", 3 / 4),
        ("\n\n", 0.0),
        ("x", 0.0),
    ],
)
def test_repeated_line_fraction(text, expected):
    assert repeated_line_fraction(text) == pytest.approx(expected)


def test_repeated_line_fractions_of_a_batch():
    # The same line in two documents is no repeat; a document's lines are its own.
    batch = ["a\nb", "a\nb\na", "", "a\nb\nb\nb\n"]
    assert repeated_line_fractions(batch).tolist() == pytest.approx([0.0, 1 / 3, 0.0, 2 / 4])


def test_dup_ngram_fractions_by_hand():
    docs = [
        # 5-grams: "a b c d e" at 0 and 5; covered words 0-9: 10 of 13 one-letter words. No
        # 6-gram repeats.
        "a b c d e a b c d e x y z",
        # 3-grams: "aa b ccc" at 0 and 3, covering words 0-5: 2+1+3+2+1+3 = 12 of 13 chars.
        "aa b ccc aa b ccc d",
        # Overlapping 2-grams "x x" at 0, 1, 2: every word.
        "x x x x",
        # Characters, not bytes: "\u00e9\u00e9 b" at 0 and 2 covers words 0-3, 6 of 7.
        "\u00e9\u00e9 b \u00e9\u00e9 b z",
        # Fewer words than n: none.
        "one two",
    ]
    got = dup_ngram_fractions(docs, [2, 3, 5, 6])
    assert got.shape == (5, 4)
    expected = [
        [10 / 13, 10 / 13, 10 / 13, 0.0],  # bigrams "a b".."d e" repeat as well
        [12 / 13, 12 / 13, 0.0, 0.0],  # "aa b" and "b ccc" repeat: the same 6 words
        [1.0, 1.0, 0.0, 0.0],  # trigrams "x x x" at 0 and 1
        [6 / 7, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0],
    ]
    assert got == pytest.approx(np.array(expected))


def test_dup_ngram_fractions_count_within_a_document_only():
    # The same text twice in one batch: no n-gram repeats inside either.
    got = dup_ngram_fractions(["a b c d e f", "a b c d e f", "g"], [5])
    assert got.tolist() == [[0.0], [0.0], [0.0]]
    # And a document's value does not depend on its batch.
    alone = dup_ngram_fractions(["aa b ccc aa b ccc d"], [3])
    batched = dup_ngram_fractions(["zz", "aa b ccc aa b ccc d", "aa b ccc"], [3])
    assert batched[1, 0] == alone[0, 0] == pytest.approx(12 / 13)
    assert dup_ngram_fractions([], [5]).shape == (0, 1)
    assert dup_ngram_fractions(["a b c"], [5]).tolist() == [[0.0]]  # fewer words than n
    with pytest.raises(ValueError, match="ns"):
        dup_ngram_fractions(["a b c"], [0])


# ---------------------------------------------------------------------------------------------
# QualityFilter

OFF = dict(
    min_chars=0, min_alpha_fraction=0.0, max_repeated_line_fraction=1.0, max_dup_ngram_fraction={}
)


@pytest.mark.parametrize(
    ("settings", "kept", "removed", "reason"),
    [
        (dict(min_chars=10), "a" * 10, "a" * 9, "min_chars"),
        (dict(max_chars=20), "a" * 20, "a" * 21, "max_chars"),
        # 2 letters of 4 visible characters is 0.5: at the bound, kept; 2 of 5 is below.
        (dict(min_alpha_fraction=0.5), "ab 12", "ab 123", "alpha_fraction"),
        # 1 repeat in 4 lines is 0.25, at the bound; 1 in 3 is above.
        (dict(max_repeated_line_fraction=0.25), "a\nb\nc\na", "a\nb\na", "repeated_lines"),
        # "a b" repeats: words 0-3 covered, 4 of 8 characters (0.5, at the bound) and 4 of 7.
        (dict(max_dup_ngram_fraction={2: 0.5}), "a b a b c d e f", "a b a b c d e", "dup_ngrams"),
    ],
)
def test_each_filter_at_its_threshold(settings, kept, removed, reason):
    quality = QualityFilter(CleanConfig(**{**OFF, **settings}))
    assert quality([kept, removed, kept]) == [None, reason, None]


def test_a_document_counts_under_the_first_filter_it_fails():
    quality = QualityFilter(
        CleanConfig(
            min_chars=5,
            min_alpha_fraction=0.5,
            max_repeated_line_fraction=0.3,
            max_dup_ngram_fraction={2: 0.5},
        )
    )
    docs = [
        "1\n1",  # too short (3 characters), no letters, repeated lines
        "12345\n12345",  # long enough, no letters, repeated lines
        "ab ab\nab ab\nab ab",  # letters; 2 of 3 lines repeat; "ab ab" bigrams repeat
        "ab ab ab ab ab ab",  # one line; "ab ab" repeats, covering all
        "the cat sat on the mat",  # fine: no bigram repeats
    ]
    assert quality(docs) == ["min_chars", "alpha_fraction", "repeated_lines", "dup_ngrams", None]


def test_default_config_filters_the_corpus_moderately(corpus):
    docs = [normalize(d) for d in corpus[:500]]
    reasons = QualityFilter(CleanConfig())(docs)
    removed = sum(r is not None for r in reasons)
    # Docstrings are curated text: the Gopher thresholds drop a few (repetitive doctests).
    assert 0 < removed < 0.15 * len(docs)


# ---------------------------------------------------------------------------------------------
# CleanConfig


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("normalization", "NFD", ValueError),
        ("scrub_pii", 1, TypeError),
        ("filters", "yes", TypeError),
        ("min_chars", -1, ValueError),
        ("min_chars", 1.5, TypeError),
        ("max_chars", 0, ValueError),
        ("min_alpha_fraction", 1.5, ValueError),
        ("max_repeated_line_fraction", -0.1, ValueError),
        ("max_dup_ngram_fraction", [0.1], TypeError),
        ("max_dup_ngram_fraction", {0: 0.1}, ValueError),
        ("max_dup_ngram_fraction", {5: 2.0}, ValueError),
        ("threshold", 0.0, ValueError),
        ("threshold", 1.5, ValueError),
        ("threshold", float("nan"), ValueError),
        ("num_perm", 0, ValueError),
        ("shingle", "sentence", ValueError),
        ("shingle_size", 0, ValueError),
        ("seed", -1, ValueError),
        ("exact_dedup", None, TypeError),
    ],
)
def test_config_errors_name_the_field(field, value, error):
    with pytest.raises(error, match=field):
        CleanConfig(**{field: value})


def test_config_max_chars_must_not_be_below_min_chars():
    with pytest.raises(ValueError, match="max_chars"):
        CleanConfig(min_chars=50, max_chars=49)
    assert CleanConfig(min_chars=50, max_chars=50).max_chars == 50
