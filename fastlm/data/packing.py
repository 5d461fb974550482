"""Packing token streams into fixed-length rows, and a resumable shuffling batch sampler.

``pack`` turns tokenized documents into an (N, seq_len) tensor with no padding: documents
are concatenated, each followed by a separator, and the stream is cut into rows (a row may
span documents, as in GPT-2 / T5 pre-training). ``ResumableSampler`` draws batches of row
indices epoch after epoch; its whole state is two integers, so a checkpoint restores the
exact batch order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

_INT32_MAX = 2**31 - 1


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def derive_seed(*keys: int) -> int:
    """A 63-bit seed for ``torch.Generator.manual_seed`` mixed from non-negative ints.

    NumPy's ``SeedSequence`` hashes the keys, so nearby tuples such as (seed, epoch, i) and
    (seed, epoch + 1, i - 1) give unrelated streams (a linear formula would collide).
    """
    lo, hi = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & (2**63 - 1)


def pack(token_lists: Iterable[Sequence[int]], seq_len: int, separator: int | None) -> torch.Tensor:
    """Concatenate tokenized documents and cut the stream into rows of ``seq_len`` tokens.

    Each document is followed by ``separator`` (typically the tokenizer's ``eos_id``) unless
    it is None. Row ``r`` holds stream tokens ``r * seq_len .. (r + 1) * seq_len - 1``; the
    tail shorter than ``seq_len`` is dropped.

    Returns an (N, seq_len) int32 tensor (half the memory of int64; the objectives convert
    rows to int64). Raises ValueError when the stream holds fewer than ``seq_len`` tokens,
    or when a token id is negative or does not fit in int32.
    """
    if isinstance(token_lists, (str, torch.Tensor, np.ndarray)):
        raise TypeError(
            f"token_lists must be an iterable of token-id sequences (one per document), "
            f"got {type(token_lists).__name__}"
        )
    _check_int("seq_len", seq_len, 1)
    if separator is not None:
        _check_int("separator", separator, 0)
    sep = np.array([] if separator is None else [separator], dtype=np.int64)
    parts = []
    for i, doc in enumerate(token_lists):
        ids = np.asarray(doc)
        if ids.ndim != 1:
            raise ValueError(f"token_lists[{i}] must be 1-D, got shape {ids.shape}")
        # Casting would silently truncate float ids; an empty list comes out as float64.
        if ids.size and ids.dtype.kind not in "iu":
            raise TypeError(f"token_lists[{i}] must hold integers, got dtype {ids.dtype}")
        parts.append(ids.astype(np.int64))
        parts.append(sep)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if stream.size < seq_len:
        raise ValueError(
            f"the token stream holds {stream.size} tokens (separators included), fewer than "
            f"seq_len={seq_len}: seq_len must be smaller or the corpus larger"
        )
    if stream.min() < 0 or stream.max() > _INT32_MAX:
        raise ValueError(
            f"token_lists: token ids must lie in [0, 2**31 - 1], got values from "
            f"{stream.min()} to {stream.max()}"
        )
    rows = stream.size // seq_len
    return torch.from_numpy(stream[: rows * seq_len].astype(np.int32).reshape(rows, seq_len))


class ResumableSampler:
    """Batches of indices into ``num_items`` items, epoch after epoch, with resumable state.

    Epoch ``e`` is ``torch.randperm(num_items)`` under a generator seeded from (seed, e)
    (``range(num_items)`` when ``shuffle`` is False), cut into consecutive batches of
    ``batch_size`` indices; the incomplete last batch is dropped, then epoch ``e + 1``
    starts. Iterating yields batches without end; ``epoch`` tells which epoch the next
    batch comes from (pass it to the datasets' ``set_epoch`` before fetching the batch).

    ``state_dict()`` is the epoch and the position (batches already taken from it) plus the
    arguments; a sampler built with the same arguments that loads it yields exactly the
    batches the original would have yielded next.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, shuffle: bool = True):
        _check_int("num_items", num_items, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle must be a bool, got {type(shuffle).__name__}")
        if num_items < batch_size:
            raise ValueError(
                f"num_items ({num_items}) must be >= batch_size ({batch_size}): an epoch "
                f"would hold no full batch"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order: torch.Tensor | None = None  # the permutation of self._epoch, lazily

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Full batches per epoch: ``num_items // batch_size``."""
        return self.num_items // self.batch_size

    def _permutation(self) -> torch.Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, self._epoch))
                self._order = torch.randperm(self.num_items, generator=g)
            else:
                self._order = torch.arange(self.num_items)
        return self._order

    def next_batch(self) -> list[int]:
        """The next ``batch_size`` indices (ints in ``[0, num_items)``)."""
        start = self._position * self.batch_size
        batch = self._permutation()[start : start + self.batch_size].tolist()
        self._position += 1
        # Roll over now, so that ``epoch`` already names the next batch's epoch.
        if self._position == self.batches_per_epoch:
            self._epoch += 1
            self._position = 0
            self._order = None
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: ``epoch``, ``position`` (batches taken from that epoch)
        and the arguments ``seed``, ``num_items``, ``batch_size``, ``shuffle``."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``. Raises ValueError when it was saved by a sampler with
        other arguments: resuming on different data must not silently go on."""
        for key in ("seed", "num_items", "batch_size", "shuffle", "epoch", "position"):
            if key not in state:
                raise ValueError(f"state has no {key!r} entry")
        for key in ("seed", "num_items", "batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state was saved with {key}={state[key]!r}, this sampler has "
                    f"{key}={getattr(self, key)!r}"
                )
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        if position >= self.batches_per_epoch:
            raise ValueError(
                f"state['position'] must be < batches_per_epoch ({self.batches_per_epoch}), "
                f"got {position}"
            )
        self._epoch, self._position, self._order = epoch, position, None
