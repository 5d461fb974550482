"""fastlm.data.dedup: exact deduplication, MinHash estimates against true Jaccard
similarities, the LSH banding, near-deduplication and the contamination check.

Documents built from unique tokens have shingle sets whose similarity is known in closed
form: with n-word shingles, ``tokens[0:N]`` and ``tokens[k:N+k]`` share the N - n + 1 - k
windows that start in [k, N - n] out of N - n + 1 + k in all."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from fastlm.data import (
    Contamination,
    ExactDedup,
    MinHasher,
    NearDedup,
    contamination,
    jaccard,
    lsh_params,
)
from fastlm.data.dedup import EMPTY, digest

N = 200  # tokens per constructed document


def window(prefix: str, start: int, n: int = N) -> str:
    return " ".join(f"{prefix}{i}" for i in range(start, start + n))


def true_jaccard(shift: int, n: int = N, size: int = 5) -> float:
    windows = n - size + 1
    return (windows - shift) / (windows + shift)


def sigma(j: float, num_perm: int) -> float:
    """Standard deviation of the estimate: the fraction of num_perm independent matches."""
    return math.sqrt(j * (1 - j) / num_perm)


# ---------------------------------------------------------------------------------------------
# exact


def test_exact_dedup_numbers_documents_and_reports_the_first():
    dedup = ExactDedup()
    assert [dedup.add(t) for t in ["a", "b", "a", "c", "b", "a"]] == [None, None, 0, None, 1, 0]
    assert len(dedup) == 3
    assert digest("caf\u00e9") == hashlib.blake2b("caf\u00e9".encode(), digest_size=16).digest()
    assert len(digest("")) == 16


# ---------------------------------------------------------------------------------------------
# MinHash


def test_true_jaccard_formula_on_sets():
    """The closed form against set arithmetic on the shingles themselves."""
    a, b = window("w", 0).split(), window("w", 30).split()
    sa = {tuple(a[i : i + 5]) for i in range(len(a) - 4)}
    sb = {tuple(b[i : i + 5]) for i in range(len(b) - 4)}
    assert len(sa & sb) / len(sa | sb) == true_jaccard(30) == 166 / 226


@pytest.mark.parametrize("shift", [0, 5, 20, 50, 100, 150])
def test_minhash_estimates_within_the_binomial_bound(shift):
    """Ten seeds, 256 permutations: every estimate within 4.5 standard deviations (plus one
    permutation's worth) of the true value, and no drift in their mean."""
    j, num_perm = true_jaccard(shift), 256
    a, b = window("w", 0), window("w", shift)
    errors = []
    for seed in range(10):
        sa, sb = MinHasher(num_perm, seed=seed)([a, b])
        errors.append(jaccard(sa, sb) - j)
    bound = 4.5 * sigma(j, num_perm) + 1 / num_perm
    assert max(map(abs, errors)) <= bound, (errors, bound)
    assert abs(np.mean(errors)) <= 4 * sigma(j, num_perm) / math.sqrt(10) + 1 / num_perm


def test_char_shingles_estimate_the_character_jaccard():
    a = "the quick brown fox jumps over the lazy dog " * 3 + "and then some more words"
    b = a.replace("quick", "slow").replace("lazy", "sleepy")

    def shingles(t: str) -> set[str]:
        t = " ".join(t.lower().split())
        return {t[i : i + 5] for i in range(len(t) - 4)}

    j = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    errors = []
    for seed in range(5):
        sa, sb = MinHasher(256, shingle="char", shingle_size=5, seed=seed)([a, b])
        errors.append(jaccard(sa, sb) - j)
    assert max(map(abs, errors)) <= 4.5 * sigma(j, 256) + 1 / 256, (errors, j)


def test_minhash_ignores_case_punctuation_and_batching():
    m = MinHasher(64)
    a = "Hello, World! This is -- a test; of the tokenizer."
    b = "hello world this is a test of the tokenizer"
    alone = m([a])[0]
    assert (alone == m([b])[0]).all()
    batch = m(["something else entirely here", a, "x"])
    assert (batch[1] == alone).all()
    assert batch.dtype == np.uint32 and batch.shape == (3, 64)
    # Deterministic from the seed, in any instance; another seed, other functions.
    assert (MinHasher(64, seed=0)([a])[0] == alone).all()
    assert (MinHasher(64, seed=1)([a])[0] != alone).mean() > 0.9


def test_minhash_short_and_empty_documents():
    m = MinHasher(32)
    sigs = m(["", "...", "two words", "two words", "one two three four five six"])
    assert (sigs[0] == EMPTY).all() and (sigs[1] == EMPTY).all()  # no words at all
    assert not (sigs[2] == EMPTY).all()  # fewer words than a shingle: one shingle
    assert (sigs[2] == sigs[3]).all()
    assert jaccard(sigs[2], sigs[4]) < 0.5


# ---------------------------------------------------------------------------------------------
# LSH


def test_lsh_params_by_hand():
    # 0.8 and 128: 7 rows x 18 bands: 1 - (1 - 0.8**7)**18 = 0.986 >= 0.95, while 8 rows x 16
    # bands give 1 - (1 - 0.8**8)**16 = 0.947.
    assert lsh_params(0.8, 128) == (18, 7)
    # 0.9: 12 x 10: 1 - (1 - 0.2824)**10 = 0.964; 13 x 9: 1 - (1 - 0.2542)**9 = 0.929.
    assert lsh_params(0.9, 128) == (10, 12)
    # 0.5: 3 x 42: 1 - 0.875**42 = 0.996; 4 x 32: 1 - 0.9375**32 = 0.873.
    assert lsh_params(0.5, 128) == (42, 3)
    assert lsh_params(1.0, 16) == (1, 16)  # identical signatures always share the band


def test_near_dedup_finds_pairs_well_above_the_threshold_and_not_below():
    high, low = 4, 70  # shifts: J = 192/200 = 0.96, and 126/266 = 0.47
    assert true_jaccard(high) == 0.96 and true_jaccard(low) == 126 / 266
    bases = [window(f"d{i}w", 0) for i in range(30)]  # disjoint vocabularies
    near = [window(f"d{i}w", high) for i in range(15)]
    far = [window(f"d{i}w", low) for i in range(15, 30)]
    dedup = NearDedup(threshold=0.8, num_perm=128)
    assert dedup.add(bases) == [None] * 30
    found = dedup.add(near + far)
    for i, match in enumerate(found[:15]):
        assert match is not None and match[0] == i, (i, match)
        assert abs(match[1] - 0.96) <= 4.5 * sigma(0.96, 128) + 1 / 128
    assert found[15:] == [None] * 15
    # The kept far variants were indexed (numbered after the 30 bases and 15 near ones).
    assert dedup.add([far[0]]) == [(45, 1.0)]


def test_near_dedup_does_not_depend_on_how_the_stream_is_cut():
    docs = [window("a", 0), window("a", 3), window("b", 0), window("a", 6), window("b", 2), ""]
    whole = NearDedup().add(docs)
    one_by_one = NearDedup()
    assert [one_by_one.add([d])[0] for d in docs] == whole
    # Within a batch too: the second and fourth duplicate the first, the fifth the third;
    # the empty text is kept, not indexed.
    assert [m if m is None else m[0] for m in whole] == [None, 0, None, 0, 2, None]


def test_contamination_reports_exact_and_near_duplicates():
    train = [window("t", 0), window("u", 0), window("v", 0)]
    evals = [window("x", 0), window("u", 0), window("v", 8), window("t", 90)]
    found = contamination(iter(train), iter(evals), threshold=0.8, num_perm=128)
    assert [(c.eval_index, c.train_index, c.exact) for c in found] == [(1, 1, True), (2, 2, False)]
    assert found[0] == Contamination(1, 1, 1.0, True)
    j = true_jaccard(8)  # 188/204 = 0.92
    assert abs(found[1].jaccard - j) <= 4.5 * sigma(j, 128) + 1 / 128
    # Window t90 and t0 share 106 of 286 shingles: J = 0.37, not reported.
    assert contamination([], evals) == []


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="num_perm"):
        MinHasher(0)
    with pytest.raises(ValueError, match="shingle"):
        MinHasher(shingle="line")
    with pytest.raises(ValueError, match="shingle_size"):
        MinHasher(shingle_size=0)
    with pytest.raises(ValueError, match="threshold"):
        lsh_params(0.0, 128)
    with pytest.raises(TypeError, match="threshold"):
        NearDedup(threshold="0.8")
    with pytest.raises(ValueError, match="threshold"):
        contamination(["a"], ["a"], threshold=1.5)
    with pytest.raises(ValueError, match="signatures"):
        jaccard(np.zeros(4, np.uint32), np.zeros(5, np.uint32))
    with pytest.raises(TypeError, match=r"docs\[1\]"):
        contamination(["a", 3], [])
