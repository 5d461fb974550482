"""Byte-level BPE tokenizer: trained here, or loaded from any Hugging Face ``tokenizer.json``.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` (the Rust library behind Hugging Face's fast
tokenizers) and adds what the objectives need: the ids of the special tokens by role
(end of text, padding, mask, cls, sep, T5 sentinels), with a clear error when a loaded
tokenizer lacks one. Trained tokenizers are byte-level, as GPT-2's: every string encodes
(no unknown token) and decodes back to itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

NUM_SENTINELS = 100

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
MASK_TOKEN = "<mask>"
CLS_TOKEN = "<cls>"
SEP_TOKEN = "<sep>"

# In this order, first in the vocabulary, so a trained tokenizer gives them ids 0..104.
# <|endoftext|> (GPT-2's) also separates documents when packing; <extra_id_k> are T5's
# span-corruption sentinels.
SPECIAL_TOKENS: tuple[str, ...] = (
    EOS_TOKEN,
    PAD_TOKEN,
    MASK_TOKEN,
    CLS_TOKEN,
    SEP_TOKEN,
    *(f"<extra_id_{k}>" for k in range(NUM_SENTINELS)),
)

_BYTE_ALPHABET_SIZE = 256


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the special-token ids the training objectives use.

    Encoding adds no special tokens (no BOS/EOS/CLS): objectives and packing place them.
    A special token's text inside the input (e.g. ``"<mask>"``) encodes to that special
    token, as in Hugging Face tokenizers.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        if not isinstance(tokenizer, tokenizers.Tokenizer):
            raise TypeError(
                f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}"
            )
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._special_ids = frozenset(
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        )
        sentinels = []
        while (i := tokenizer.token_to_id(f"<extra_id_{len(sentinels)}>")) is not None:
            sentinels.append(i)
        self._sentinel_ids = sentinels

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts``.

        The vocabulary holds ``SPECIAL_TOKENS`` (ids ``0 .. len(SPECIAL_TOKENS) - 1``), then
        the 256 byte symbols, then merges, up to ``vocab_size`` tokens in all (fewer when
        the texts run out of pairs seen ``min_frequency`` times). Pre-tokenization is
        GPT-2's (ByteLevel, no prefix space added), so decoding is lossless. The same texts
        give the same vocabulary and merges (checked by the tests on tokenizers 0.23).
        """
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, got a single str")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        floor = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
        if vocab_size <= floor:
            raise ValueError(
                f"vocab_size must exceed {floor} ({len(SPECIAL_TOKENS)} special tokens + "
                f"{_BYTE_ALPHABET_SIZE} bytes), got {vocab_size}"
            )
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int):
            raise TypeError(f"min_frequency must be an int, got {type(min_frequency).__name__}")
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` (ours or any Hugging Face one, e.g. GPT-2's).

        ``path`` is the file, or a directory holding ``tokenizer.json`` (as Hugging Face
        model directories do).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"path: no tokenizer file at {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception for any unreadable file
            raise ValueError(f"{path} is not a tokenizer.json file ({e})") from e
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to the file ``path`` (conventionally ``tokenizer.json``),
        creating its parent directories."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (encoded in parallel by the library), no special tokens."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, got a single str")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``. Special tokens are kept (``skip_special_tokens=False``), so
        sentinels, masks and document separators stay visible. For a trained tokenizer,
        ``decode(encode(s)) == s`` for every string ``s``."""
        ids = [int(i) for i in ids]
        for i in ids:
            # The library skips unknown ids silently; a wrong id must not vanish.
            if not 0 <= i < self._vocab_size or self._tok.id_to_token(i) is None:
                raise ValueError(f"ids: {i} is not a token id of this tokenizer")
        return self._tok.decode(ids, skip_special_tokens=False)

    def _identity(self) -> tuple[list[str], list[list[str]]]:
        """The tokens by id (gaps as None) and the merges, in the library-independent form
        the fingerprint hashes."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        tokens: list[str | None] = [None] * self._vocab_size
        for token, i in vocab.items():
            tokens[i] = token
        merges = json.loads(self._tok.to_str())["model"].get("merges", [])
        # tokenizers < 0.20 writes a merge as "a b", later versions as ["a", "b"].
        return tokens, [m.split(" ", 1) if isinstance(m, str) else list(m) for m in merges]

    def fingerprint(self) -> str:
        """SHA-256 of the vocabulary (every token with its id, special tokens included) and
        the merges: equal exactly when the two tokenizers map text to the same ids."""
        text = json.dumps(self._identity(), ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def difference(self, other: Tokenizer) -> str | None:
        """The first difference from ``other`` in words (``id 7 is 'ab' here, 'ba'
        there``), or None when the two map text to the same ids (equal fingerprints)."""
        pairs = zip(("id", "merge"), self._identity(), other._identity(), strict=True)
        for what, mine, theirs in pairs:
            for i in range(max(len(mine), len(theirs))):
                a = mine[i] if i < len(mine) else None
                b = theirs[i] if i < len(theirs) else None
                if a != b:
                    return f"{what} {i} is {a!r} here, {b!r} there"
        return None

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id, special tokens included (the number of
        tokens when ids are contiguous, as a trained tokenizer's are): the size a model's
        embedding table needs."""
        return self._vocab_size

    def token_id(self, token: str) -> int | None:
        """The id of ``token``, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def require(self, token: str, needed_for: str) -> int:
        """The id of ``token``; ValueError saying what needs it when the tokenizer lacks it."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"this tokenizer has no {token} token (needed for {needed_for})")
        return i

    @property
    def eos_id(self) -> int | None:
        """Id of ``<|endoftext|>`` (end of text, the document separator), or None."""
        return self.token_id(EOS_TOKEN)

    @property
    def pad_id(self) -> int | None:
        """Id of ``<pad>``, or None."""
        return self.token_id(PAD_TOKEN)

    @property
    def mask_id(self) -> int | None:
        """Id of ``<mask>``, or None."""
        return self.token_id(MASK_TOKEN)

    @property
    def cls_id(self) -> int | None:
        """Id of ``<cls>``, or None."""
        return self.token_id(CLS_TOKEN)

    @property
    def sep_id(self) -> int | None:
        """Id of ``<sep>``, or None."""
        return self.token_id(SEP_TOKEN)

    @property
    def sentinel_ids(self) -> list[int]:
        """Ids of ``<extra_id_0>``, ``<extra_id_1>``, ... as far as they go without a gap;
        empty when the tokenizer has none."""
        return list(self._sentinel_ids)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every token the tokenizer marks special (all of ``SPECIAL_TOKENS`` for a
        trained tokenizer; e.g. only ``<|endoftext|>`` for GPT-2's)."""
        return self._special_ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self._vocab_size}, special={len(self._special_ids)}, "
            f"sentinels={len(self._sentinel_ids)})"
        )
