"""Deterministic 64-bit hashes of the words and n-grams of many documents at once (numpy).

The quality filters (:mod:`fastlm.data.clean`: repeated lines, duplicated n-grams) and
MinHash (:mod:`fastlm.data.dedup`) hash every word, line or character n-gram of every
document. A Python loop over words (``map(hash, text.split())``) runs at ~70 MB/s, and
Python's ``hash`` of a str changes from process to process; here a batch of documents is
encoded once and hashed with array arithmetic on its UTF-8 bytes:

- a word is a maximal run of non-separator bytes (separators: ASCII whitespace and control
  bytes; for :data:`ALNUM` splitting, every ASCII byte that is not a letter or a digit;
  for :data:`LINES`, "\\n" only; bytes of non-ASCII characters always belong to words);
- its hash is the polynomial ``sum(byte[j] * P**(end - 1 - j))`` mod 2**64, read off prefix
  sums of ``byte[j] * P**-j`` (P is odd, so it has an inverse mod 2**64): two array passes
  over the bytes, whatever the word lengths and however the bytes are split; then mixed
  with its length by the splitmix64 finalizer, so that the hashes look uniformly random
  (MinHash relies on that);
- an n-gram hash is the same polynomial over word hashes (base :data:`Q`), read off prefix
  sums over the words, for any n and any start positions.

Uniform, independent 64-bit values collide with probability 2**-64 per pair; polynomial
hashes mod 2**64 have known collisions only between strings of thousands of bytes built for
the purpose (Thue-Morse sequences), never between natural words.

Fresh large numpy arrays cost page faults on every batch (measured: 3 of the 5 ms a 1.2 MB
corpus took), so a :class:`TextHasher` keeps its per-byte scratch array between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

U64 = np.uint64
P = U64(0x9E3779B97F4A7C15)  # odd: invertible mod 2**64
Q = U64(0xD6E8FEB86659FD93)  # odd; the base of n-gram hashes over word hashes
WHITESPACE = "whitespace"
ALNUM = "alnum"
LINES = "lines"


def _inverse(x: int) -> int:
    """The inverse of odd ``x`` mod 2**64 (Newton's iteration doubles the correct bits)."""
    y = x
    for _ in range(6):
        y = y * (2 - x * y) % 2**64
    return y


class _Powers:
    """``base**i`` and ``base**-i`` mod 2**64 for i < n, grown (doubling) on demand."""

    def __init__(self, base: np.uint64) -> None:
        self.base, self.inverse = base, U64(_inverse(int(base)))
        self.up = self.down = np.ones(1, U64)

    def __call__(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            up, down = np.full(size, self.base, U64), np.full(size, self.inverse, U64)
            up[0] = down[0] = 1
            # Integer cumprod wraps mod 2**64, the arithmetic wanted here.
            self.up, self.down = np.cumprod(up), np.cumprod(down)
        return self.up[:n], self.down[:n]


_BYTE_POWERS = _Powers(P)
_WORD_POWERS = _Powers(Q)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele, Lea and Flood, 2014) applied to a uint64 array, in
    place: a bijection whose output bits each depend on all input bits."""
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


@dataclasses.dataclass
class Words:
    """The words of a batch of D documents, in order, W in all."""

    hashes: np.ndarray  # (W,) uint64
    lengths: np.ndarray  # (W,) int64, characters (not bytes) of each word
    first: np.ndarray  # (D,) int64, index of each document's first word
    count: np.ndarray  # (D,) int64, words of each document

    @property
    def doc(self) -> np.ndarray:
        """(W,) int64: the document of each word."""
        return np.repeat(np.arange(len(self.count)), self.count)


_SPLITS = (WHITESPACE, ALNUM, LINES)


def _is_word(buf: np.ndarray, split: str) -> np.ndarray:
    """Whether each byte belongs to a word of ``split``; "\\n" never does."""
    if split == WHITESPACE:
        return buf > 32
    if split == LINES:
        return buf != ord("\n")
    # Comparisons, not a 256-entry table lookup: numpy's fancy indexing is 20x slower.
    letter = buf | np.uint8(0x20)
    letter -= np.uint8(ord("a"))
    word = letter < 26
    digit = buf - np.uint8(ord("0"))
    word |= digit < 10
    word |= buf >= 128
    return word


class TextHasher:
    """Hashes of the words, lines or character n-grams of batches of documents.

    Splits: :data:`WHITESPACE` (words as ``str.split()`` finds them in text whose only
    whitespace is ASCII, as :func:`fastlm.data.clean.normalize` leaves it), :data:`ALNUM`
    (runs of ASCII letters and digits and non-ASCII characters: punctuation separates and
    is dropped) and :data:`LINES` (the non-empty lines: runs of characters other than
    "\\n"). ``lowercase`` lowercases each document first (``str.lower``).
    """

    def __init__(self, lowercase: bool = False) -> None:
        self.lowercase = lowercase
        self._scratch = np.empty(0, U64)

    def _encode(self, texts: Sequence[str]) -> tuple[bool, np.ndarray, np.ndarray]:
        """Whether the texts are ASCII, their UTF-8 bytes joined by "\\n", and where each
        text ends in them (its "\\n", or the end)."""
        if self.lowercase:
            texts = [t.lower() for t in texts]
        data = "\n".join(texts)
        ascii = data.isascii()
        buf = np.frombuffer(data.encode("utf-8", "surrogatepass"), np.uint8)
        sizes = np.fromiter(
            map(len, texts) if ascii else (len(t.encode("utf-8", "surrogatepass")) for t in texts),
            np.int64,
            len(texts),
        )
        return ascii, buf, np.cumsum(sizes + 1) - 1

    def _scratch_prefix(self, n: int) -> np.ndarray:
        """(n + 1,) uint64 scratch, reused between calls, its first entry 0."""
        if len(self._scratch) < n + 1:
            self._scratch = np.empty(max(n + 1, 2 * len(self._scratch)), U64)
        prefix = self._scratch[: n + 1]
        prefix[0] = 0
        return prefix

    def _hash_prefix(self, buf: np.ndarray) -> np.ndarray:
        """Prefix sums of ``byte[j] * P**-j``: the span [a, b) hashes to
        ``(prefix[b] - prefix[a]) * P**(b - 1)``, whatever splits the spans."""
        n = len(buf)
        _, down = _BYTE_POWERS(max(n, 1))
        prefix = self._scratch_prefix(n)
        np.multiply(buf, down[:n], out=prefix[1:])
        np.cumsum(prefix[1:], out=prefix[1:])
        return prefix

    @staticmethod
    def _hash_spans(prefix: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Polynomial hashes of the byte spans [starts, ends), mixed with their lengths."""
        up, _ = _BYTE_POWERS(len(prefix))
        hashes = prefix[ends]
        hashes -= prefix[starts]
        hashes *= up[ends - 1]
        hashes ^= (ends - starts).astype(U64) * Q
        return mix64(hashes)

    def words(self, texts: Sequence[str], splits: Sequence[str] = (WHITESPACE,)) -> list[Words]:
        """The words of ``texts`` and their hashes, one :class:`Words` per split, from one
        encoding and one pass of prefix sums over the bytes."""
        for split in splits:
            if split not in _SPLITS:
                raise ValueError(f"splits must be among {', '.join(_SPLITS)}, got {split!r}")
        ascii, buf, doc_end = self._encode(texts)
        prefix = self._hash_prefix(buf)
        spans = []
        for split in splits:
            # "\n" separates in every split, so words never span documents.
            edge = np.zeros(len(buf) + 2, bool)
            edge[1:-1] = _is_word(buf, split)
            bounds = np.flatnonzero(edge[1:] != edge[:-1])
            starts, ends = bounds[0::2], bounds[1::2]
            spans.append((starts, ends, self._hash_spans(prefix, starts, ends)))
        if not ascii:  # characters: bytes that do not continue a multi-byte sequence
            chars = self._scratch_prefix(len(buf))  # the hash prefix is done with
            np.cumsum((buf & np.uint8(0xC0)) != np.uint8(0x80), dtype=U64, out=chars[1:])
        found = []
        for starts, ends, hashes in spans:
            lengths = ends - starts if ascii else (chars[ends] - chars[starts]).astype(np.int64)
            last = np.searchsorted(starts, doc_end)
            first = np.empty_like(last)
            first[:1] = 0
            first[1:] = last[:-1]
            found.append(Words(hashes, lengths, first, last - first))
        return found

    def char_ngrams(self, texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Hashes of the runs of ``n`` consecutive characters of each text (a text shorter
        than ``n`` has one, the whole text; an empty text none), and how many each text has:
        ((S,) uint64 in text order, (D,) int64). Texts must not contain "\\n" (the
        separator)."""
        _, buf, doc_end = self._encode(texts)
        # Byte offsets of the characters, then of the end: char j spans [pos[j], pos[j+1]).
        pos = np.flatnonzero((buf & np.uint8(0xC0)) != np.uint8(0x80))
        pos = np.append(pos, len(buf))
        last = np.searchsorted(pos, doc_end)  # each text's separator, as a character index
        first = np.empty_like(last)
        first[:1] = 0
        first[1:] = last[:-1] + 1
        length = last - first
        count = np.where(length >= n, length - n + 1, np.minimum(length, 1))
        text = np.repeat(np.arange(len(texts)), count)
        offset = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        start = first[text] + offset
        stop = np.minimum(start + n, last[text])
        return self._hash_spans(self._hash_prefix(buf), pos[start], pos[stop]), count


def ngram_prefix(hashes: np.ndarray) -> np.ndarray:
    """(W + 1,) prefix sums that :func:`ngram_hashes` reads n-gram hashes from."""
    w = len(hashes)
    _, down = _WORD_POWERS(max(w, 1))
    prefix = np.zeros(w + 1, U64)
    np.multiply(hashes, down[:w], out=prefix[1:])
    np.cumsum(prefix[1:], out=prefix[1:])
    return prefix


def ngram_hashes(prefix: np.ndarray, starts: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Hashes of the n-grams of words ``starts[i] .. starts[i] + n - 1`` (``n`` an int or
    one per start): ``sum(word_hash[j] * Q**(end - 1 - j))`` mod 2**64, not mixed."""
    ends = starts + n
    up, _ = _WORD_POWERS(len(prefix))
    out = prefix[ends] - prefix[starts]
    out *= up[ends - 1]
    return out
