"""Deduplication: exact (a hash of the text) and near-duplicate (MinHash with LSH banding),
both streaming, and a contamination check between training and evaluation documents.

Exact: :class:`ExactDedup` keeps the 16-byte BLAKE2b digest of every distinct text it has
seen (pass normalized text, as :func:`fastlm.data.pipeline.clean_corpus` does, so that
documents differing only in encoding details are duplicates).

Near: the shingles of a document are its word n-grams (lowercased, punctuation dropped;
default 5 words: a one-word edit changes at most 5 of them) or its character n-grams. The
Jaccard similarity of two shingle sets, ``|A & B| / |A | B|``, is the probability that the
minimum of a random hash function over A equals its minimum over B; a MinHash signature
holds the minima of ``num_perm`` independent hash functions, and the fraction of equal
entries of two signatures estimates the similarity with standard deviation
``sqrt(J (1 - J) / num_perm)`` (0.035 at J = 0.8 with 128 permutations).

Hash functions: shingles are hashed to 64 bits and mixed (:mod:`fastlm.data.hashing`);
their top 32 bits ``x`` go through ``h_i(x) = ((a_i * x + b_i) mod 2**64) >> 32`` with
random 64-bit ``a_i``, ``b_i``: Dietzfelbinger's multiply-add-shift family, strongly
universal for 32-bit keys. It stands in for the textbook ``(a x + b) mod (2**61 - 1)``,
whose 122-bit products numpy cannot form (implementations that write it with uint64
overflow silently compute something else); here the modulus is free.

LSH: a signature is cut into ``bands`` bands of ``rows`` entries; two documents become
candidates when some band is identical in both, with probability ``1 - (1 - J**rows) **
bands`` (an S-curve in J). Each candidate is then verified: it is a near-duplicate when its
estimated Jaccard from the full signatures is at least the threshold. Since verification
rejects false candidates, the banding is chosen for recall: the fewest bands (the least
memory) whose S-curve passes the threshold with probability at least 0.95
(:func:`lsh_params`; 128 permutations at threshold 0.8: 18 bands of 7 rows, a pair at
J = 0.9 becomes a candidate with probability 0.99999, at J = 0.5 with 0.13).

Memory of :class:`NearDedup`, per document kept: its signature (4 bytes per permutation,
512 bytes by default) and one entry per band in the band tables (a dict of band hash ->
first document, ~100 bytes an entry in CPython: ~1.8 KB at 18 bands): 2.4 KB in all,
measured with tracemalloc; documents found duplicate add nothing. Documents stream through
in batches: the corpus itself is never held.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from fastlm.data.hashing import ALNUM, TextHasher, mix64, ngram_hashes, ngram_prefix

U64 = np.uint64
EMPTY = np.uint32(0xFFFFFFFF)  # every entry of the signature of a text without shingles
MIN_RECALL = 0.95  # candidate probability the banding must reach at the threshold
_CHUNK = 4096  # shingles hashed at a time: (num_perm, 4096) uint64 is 4 MiB at 128


def digest(text: str) -> bytes:
    """The 16-byte BLAKE2b digest of ``text`` in UTF-8: the key of exact deduplication."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class ExactDedup:
    """Streaming exact deduplication: ``add(text)`` returns the number of the earlier
    document with the same text (documents are numbered 0, 1, ... in the order they were
    added, duplicates included), or None when the text is new. State: one 16-byte digest
    and its number per distinct text (110 bytes in CPython, measured with tracemalloc)."""

    def __init__(self) -> None:
        self._first: dict[bytes, int] = {}
        self._added = 0

    def add(self, text: str) -> int | None:
        key = digest(text)
        first = self._first.setdefault(key, self._added)
        self._added += 1
        return None if first == self._added - 1 else first

    def __len__(self) -> int:
        """Distinct texts seen."""
        return len(self._first)


def batches(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """``docs`` in consecutive lists of about ``max_chars`` characters (at least one document
    each), so that vectorized steps see many documents at once while memory stays bounded."""
    batch: list[str] = []
    size = 0
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise TypeError(f"docs[{i}] must be a str, got {type(doc).__name__}")
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# MinHash


class MinHasher:
    """MinHash signatures: ``minhasher(texts)`` -> (len(texts), num_perm) uint32.

    ``shingle="word"``: the ``shingle_size``-word n-grams of the lowercased text, words
    being runs of letters and digits (ASCII punctuation separates and is dropped; a text
    with fewer words has one shingle, all of them). ``shingle="char"``: the
    ``shingle_size``-character n-grams of the lowercased text with its whitespace collapsed
    to single spaces (for scripts written without spaces; ~3x slower on English text, which
    has ~6x more characters than words: 9 MB/s against 30 MB/s per core). A text without
    shingles gets a signature of :data:`EMPTY` entries.

    The hash functions are drawn from ``seed``: the same seed gives the same signatures in
    any process.
    """

    def __init__(
        self, num_perm: int = 128, shingle: str = "word", shingle_size: int = 5, seed: int = 0
    ) -> None:
        if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 1:
            raise ValueError(f"num_perm must be a positive int, got {num_perm!r}")
        if shingle not in ("word", "char"):
            raise ValueError(f"shingle must be 'word' or 'char', got {shingle!r}")
        if isinstance(shingle_size, bool) or not isinstance(shingle_size, int) or shingle_size < 1:
            raise ValueError(f"shingle_size must be a positive int, got {shingle_size!r}")
        self.num_perm, self.shingle, self.shingle_size = num_perm, shingle, shingle_size
        rng = np.random.default_rng(seed)
        self._a = rng.integers(0, 2**64, num_perm, dtype=U64, endpoint=False)[:, None]
        self._b = rng.integers(0, 2**64, num_perm, dtype=U64, endpoint=False)[:, None]
        self._hasher = TextHasher(lowercase=True)
        self._work = np.empty((num_perm, _CHUNK), U64)

    def shingles(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The 64-bit hashes of the shingles of ``texts``, in text order, and how many each
        text has (repeated shingles repeat: the minimum does not care)."""
        n = self.shingle_size
        if self.shingle == "char":
            return self._hasher.char_ngrams([" ".join(t.split()) for t in texts], n)
        (words,) = self._hasher.words(texts, (ALNUM,))
        count = np.where(words.count >= n, words.count - n + 1, np.minimum(words.count, 1))
        text = np.repeat(np.arange(len(texts)), count)
        start = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        start += words.first[text]
        size = np.minimum(words.count, n)[text]
        hashes = ngram_hashes(ngram_prefix(words.hashes), start, size)
        # N-gram hashes are polynomials of mixed word hashes; mixing again spreads them.
        return mix64(hashes), count

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        shingles, count = self.shingles(texts)
        keys = shingles >> U64(32)  # 32-bit keys for the multiply-add-shift family
        signatures = np.full((self.num_perm, len(texts)), np.iinfo(U64).max, U64)
        text = np.repeat(np.arange(len(texts)), count)
        for lo in range(0, len(keys), _CHUNK):
            chunk, owner = keys[lo : lo + _CHUNK], text[lo : lo + _CHUNK]
            values = self._work[:, : len(chunk)]
            np.multiply(self._a, chunk[None, :], out=values)
            values += self._b
            # Minima per text in the chunk; a shift is monotonic, so it can wait.
            segments = np.flatnonzero(np.diff(owner, prepend=-1))
            minima = np.minimum.reduceat(values, segments, axis=1)
            ids = owner[segments]
            signatures[:, ids] = np.minimum(signatures[:, ids], minima)
        return np.ascontiguousarray((signatures >> U64(32)).astype(np.uint32).T)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """The Jaccard similarity estimated from two MinHash signatures: the fraction of equal
    entries."""
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"signatures must be 1-D of the same length, got {a.shape} and {b.shape}")
    return float(np.count_nonzero(a == b)) / len(a)


def _check_threshold(threshold: object) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if not 0 < threshold <= 1:  # NaN fails too
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """The probability that two documents of Jaccard ``similarity`` share a band:
    ``1 - (1 - s**rows) ** bands``."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for near-duplicates at ``threshold``: the most rows per band (so the
    fewest bands and the fewest false candidates) with ``bands = num_perm // rows`` whose
    candidate probability at the threshold is at least :data:`MIN_RECALL`. Permutations
    beyond ``bands * rows`` still serve verification."""
    _check_threshold(threshold)
    if isinstance(num_perm, bool) or not isinstance(num_perm, int) or num_perm < 1:
        raise ValueError(f"num_perm must be a positive int, got {num_perm!r}")
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if candidate_probability(threshold, bands, rows) >= MIN_RECALL:
            return bands, rows
    return num_perm, 1  # rows=1 always reaches it unless the threshold is tiny


class LSHIndex:
    """Signatures of indexed documents in LSH band tables, for near-duplicate queries.

    ``keys(signatures)`` hashes each band of each signature to a 64-bit key; ``insert(id,
    signature, keys)`` adds a document (each band table keeps the first document that
    filled a bucket); ``query(signature, keys)`` returns ``(id, estimated Jaccard)`` of
    the most similar document sharing a band with it, if that is at least ``threshold``,
    else None.
    """

    def __init__(self, threshold: float, num_perm: int, seed: int = 0) -> None:
        self.threshold, self.num_perm = threshold, num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        rng = np.random.default_rng([seed, 1])
        self._mult = rng.integers(0, 2**64, self.rows, dtype=U64, endpoint=False) | U64(1)
        self._tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
        self._signatures = np.empty((16, num_perm), np.uint32)
        self._ids: list[int] = []

    def __len__(self) -> int:
        return len(self._ids)

    def keys(self, signatures: np.ndarray) -> np.ndarray:
        """(D, bands) uint64: the key of each band of each (D, num_perm) signature."""
        used = signatures[:, : self.bands * self.rows].astype(U64)
        bands = used.reshape(len(signatures), self.bands, self.rows)
        return (bands * self._mult).sum(axis=2, dtype=U64)

    def query(self, signature: np.ndarray, keys: np.ndarray) -> tuple[int, float] | None:
        rows = {
            r
            for t, k in zip(self._tables, keys.tolist(), strict=True)
            if (r := t.get(k)) is not None
        }
        if not rows:
            return None
        rows_list = sorted(rows)
        equal = np.count_nonzero(self._signatures[rows_list] == signature, axis=1)
        best = int(np.argmax(equal))  # the first of equals: the earliest document
        similarity = int(equal[best]) / self.num_perm
        if similarity < self.threshold:
            return None
        return self._ids[rows_list[best]], similarity

    def insert(self, id: int, signature: np.ndarray, keys: np.ndarray) -> None:
        row = len(self._ids)
        if row == len(self._signatures):
            self._signatures = np.concatenate([self._signatures, np.empty_like(self._signatures)])
        self._signatures[row] = signature
        self._ids.append(id)
        for table, key in zip(self._tables, keys.tolist(), strict=True):
            table.setdefault(key, row)


class NearDedup:
    """Streaming near-deduplication: ``add(texts)`` takes the next batch of documents
    (numbered 0, 1, ... over all batches, duplicates included) and returns, for each in
    order, None when it is kept (and indexed), or ``(number, estimated Jaccard)`` of the
    kept document it nearly duplicates. Documents of a batch are compared with the earlier
    ones of the same batch too, so the result does not depend on how the stream is cut.
    Texts without shingles are kept and not indexed."""

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        shingle: str = "word",
        shingle_size: int = 5,
        seed: int = 0,
    ) -> None:
        self.minhash = MinHasher(num_perm, shingle, shingle_size, seed)
        self.index = LSHIndex(threshold, num_perm, seed)
        self._added = 0

    def add(self, texts: Sequence[str]) -> list[tuple[int, float] | None]:
        signatures = self.minhash(texts)
        keys = self.index.keys(signatures)
        out: list[tuple[int, float] | None] = []
        for signature, key in zip(signatures, keys, strict=True):
            match = None
            if not (signature == EMPTY).all():
                match = self.index.query(signature, key)
                if match is None:
                    self.index.insert(self._added, signature, key)
            out.append(match)
            self._added += 1
        return out


@dataclasses.dataclass(frozen=True)
class Contamination:
    """An evaluation document that duplicates a training document."""

    eval_index: int  # position in eval_docs
    train_index: int  # position in train_docs (the first such training document)
    jaccard: float  # estimated from the signatures; 1.0 for an exact duplicate
    exact: bool  # the same text (digest), not only similar shingles


def contamination(
    train_docs: Iterable[str],
    eval_docs: Iterable[str],
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle: str = "word",
    shingle_size: int = 5,
    seed: int = 0,
    batch_chars: int = 1 << 18,
) -> list[Contamination]:
    """Evaluation documents that exactly or nearly (estimated Jaccard >= ``threshold``)
    duplicate a training document, in evaluation order.

    Both streams are read once, in batches of ``batch_chars`` characters: the training
    documents' digests and LSH index are kept (see the module docstring for the memory),
    the evaluation documents are only queried. Pass normalized text for exact matches to
    ignore encoding details.
    """
    minhash = MinHasher(num_perm, shingle, shingle_size, seed)
    index = LSHIndex(threshold, num_perm, seed)
    first: dict[bytes, int] = {}
    seen = 0
    for batch in batches(train_docs, batch_chars):
        signatures = minhash(batch)
        for signature, key, text in zip(signatures, index.keys(signatures), batch, strict=True):
            first.setdefault(digest(text), seen)
            if not (signature == EMPTY).all():
                index.insert(seen, signature, key)
            seen += 1
    found: list[Contamination] = []
    seen = 0
    for batch in batches(eval_docs, batch_chars):
        signatures = minhash(batch)
        for signature, key, text in zip(signatures, index.keys(signatures), batch, strict=True):
            if (train := first.get(digest(text))) is not None:
                found.append(Contamination(seen, train, 1.0, exact=True))
            elif not (signature == EMPTY).all() and (match := index.query(signature, key)):
                found.append(Contamination(seen, match[0], match[1], exact=False))
            seen += 1
    return found
