"""Text cleaning: Unicode and whitespace normalization, and document quality filters.

``normalize`` puts a document in one canonical form, so that the filters, the deduplication
hashes and the tokenizer see the same text for documents that differ only in encoding
details. ``QualityFilter`` then drops documents by length, by the fraction of their
characters that are letters, and by how much of them repeats. Every rule is defined on
Unicode properties (``str.isalpha``, ``str.isspace``) or on whitespace-separated words, so
it applies to any language; the word-based repetition rule is inert for scripts written
without spaces (a run of Chinese text is one "word").

``CleanConfig`` holds the settings of the whole cleaning pipeline
(:func:`fastlm.data.pipeline.clean_corpus`: normalize, scrub PII, filter, deduplicate) and
``Report`` its counts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
import unicodedata
from collections.abc import Sequence

import numpy as np

from fastlm.data.hashing import LINES, WHITESPACE, TextHasher, Words, ngram_hashes, ngram_prefix

NORMAL_FORMS = ("NFC", "NFKC")
SHINGLES = ("word", "char")

# Gopher's repetition thresholds (Rae et al. 2021, "Scaling Language Models: Methods, Analysis
# & Insights from Training Gopher", Table A1), which RefinedWeb (Penedo et al. 2023) applies
# as well: a document is removed when more than 30 % of its lines are duplicates, or when more
# than 15 % of its characters lie in duplicated word 5-grams, 14 % for 6-grams, and so on
# down to 10 % for 10-grams.
GOPHER_MAX_REPEATED_LINE_FRACTION = 0.30
GOPHER_MAX_DUP_NGRAM_FRACTION = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

# The quality filters in the order they are applied; a removed document is counted under
# the first one it fails.
FILTERS = ("min_chars", "max_chars", "alpha_fraction", "repeated_lines", "dup_ngrams")


# ---------------------------------------------------------------------------------------------
# Normalization


ALPHA, SPACE = 1, 2  # bits of _char_flags()


@functools.cache
def _char_flags() -> np.ndarray:
    """(0x110000,) uint8: ``ALPHA`` where ``chr(i).isalpha()``, ``SPACE`` where
    ``chr(i).isspace()``. Built on first use, in ~0.1 s (a call per code point)."""
    flags = ((chr(i).isalpha() | chr(i).isspace() << 1) for i in range(sys.maxunicode + 1))
    return np.fromiter(flags, np.uint8, sys.maxunicode + 1)


@functools.cache
def _special_characters() -> tuple[re.Pattern[str], dict[str, str]]:
    """A regex of the non-ASCII characters that are whitespace (``str.isspace``), control
    characters (category Cc: U+0080-U+009F) or lone surrogates, and what each becomes: line
    separators (those of ``str.splitlines``) "\\n", other whitespace " ", the rest nothing."""
    table = {chr(i): "" for i in range(0x80, 0xA0)}
    for i in np.flatnonzero(_char_flags()[0x80:] & SPACE) + 0x80:
        c = chr(i)
        table[c] = "\n" if len(("a" + c + "b").splitlines()) == 2 else " "
    chars = "".join(re.escape(c) for c in table if c > "\x9f")
    return re.compile(f"[\x80-\x9f\ud800-\udfff{chars}]"), table


# ASCII: \r (after \r\n -> \n), \v, \f and the separators \x1c-\x1e break lines (as in
# str.splitlines), \x1f is whitespace; the other controls except \t and \n are removed.
_ASCII_CONTROLS = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])
_ASCII_TABLE = {i: None for i in [*range(0x00, 0x09), *range(0x0E, 0x1C), 0x7F]}
_ASCII_TABLE.update({ord(c): "\n" for c in "\r\x0b\x0c\x1c\x1d\x1e"})
_ASCII_TABLE[0x1F] = " "
_INNER_TABS_RE = re.compile(r"(?<=\S)[ \t]*\t[ \t]*")
# Two literal spaces first, so that the regex engine jumps between occurrences of "  "
# instead of trying every position; the lookbehind then keeps indentation (a run that
# follows a line break) untouched.
_INNER_SPACES_RE = re.compile(r"  (?<=\S  ) *")


def _check_form(form: object) -> None:
    if form not in NORMAL_FORMS:
        raise ValueError(f"normalization must be one of {', '.join(NORMAL_FORMS)}, got {form!r}")


def normalize(text: str, form: str = "NFC") -> str:
    """The canonical form of a document, in this order:

    1. control characters (Unicode category Cc) other than tab and line feed are removed,
       and so are lone surrogates (they cannot be written as UTF-8); every line break that
       ``str.splitlines`` knows (``\\r\\n``, ``\\r``, ``\\v``, ``\\f``, ``\\x1c-\\x1e``,
       ``\\x85``, U+2028, U+2029) becomes ``\\n``, and every other whitespace character
       except tab (no-break space, U+2000-U+200A, ideographic space, ...) a space;
    2. Unicode normalization ``form``: ``"NFC"`` (canonical composition: the same text
       always has the same code points) or ``"NFKC"`` (also folds compatibility characters:
       ligatures, full-width forms, superscripts);
    3. whitespace at the end of each line is removed, and inside a line every run of
       spaces and tabs after its first non-space character becomes one space. Indentation
       (the run at the start of a line) is kept: it carries the structure of code, lists
       and verse;
    4. two or more blank lines become one (a paragraph break), and whitespace at the start
       and end of the document is removed.

    The result contains no whitespace other than " ", "\\t" and "\\n". Normalizing twice
    gives the same text as normalizing once.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    _check_form(form)
    if not text.isascii():
        special, table = _special_characters()
        if special.search(text):
            text = special.sub(lambda m: table.get(m.group(), ""), text)
        text = unicodedata.normalize(form, text)
    # Each step runs only where a cheap test (C-speed, no regex) finds work for it.
    data = text.encode()  # lone surrogates are gone
    if len(data.translate(None, _ASCII_CONTROLS)) != len(data):
        text = text.replace("\r\n", "\n").translate(_ASCII_TABLE)
    tabs = "\t" in text  # a one-character search: memchr speed
    if " \n" in text or (tabs and "\t\n" in text):
        text = "\n".join(map(str.rstrip, text.split("\n")))
    if tabs:
        text = _INNER_TABS_RE.sub(" ", text)
    if "  " in text:
        text = _INNER_SPACES_RE.sub(" ", text)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip()


# ---------------------------------------------------------------------------------------------
# Document statistics


def _letters_and_spaces(texts: list[str], ascii: bool) -> tuple[np.ndarray, np.ndarray]:
    """Letters and whitespace characters of each text: on the bytes of ASCII texts, on the
    code points (UTF-32) of others, looked up in a table of every character's classes."""
    data = "\n".join(texts) + "\n"  # a separator after each text, counted as whitespace
    if ascii:
        codes = np.frombuffer(data.encode("ascii"), np.uint8)
        letter = codes | np.uint8(0x20)
        letter -= np.uint8(ord("a"))
        is_letter = letter < 26
        # ASCII whitespace: " ", \t \n \v \f \r (9-13) and the separators \x1c-\x1f.
        is_space = codes == 32
        is_space |= (codes - np.uint8(9)) < 5
        is_space |= (codes - np.uint8(28)) < 4
    else:
        flags = _char_flags()[np.frombuffer(data.encode("utf-32-le", "surrogatepass"), np.uint32)]
        is_letter, is_space = flags == ALPHA, flags == SPACE
    sizes = np.fromiter(map(len, texts), np.int64, len(texts))
    starts = np.cumsum(sizes + 1) - (sizes + 1)  # increasing: each span holds its separator
    letters = np.add.reduceat(is_letter, starts, dtype=np.int64)
    return letters, np.add.reduceat(is_space, starts, dtype=np.int64) - 1


def alpha_fractions(texts: Sequence[str]) -> np.ndarray:
    """(len(texts),) float64: for each text, the fraction of its non-whitespace characters
    that are letters (``str.isalpha``: any script); 0.0 for a text of whitespace only.
    Vectorized over the batch (its ASCII texts and its other texts, separately)."""
    out = np.zeros(len(texts))
    is_ascii = [t.isascii() for t in texts]
    for kind in (True, False):
        where = [i for i, a in enumerate(is_ascii) if a is kind]
        if where:
            group = [texts[i] for i in where]
            letters, spaces = _letters_and_spaces(group, kind)
            visible = np.fromiter(map(len, group), np.int64, len(group)) - spaces
            out[where] = letters / np.maximum(visible, 1)
    return out


def alpha_fraction(text: str) -> float:
    """:func:`alpha_fractions` of one text."""
    return float(alpha_fractions([text])[0])


def _salt(n: int) -> np.ndarray:
    """(n,) uint64 distinct per-document offsets: added to the hashes of a document's words
    or lines, they keep equal words of different documents apart when a batch is sorted."""
    return np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)


def repeated_line_fractions(texts: Sequence[str], hasher: TextHasher | None = None) -> np.ndarray:
    """(len(texts),) float64: for each text, the fraction of its non-empty lines (split at
    "\\n") that repeat an earlier line exactly, (lines - distinct lines) / lines; 0.0
    without non-empty lines. (In normalized text a line of whitespace only is empty.)

    Computed for the batch at once from sorted 64-bit line hashes; ``hasher`` keeps its
    buffers between calls."""
    (lines,) = (hasher or TextHasher()).words(texts, (LINES,))
    return _repeated_lines(lines)


def _repeated_lines(lines: Words) -> np.ndarray:
    doc = lines.doc
    keys = lines.hashes + _salt(len(lines.count))[doc]
    order = np.argsort(keys)
    ordered = keys[order]
    first = np.ones(len(keys), bool)  # the first occurrence of each distinct line
    first[1:] = ordered[1:] != ordered[:-1]
    distinct = np.bincount(doc[order], weights=first, minlength=len(lines.count))
    return np.where(lines.count > 0, 1.0 - distinct / np.maximum(lines.count, 1), 0.0)


def repeated_line_fraction(text: str) -> float:
    """:func:`repeated_line_fractions` of one text."""
    return float(repeated_line_fractions([text])[0])


def _duplicated(keys: np.ndarray) -> np.ndarray:
    """For each key, whether another element of ``keys`` equals it."""
    order = np.argsort(keys)
    ordered = keys[order]
    same = ordered[1:] == ordered[:-1]
    dup = np.zeros(len(keys), bool)
    dup[1:] = same
    dup[:-1] |= same
    out = np.empty_like(dup)
    out[order] = dup
    return out


def dup_ngram_fractions(
    texts: Sequence[str], ns: Sequence[int], hasher: TextHasher | None = None
) -> np.ndarray:
    """(len(texts), len(ns)) float64: for each text and each n, the fraction of the
    characters of its words that lie inside a word n-gram occurring more than once in it.

    Words are separated by whitespace (``str.split()`` on normalized text); the n-grams of
    a text are its runs of n consecutive words, overlapping; a word counts once however
    many duplicated n-grams cover it; whitespace is not counted. A text with fewer than n
    words has none (0.0). This is Gopher's "duplicate n-gram character fraction".

    Computed for the whole batch at once with sorted 64-bit n-gram hashes (see
    :mod:`fastlm.data.hashing`); an (n+1)-gram can only be duplicated where the two n-grams
    it contains are, so each larger n sorts only those candidates. ``hasher`` keeps its
    buffers between calls.
    """
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in ns):
        raise ValueError(f"ns must hold positive ints, got {list(ns)}")
    (words,) = (hasher or TextHasher()).words(texts, (WHITESPACE,))
    return _dup_ngrams(words, ns)


def _dup_ngrams(words: Words, ns: Sequence[int]) -> np.ndarray:
    ns = sorted(set(ns))
    texts = len(words.count)
    out = np.zeros((texts, len(ns)))
    if not texts or not ns:
        return out
    doc, total_words = words.doc, len(words.hashes)
    prefix = ngram_prefix(words.hashes + _salt(texts)[doc])
    chars = np.zeros(total_words + 1, np.int64)
    np.cumsum(words.lengths, out=chars[1:])
    total = np.maximum(np.bincount(doc, weights=words.lengths, minlength=texts), 1)
    n0 = ns[0]
    # Start positions of the n0-grams that lie inside one document.
    grams = max(total_words - n0 + 1, 0)
    starts = np.flatnonzero(doc[:grams] == doc[n0 - 1 : n0 - 1 + grams])
    for n in range(n0, ns[-1] + 1):
        if n > n0:
            dup_start = np.zeros(total_words + 1, bool)
            dup_start[starts] = True
            starts = starts[dup_start[starts + 1]]
        starts = starts[_duplicated(ngram_hashes(prefix, starts, n))]
        if n in ns:
            # Characters covered by the union of [start, start + n) over the duplicated
            # starts (sorted): each interval counted up to where the next one begins.
            ends = starts + n
            ends[:-1] = np.minimum(ends[:-1], starts[1:])
            covered = chars[ends] - chars[starts]
            per_doc = np.bincount(doc[starts], weights=covered, minlength=texts)
            out[:, ns.index(n)] = per_doc / total
    return out


# ---------------------------------------------------------------------------------------------
# Configuration


def _check_number(name: str, value: object, lo: float, hi: float | None, integer: bool) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = "an int" if integer else "a number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if not (lo <= value and (hi is None or value <= hi)):
        bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")


@dataclasses.dataclass
class CleanConfig:
    """Settings of the cleaning pipeline (:func:`fastlm.data.pipeline.clean_corpus`).

    The filter defaults keep ordinary prose and code documentation: English prose has
    ~0.9 of its visible characters alphabetic and code ~0.5-0.8, while tables of numbers,
    separator art and hex dumps fall below 0.4. ``max_chars``: Gopher's upper bound of
    100,000 words at ~6 characters per English word (with its space). Setting a filter to
    its loosest value (``min_chars=0``, ``min_alpha_fraction=0``, a fraction of 1,
    ``max_dup_ngram_fraction={}``) turns it off; ``filters=False`` turns them all off.
    """

    normalization: str = "NFC"  # or "NFKC"
    scrub_pii: bool = True  # replace e-mail addresses, phone numbers, IPs, card numbers
    filters: bool = True  # the quality filters below; False keeps every document
    min_chars: int = 100
    max_chars: int = 600_000
    min_alpha_fraction: float = 0.4
    max_repeated_line_fraction: float = GOPHER_MAX_REPEATED_LINE_FRACTION
    # n -> the largest fraction of characters allowed in duplicated word n-grams.
    max_dup_ngram_fraction: dict[int, float] = dataclasses.field(
        default_factory=lambda: dict(GOPHER_MAX_DUP_NGRAM_FRACTION)
    )
    exact_dedup: bool = True
    near_dedup: bool = True
    # Near-duplicates: estimated Jaccard similarity of shingle sets at least this.
    threshold: float = 0.8
    num_perm: int = 128  # MinHash permutations (signature length)
    shingle: str = "word"  # "word": word n-grams; "char": character n-grams
    shingle_size: int = 5  # n, in words or characters
    seed: int = 0  # of the MinHash permutations

    def __post_init__(self) -> None:
        _check_form(self.normalization)
        for name in ("scrub_pii", "filters", "exact_dedup", "near_dedup"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_number("min_chars", self.min_chars, 0, None, integer=True)
        _check_number("max_chars", self.max_chars, max(self.min_chars, 1), None, integer=True)
        for name in ("min_alpha_fraction", "max_repeated_line_fraction"):
            _check_number(name, getattr(self, name), 0, 1, integer=False)
        if not isinstance(self.max_dup_ngram_fraction, dict):
            raise TypeError(
                f"max_dup_ngram_fraction must be a dict of n -> fraction, got "
                f"{type(self.max_dup_ngram_fraction).__name__}"
            )
        for n, fraction in self.max_dup_ngram_fraction.items():
            _check_number("max_dup_ngram_fraction keys (n)", n, 1, None, integer=True)
            _check_number(f"max_dup_ngram_fraction[{n}]", fraction, 0, 1, integer=False)
        _check_number("threshold", self.threshold, 0, 1, integer=False)
        if self.threshold == 0:
            raise ValueError("threshold must be > 0: at 0 every document duplicates every other")
        _check_number("num_perm", self.num_perm, 1, None, integer=True)
        if self.shingle not in SHINGLES:
            raise ValueError(f"shingle must be one of {', '.join(SHINGLES)}, got {self.shingle!r}")
        _check_number("shingle_size", self.shingle_size, 1, None, integer=True)
        _check_number("seed", self.seed, 0, 2**63 - 1, integer=True)


# ---------------------------------------------------------------------------------------------
# Filtering


class QualityFilter:
    """The quality filters of a :class:`CleanConfig`, applied to batches of normalized
    documents. A document is removed when

    - ``min_chars``: it has fewer than ``min_chars`` characters;
    - ``max_chars``: it has more than ``max_chars``;
    - ``alpha_fraction``: its :func:`alpha_fraction` is below ``min_alpha_fraction``;
    - ``repeated_lines``: its :func:`repeated_line_fraction` is above
      ``max_repeated_line_fraction``;
    - ``dup_ngrams``: for some n, its :func:`dup_ngram_fractions` is above
      ``max_dup_ngram_fraction[n]``.

    Calling it returns, for each document, the name of the first filter it fails, or None
    when it is kept.
    """

    def __init__(self, config: CleanConfig) -> None:
        self.config = config
        self._ns = sorted(config.max_dup_ngram_fraction)
        self._max_dup = np.array([config.max_dup_ngram_fraction[n] for n in self._ns])
        self._hasher = TextHasher()

    def __call__(self, texts: Sequence[str]) -> list[str | None]:
        c = self.config
        reasons: list[str | None] = [
            "min_chars" if len(t) < c.min_chars else "max_chars" if len(t) > c.max_chars else None
            for t in texts
        ]
        kept = [i for i, r in enumerate(reasons) if r is None]
        if not kept:
            return reasons
        # Every statistic for every document of the right length (each is vectorized over
        # the batch); then the first rule each fails.
        docs = [texts[i] for i in kept]
        alpha = alpha_fractions(docs)
        words, lines = self._hasher.words(docs, (WHITESPACE, LINES))
        repeated = _repeated_lines(lines)
        dup = (_dup_ngrams(words, self._ns) > self._max_dup).any(axis=1)
        for k, i in enumerate(kept):
            if alpha[k] < c.min_alpha_fraction:
                reasons[i] = "alpha_fraction"
            elif repeated[k] > c.max_repeated_line_fraction:
                reasons[i] = "repeated_lines"
            elif dup[k]:
                reasons[i] = "dup_ngrams"
        return reasons


# ---------------------------------------------------------------------------------------------
# Report

PII_TYPES = ("EMAIL", "PHONE", "IP", "CREDIT_CARD")
STAGES = ("normalize", "scrub", "filter", "exact_dedup", "near_dedup")


@dataclasses.dataclass
class Report:
    """What a cleaning run did: documents and bytes (UTF-8) in and out, documents changed
    by normalization (and how many of those the Unicode form changed), PII replaced per
    type, documents removed per step (``FILTERS``, then ``"exact_duplicate"`` and
    ``"near_duplicate"``; each removed document is counted once, so ``docs_in - docs_out ==
    sum(removed.values())``) and seconds spent per stage."""

    config: CleanConfig
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    normalized: int = 0
    unicode_normalized: int = 0
    pii: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PII_TYPES, 0))
    removed: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys((*FILTERS, "exact_duplicate", "near_duplicate"), 0)
    )
    seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(STAGES, 0.0)
    )

    def _rules(self) -> dict[str, str]:
        c = self.config
        if not c.filters:
            return {**dict.fromkeys(FILTERS, "off"), **self._dedup_rules()}
        dup = ", ".join(f"{n}:{f:g}" for n, f in sorted(c.max_dup_ngram_fraction.items()))
        return {
            "min_chars": f"fewer than {c.min_chars} characters",
            "max_chars": f"more than {c.max_chars} characters",
            "alpha_fraction": f"letters below {c.min_alpha_fraction:g} of visible characters",
            "repeated_lines": f"repeated lines above {c.max_repeated_line_fraction:g}",
            "dup_ngrams": f"duplicated n-gram characters above {{{dup}}}" if dup else "off",
            **self._dedup_rules(),
        }

    def _dedup_rules(self) -> dict[str, str]:
        c = self.config
        return {
            "exact_duplicate": "same text as an earlier document" if c.exact_dedup else "off",
            "near_duplicate": (
                f"estimated Jaccard >= {c.threshold:g} with an earlier document "
                f"({c.shingle_size}-{c.shingle} shingles, {c.num_perm} "
                f"permutations)"
            )
            if c.near_dedup
            else "off",
        }

    def table(self) -> str:
        """The summary table of ``fastlm data clean``."""
        c = self.config
        pii = ", ".join(f"{self.pii[k]} <{k}>" for k in PII_TYPES)
        rows = [
            (
                "normalize",
                "",
                f"{self.seconds['normalize']:.2f}",
                f"changed {self.normalized} documents; {self.unicode_normalized} of them "
                f"by {c.normalization}",
            ),
            (
                "scrub PII",
                "",
                f"{self.seconds['scrub']:.2f}",
                f"replaced {pii}" if c.scrub_pii else "off",
            ),
        ]
        rules = self._rules()
        for i, name in enumerate(FILTERS):
            seconds = f"{self.seconds['filter']:.2f}" if i == 0 else ""
            rows.append((f"filter {name}", str(self.removed[name]), seconds, rules[name]))
        for name, stage in (("exact_duplicate", "exact_dedup"), ("near_duplicate", "near_dedup")):
            rows.append(
                (
                    name.replace("_", " "),
                    str(self.removed[name]),
                    f"{self.seconds[stage]:.2f}",
                    rules[name],
                )
            )
        total = sum(self.seconds.values())
        rate = self.bytes_in / total / 1e6 if total > 0 else float("inf")
        rows.append(
            (
                "total",
                str(self.docs_in - self.docs_out),
                f"{total:.2f}",
                f"{self.docs_in} -> {self.docs_out} documents, {_size(self.bytes_in)} -> "
                f"{_size(self.bytes_out)}, {rate:.3g} MB/s",
            )
        )
        headers = ("step", "removed", "seconds", "rule / detail")
        widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(3)]

        def line(row: Sequence[str]) -> str:
            return (
                f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
            ).rstrip()

        rule = "-" * (sum(widths) + 4 + max(len(r[3]) for r in rows) + 2)
        return "\n".join([line(headers), rule, *map(line, rows[:-1]), rule, line(rows[-1])])

    def summary(self) -> str:
        """One line: documents and MB in and out, removals by step, PII replaced."""
        removed = ", ".join(f"{k} {v}" for k, v in self.removed.items() if v)
        pii = ", ".join(f"{v} <{k}>" for k, v in self.pii.items() if v)
        return (
            f"{self.docs_in} -> {self.docs_out} documents ({_size(self.bytes_in)} -> "
            f"{_size(self.bytes_out)}) in {sum(self.seconds.values()):.1f} s; removed: "
            f"{removed or 'none'}; PII replaced: {pii or 'none'}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:.1f} kB"
