"""fastlm.data.hashing: word, line and character n-gram hashes against their documented
formulas, recomputed here with Python integers."""

from __future__ import annotations

import numpy as np
import pytest

from fastlm.data.hashing import (
    ALNUM,
    LINES,
    WHITESPACE,
    P,
    Q,
    TextHasher,
    ngram_hashes,
    ngram_prefix,
)

M = 2**64


def splitmix64(x: int) -> int:
    x ^= x >> 30
    x = x * 0xBF58476D1CE4E5B9 % M
    x ^= x >> 27
    x = x * 0x94D049BB133111EB % M
    return x ^ (x >> 31)


def word_hash(word: str) -> int:
    """The documented hash: the polynomial of the UTF-8 bytes in base P mod 2**64, xor the
    length times Q, through splitmix64's finalizer."""
    data = word.encode()
    poly = 0
    for b in data:
        poly = (poly * int(P) + b) % M
    return splitmix64(poly ^ (len(data) * int(Q) % M))


def test_word_hashes_follow_the_formula_in_any_batch():
    hasher = TextHasher()
    (words,) = hasher.words(["Hello,  world\tna\u00efve\n\nhello", "", "world"])
    assert words.count.tolist() == [4, 0, 1] and words.first.tolist() == [0, 4, 4]
    expected = ["Hello,", "world", "na\u00efve", "hello", "world"]
    assert words.hashes.tolist() == [word_hash(w) for w in expected]
    assert words.lengths.tolist() == [6, 5, 5, 5, 5]  # characters: "na\u00efve" is 6 bytes
    assert words.doc.tolist() == [0, 0, 0, 0, 2]
    (again,) = hasher.words(["world"])  # the scratch buffer is reused; results do not leak
    assert again.hashes.tolist() == [word_hash("world")]


def test_alnum_and_line_splits():
    hasher = TextHasher(lowercase=True)
    alnum, lines = hasher.words(["Hello, WORLD! x_y 3.14 na\u00efve\n\nB\nb"], (ALNUM, LINES))
    words = ["hello", "world", "x", "y", "3", "14", "na\u00efve", "b", "b"]
    assert alnum.hashes.tolist() == [word_hash(w) for w in words]
    lines_ = ["hello, world! x_y 3.14 na\u00efve", "b", "b"]
    assert lines.hashes.tolist() == [word_hash(w) for w in lines_]
    with pytest.raises(ValueError, match="splits"):
        hasher.words(["x"], ("sentences",))
    assert WHITESPACE != ALNUM != LINES


def test_ngram_hashes_are_the_polynomial_over_word_hashes():
    hashes = np.array([3, 2**63 + 5, 7, 11], dtype=np.uint64)
    prefix = ngram_prefix(hashes)
    q = int(Q)
    got = ngram_hashes(prefix, np.array([0, 1]), 3).tolist()
    assert got == [(3 * q * q + (2**63 + 5) * q + 7) % M, ((2**63 + 5) * q * q + 7 * q + 11) % M]
    assert ngram_hashes(prefix, np.array([2]), np.array([1])).tolist() == [7]


def test_char_ngrams():
    hashes, count = TextHasher().char_ngrams(["abcabc", "ab", "", "\u00e9t\u00e9"], 3)
    assert count.tolist() == [4, 1, 0, 1]
    shingles = ["abc", "bca", "cab", "abc", "ab", "\u00e9t\u00e9"]
    assert hashes.tolist() == [word_hash(s) for s in shingles]
