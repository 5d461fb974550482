"""Training objectives as map-style datasets over packed rows: causal LM, masked LM, T5 spans.

Each dataset wraps an (N, L) integer tensor of packed rows (``fastlm.data.pack``) and
returns, for index ``i``, a dict of int64 tensors whose keys are model ``forward`` keyword
arguments (``input_ids``, ``labels``), labels unshifted as in Hugging Face models. Every
example of a dataset has the same shapes, so ``collate`` only stacks.

Randomness (masking, spans) comes from a ``torch.Generator`` seeded from (seed, epoch, i),
never from the global RNG: an example is a pure function of those three numbers, whatever
the worker, the process or what was drawn before, which is what makes a resumed run
reproduce the original bit for bit. ``set_epoch`` (the ``DistributedSampler`` convention)
draws fresh masks each epoch.
"""

from __future__ import annotations

import operator
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fastlm.data.packing import derive_seed
from fastlm.data.tokenizer import CLS_TOKEN, EOS_TOKEN, MASK_TOKEN, SEP_TOKEN, Tokenizer

IGNORE_INDEX = -100  # label of positions without a target (torch's cross-entropy default)


def _check_float(name: str, value: object, low: float, high: float, high_inclusive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (low < value <= high if high_inclusive else low < value < high):
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in ({low}, {high}{bracket}, got {value}")
    return float(value)


class _RowDataset(Dataset):
    """Shared plumbing: row validation, length, indexing, epoch and per-example generator."""

    def __init__(self, sequences: Tensor, seed: int = 0, min_length: int = 1):
        if not isinstance(sequences, Tensor):
            raise TypeError(f"sequences must be a torch.Tensor, got {type(sequences).__name__}")
        if sequences.dim() != 2:
            raise ValueError(f"sequences must be 2-D (N, L), got shape {tuple(sequences.shape)}")
        if sequences.device.type != "cpu":
            # Examples are built in DataLoader workers; batches move to the device after.
            raise ValueError(f"sequences must be on the CPU, got {sequences.device}")
        dtype = sequences.dtype
        if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
            raise TypeError(f"sequences must hold integers, got {dtype}")
        if sequences.shape[1] < min_length:
            raise ValueError(
                f"sequences rows must hold at least {min_length} tokens, got {sequences.shape[1]}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.sequences = sequences
        self.seed = seed
        self.epoch = 0

    def _check_vocab(self, tokenizer: Tokenizer) -> None:
        if self.sequences.numel() == 0:
            return
        lo, hi = int(self.sequences.min()), int(self.sequences.max())
        if lo < 0 or hi >= tokenizer.vocab_size:
            raise ValueError(
                f"sequences holds token ids from {lo} to {hi}, outside the tokenizer's "
                f"vocabulary [0, {tokenizer.vocab_size})"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` returns."""
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            raise TypeError(f"epoch must be an int, got {type(epoch).__name__}")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _row(self, index: int) -> tuple[int, Tensor]:
        """(index in [0, N), a copy of the row as int64); negative indices count from the end."""
        i = operator.index(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for {n} rows")
        i %= n
        return i, self.sequences[i].to(torch.int64, copy=True)

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, index))


def _require_tokenizer(tokenizer: object) -> Tokenizer:
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"tokenizer must be a fastlm.data.Tokenizer, got {type(tokenizer).__name__}"
        )
    return tokenizer


class CausalLMDataset(_RowDataset):
    """Next-token prediction: ``{"input_ids": row, "labels": row}``, both (L,) int64.

    The model shifts the labels (Hugging Face convention). No randomness; ``set_epoch``
    is accepted for a uniform interface.
    """

    def __init__(self, sequences: Tensor):
        super().__init__(sequences)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        _, row = self._row(index)
        return {"input_ids": row, "labels": row.clone()}


class MaskedLMDataset(_RowDataset):
    """BERT's masked-LM: rows of L - 2 tokens become ``<cls> row <sep>`` of L tokens.

    Pack rows with ``seq_len = L - MaskedLMDataset.extra_tokens`` to get examples of length
    L. Each non-special position (not ``<cls>``, ``<sep>``, document separators, or any
    other special token) is selected independently with probability ``mask_prob``; a
    selected token is replaced by ``<mask>`` with probability 0.8, by a token drawn
    uniformly from the non-special vocabulary with probability 0.1, and kept with
    probability 0.1 (BERT; Hugging Face's ``DataCollatorForLanguageModeling``). A row where
    nothing was selected gets one non-special position selected uniformly at random, so
    every example has a target (a row made only of special tokens has none).

    Returns ``{"input_ids": (L,), "labels": (L,)}`` int64; labels hold the original token
    at selected positions and -100 elsewhere.
    """

    extra_tokens: ClassVar[int] = 2  # <cls> and <sep>, added around each packed row

    def __init__(
        self, sequences: Tensor, tokenizer: Tokenizer, mask_prob: float = 0.15, seed: int = 0
    ):
        super().__init__(sequences, seed)
        tokenizer = _require_tokenizer(tokenizer)
        self.mask_prob = _check_float("mask_prob", mask_prob, 0.0, 1.0, high_inclusive=True)
        self.mask_id = tokenizer.require(MASK_TOKEN, "masked-LM")
        self.cls_id = tokenizer.require(CLS_TOKEN, "masked-LM")
        self.sep_id = tokenizer.require(SEP_TOKEN, "masked-LM")
        self._check_vocab(tokenizer)
        self._special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.int64)
        self._replacements = torch.tensor(
            sorted(set(range(tokenizer.vocab_size)) - tokenizer.special_ids), dtype=torch.int64
        )
        if self._replacements.numel() == 0:
            raise ValueError("tokenizer has no non-special tokens to draw replacements from")

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i, row = self._row(index)
        g = self._generator(i)
        tokens = torch.cat([row.new_tensor([self.cls_id]), row, row.new_tensor([self.sep_id])])
        length = tokens.numel()
        maskable = ~torch.isin(tokens, self._special)
        selected = (torch.rand(length, generator=g) < self.mask_prob) & maskable
        if not selected.any():
            candidates = maskable.nonzero().squeeze(1)
            if candidates.numel():
                pick = torch.randint(candidates.numel(), (1,), generator=g)
                selected[candidates[pick]] = True
        action = torch.rand(length, generator=g)
        random_tokens = self._replacements[
            torch.randint(self._replacements.numel(), (length,), generator=g)
        ]
        labels = torch.where(selected, tokens, IGNORE_INDEX)
        input_ids = torch.where(selected & (action < 0.8), self.mask_id, tokens)
        input_ids = torch.where(
            selected & (action >= 0.8) & (action < 0.9), random_tokens, input_ids
        )
        return {"input_ids": input_ids, "labels": labels}


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of ``length`` tokens, as T5 computes them."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 2:
        raise ValueError(f"length must be >= 2 (a row needs noise and non-noise), got {length}")
    noise_density = _check_float("noise_density", noise_density, 0.0, 1.0, high_inclusive=False)
    mean_span_length = _check_float(
        "mean_span_length", mean_span_length, 0.0, float("inf"), high_inclusive=False
    )
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    # Every noise span and every non-noise span holds at least one token.
    num_spans = min(max(round(num_noise / mean_span_length), 1), num_noise, length - num_noise)
    return num_noise, num_spans


def span_corruption_lengths(
    length: int, noise_density: float = 0.15, mean_span_length: float = 3.0
) -> tuple[int, int]:
    """(inputs length, targets length) of span corruption on rows of ``length`` tokens.

    With ``n`` noise tokens in ``s`` spans: inputs hold the ``length - n`` kept tokens, one
    sentinel per span and eos; targets hold the ``n`` noise tokens, one sentinel per span and
    eos. Both depend only on the arguments, never on the draw.
    """
    num_noise, num_spans = _span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def _random_segmentation(num_items: int, num_segments: int, g: torch.Generator) -> list[int]:
    """Lengths of a uniformly random split of ``num_items`` into ``num_segments`` positive
    parts: ``num_segments - 1`` distinct cut points among the ``num_items - 1`` gaps."""
    cuts = torch.randperm(num_items - 1, generator=g)[: num_segments - 1].sort().values + 1
    bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([num_items])])
    return bounds.diff().tolist()


class SpanCorruptionDataset(_RowDataset):
    """T5's span corruption (Raffel et al. 2020, ``random_spans_noise_mask``).

    For a row of L tokens: ``n = round(L * noise_density)`` noise tokens (clamped to
    [1, L - 1]) form ``s = round(n / mean_span_length)`` spans (at least 1, at most n and
    at most L - n). The noise tokens and the L - n kept tokens are each split into s
    positive lengths uniformly at random, and the row alternates kept, noise, kept, noise,
    ... (starting with kept tokens, ending with noise).

    - ``input_ids``: the kept tokens, each noise span replaced by one sentinel
      (``<extra_id_0>`` for the first span, ``<extra_id_1>`` for the next, ...), then eos;
      shape ``(L - n + s + 1,)``.
    - ``labels``: for each span, its sentinel then its tokens; then eos; shape
      ``(n + s + 1,)``. The model builds decoder inputs by shifting labels right.

    Both shapes are ``span_corruption_lengths(L, noise_density, mean_span_length)``.
    """

    def __init__(
        self,
        sequences: Tensor,
        tokenizer: Tokenizer,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        seed: int = 0,
    ):
        super().__init__(sequences, seed, min_length=2)
        tokenizer = _require_tokenizer(tokenizer)
        length = sequences.shape[1]
        self.num_noise, self.num_spans = _span_counts(length, noise_density, mean_span_length)
        self.noise_density = float(noise_density)
        self.mean_span_length = float(mean_span_length)
        self.eos_id = tokenizer.require(EOS_TOKEN, "span corruption")
        sentinels = tokenizer.sentinel_ids
        if len(sentinels) < self.num_spans:
            raise ValueError(
                f"this tokenizer has {len(sentinels)} sentinel tokens (<extra_id_k>) but rows of "
                f"{length} tokens need {self.num_spans} (one per noise span): use shorter rows, "
                f"a lower noise_density or a larger mean_span_length"
            )
        self._check_vocab(tokenizer)
        self._sentinels = torch.tensor(sentinels[: self.num_spans], dtype=torch.int64)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        i, row = self._row(index)
        g = self._generator(i)
        noise = _random_segmentation(self.num_noise, self.num_spans, g)
        kept = _random_segmentation(row.numel() - self.num_noise, self.num_spans, g)
        eos = row.new_tensor([self.eos_id])
        inputs, targets, pos = [], [], 0
        for k in range(self.num_spans):
            sentinel = self._sentinels[k : k + 1]
            inputs += [row[pos : pos + kept[k]], sentinel]
            pos += kept[k]
            targets += [sentinel, row[pos : pos + noise[k]]]
            pos += noise[k]
        return {"input_ids": torch.cat([*inputs, eos]), "labels": torch.cat([*targets, eos])}


def collate(examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack examples into a batch: each key's (...) tensors become one (B, ...) tensor.

    All examples must have the same keys and, per key, the same shape (true of every
    example of one dataset here); otherwise ValueError naming the key.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    keys = examples[0].keys()
    batch = {}
    for j, ex in enumerate(examples):
        if ex.keys() != keys:
            raise ValueError(f"examples[{j}] has keys {sorted(ex)}, examples[0] has {sorted(keys)}")
    for key in keys:
        shape = examples[0][key].shape
        for j, ex in enumerate(examples):
            if ex[key].shape != shape:
                raise ValueError(
                    f"key {key!r}: examples[{j}] has shape {tuple(ex[key].shape)}, "
                    f"examples[0] has {tuple(shape)}"
                )
        batch[key] = torch.stack([ex[key] for ex in examples])
    return batch
