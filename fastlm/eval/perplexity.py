"""Perplexity of held-out text: sliding-window perplexity for causal models (GPT) and
pseudo-perplexity for masked models (BERT).

Both score token ids through the model's hidden states and fastlm's fused linear
cross-entropy (``reduction="none"``), so only the scored positions are projected onto the
vocabulary and no (batch, seqlen, vocab) logits tensor is ever held. The models run in
eval mode (no dropout) under ``torch.no_grad``; their training flag is restored afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from fastlm import ops
from fastlm.data.tokenizer import Tokenizer
from fastlm.models.bert import BertForMaskedLM
from fastlm.models.gpt import GPT
from fastlm.models.layers import check_positive


@dataclasses.dataclass
class PerplexityResult:
    """``nll``: summed negative log-likelihood (nats) of the ``tokens`` scored;
    ``perplexity``: exp(nll / tokens) (NaN when nothing was scored)."""

    nll: float
    tokens: int
    perplexity: float

    @classmethod
    def of(cls, nlls: Sequence[Tensor]) -> PerplexityResult:
        """From per-position NLLs (NaN where a position was not scored)."""
        scored = torch.cat([t[~t.isnan()] for t in nlls]) if nlls else torch.zeros(0)
        total, count = float(scored.sum()), scored.numel()
        return cls(total, count, math.exp(total / count) if count else math.nan)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; the training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _head(model: nn.Module, cls: type, what: str) -> tuple[Tensor, Tensor | None]:
    """The output projection (weight, bias) of a ``cls`` model."""
    if not isinstance(model, cls):
        raise TypeError(
            f"model must be a fastlm {cls.__name__} for {what}, got {type(model).__name__}"
        )
    if isinstance(model, GPT):
        weight, bias = model.lm_head.weight, None
    else:
        weight, bias = model.decoder_weight, model.head_bias
    layout = getattr(model, "tp_layout", None)
    if layout is not None and layout.vocab_parallel:
        # Each rank would score against its own vocabulary shard only.
        raise ValueError(
            "model: its output layer is split over ranks; evaluate the unparallelized model"
        )
    return weight, bias


def _sequences(name: str, sequences: Sequence[Sequence[int]], vocab_size: int) -> list[Tensor]:
    """Token-id sequences (lists, 1-D tensors, or the rows of a 2-D tensor) as int64."""
    if isinstance(sequences, str):
        raise TypeError(f"{name} must be a sequence of token-id sequences, got a str")
    out = []
    for i, seq in enumerate(sequences):
        if isinstance(seq, str):
            raise TypeError(f"{name}[{i}] is a str: pass a tokenizer to score text")
        t = torch.as_tensor(seq)
        if t.numel() and (t.is_floating_point() or t.dtype == torch.bool or t.dim() != 1):
            raise TypeError(f"{name}[{i}] must be a flat sequence of int ids")
        t = t.reshape(-1).long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab_size):
            raise ValueError(f"{name}[{i}] holds ids outside the vocabulary [0, {vocab_size})")
        out.append(t)
    return out


def _windows(n: int, max_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Hugging Face's sliding windows over n tokens: (begin, end, first scored position).
    Windows of ``max_length`` tokens start every ``stride`` tokens; a window scores the
    tokens the previous one did not reach, each given every earlier token in the window
    (the first token of a window has no context there: never scored)."""
    if n < 2:
        return
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n:
            return


def _window_sizes(model: GPT, max_length: int | None, stride: int | None) -> tuple[int, int]:
    limit = model.config.max_position_embeddings
    if max_length is None:
        max_length = limit
    check_positive("max_length", max_length)
    if max_length < 2 or max_length > limit:
        raise ValueError(
            f"max_length must be in [2, {limit}] (the model's positions), got {max_length}"
        )
    if stride is None:
        stride = max_length // 2
    check_positive("stride", stride)
    if stride > max_length:
        # Tokens between windows would never be scored.
        raise ValueError(f"stride must be at most max_length ({max_length}), got {stride}")
    return max_length, stride


def causal_token_nlls(
    model: GPT,
    sequences: Sequence[Sequence[int]],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> list[Tensor]:
    """Per sequence, the NLL (nats, float64, (n,)) of each token given its left context in
    sliding windows (see :func:`perplexity`); NaN at positions not scored (the first token,
    and with ``stride == max_length`` the first token of every window)."""
    weight, _ = _head(model, GPT, "causal scoring")
    max_length, stride = _window_sizes(model, max_length, stride)
    check_positive("batch_size", batch_size)
    seqs = _sequences("sequences", sequences, model.config.vocab_size)
    device = weight.device
    out = [torch.full((len(s),), math.nan, dtype=torch.float64) for s in seqs]
    jobs = [(i, *w) for i, s in enumerate(seqs) for w in _windows(len(s), max_length, stride)]
    with _evaluating(model):
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            width = max(end - begin for _, begin, end, _ in batch)
            # Right padding needs no attention mask: causal queries never see later keys.
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            target = torch.full((len(batch), width - 1), -100, dtype=torch.long)
            for row, (i, begin, end, first) in enumerate(batch):
                ids[row, : end - begin] = seqs[i][begin:end]
                # Hidden state t predicts token t + 1.
                target[row, first - begin - 1 : end - begin - 1] = seqs[i][first:end]
            h = model(ids.to(device), return_logits=False).hidden_states[:, :-1]
            keep = target != -100
            nll = ops.linear_cross_entropy(
                h[keep.to(device)],
                weight,
                target[keep].to(device),
                reduction="none",
                out_dtype=torch.float32,
            )
            nll = nll.double().cpu()
            rows, cols = keep.nonzero(as_tuple=True)
            for row, (i, begin, *_) in enumerate(batch):
                pick = rows == row
                out[i][cols[pick] + begin + 1] = nll[pick]
    return out


def _encode(
    tokenizer: Tokenizer | None, texts: Sequence[str] | Sequence[Sequence[int]]
) -> Sequence[Sequence[int]]:
    if tokenizer is None:
        return texts
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(
            f"tokenizer must be a fastlm Tokenizer or None, got {type(tokenizer).__name__}"
        )
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str")
    return tokenizer.encode_batch(texts)


def perplexity(
    model: GPT,
    tokenizer: Tokenizer | None,
    texts: Sequence[str] | Sequence[Sequence[int]],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Perplexity of a causal model on ``texts`` (strings encoded by ``tokenizer``, or,
    with ``tokenizer`` None, sequences of token ids), each text scored on its own.

    The Hugging Face sliding-window method: windows of ``max_length`` tokens (default the
    model's ``max_position_embeddings``) advance by ``stride`` (default ``max_length // 2``);
    each window scores only the tokens the previous window did not, so every token is
    counted once and sees at least ``max_length - stride`` tokens of context. With
    ``stride == max_length`` windows are disjoint and the first token of each is not scored.
    A text's first token has no context and is never scored; to score it, start each text
    with the document separator the model was trained with (e.g. ``<|endoftext|>``).
    ``batch_size`` windows run per forward.
    """
    nlls = causal_token_nlls(model, _encode(tokenizer, texts), max_length, stride, batch_size)
    return PerplexityResult.of(nlls)


def masked_token_nlls(
    model: BertForMaskedLM,
    sequences: Sequence[Sequence[int]],
    mask_id: int,
    positions: Sequence[Sequence[int]] | None = None,
    batch_size: int = 32,
) -> list[Tensor]:
    """Per sequence, the NLL (nats, float64, (n,)) of the token at each of its
    ``positions`` (default: all) given the rest of the sequence, that token replaced by
    ``mask_id``; NaN elsewhere. Sequences are complete model inputs (``<cls>``/``<sep>``
    included). One masked copy per scored position, ``batch_size`` copies per forward."""
    weight, bias = _head(model, BertForMaskedLM, "masked scoring")
    check_positive("batch_size", batch_size)
    seqs = _sequences("sequences", sequences, model.config.vocab_size)
    if not isinstance(mask_id, int) or not 0 <= mask_id < model.config.vocab_size:
        raise ValueError(f"mask_id must be a token id of the model, got {mask_id!r}")
    limit = model.config.max_position_embeddings
    for i, s in enumerate(seqs):
        if len(s) > limit:
            raise ValueError(
                f"sequences[{i}] has {len(s)} tokens, more than the model's {limit} positions"
            )
    if positions is None:
        positions = [range(len(s)) for s in seqs]
    elif len(positions) != len(seqs):
        raise ValueError(f"positions has {len(positions)} entries for {len(seqs)} sequences")
    jobs = []
    for i, (s, pos) in enumerate(zip(seqs, positions, strict=True)):
        for p in pos:
            if not 0 <= p < len(s):
                raise ValueError(f"positions[{i}] holds {p}, outside its {len(s)} tokens")
            jobs.append((i, p))
    device = weight.device
    out = [torch.full((len(s),), math.nan, dtype=torch.float64) for s in seqs]
    with _evaluating(model):
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            width = max(len(seqs[i]) for i, _ in batch)
            ids = torch.full((len(batch), width), model.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, (i, p) in enumerate(batch):
                ids[row, : len(seqs[i])] = seqs[i]
                ids[row, p] = mask_id
                mask[row, : len(seqs[i])] = 1
            h = model(ids.to(device), mask.to(device), return_logits=False).hidden_states
            rows = torch.arange(len(batch))
            cols = torch.tensor([p for _, p in batch])
            target = torch.stack([seqs[i][p] for i, p in batch])
            nll = ops.linear_cross_entropy(
                h[rows.to(device), cols.to(device)],
                weight,
                target.to(device),
                bias,
                reduction="none",
                out_dtype=torch.float32,
            )
            for (i, p), value in zip(batch, nll.double().cpu(), strict=True):
                out[i][p] = value
    return out


def pseudo_perplexity(
    model: BertForMaskedLM,
    tokenizer: Tokenizer | None,
    texts: Sequence[str] | Sequence[Sequence[int]],
    mask_id: int | None = None,
    batch_size: int = 32,
) -> PerplexityResult:
    """Pseudo-perplexity of a masked model (Salazar et al. 2020, "Masked Language Model
    Scoring"): exp of the mean over tokens of -log p(token | every other token), each token
    masked in turn.

    With a ``tokenizer``, each text becomes ``<cls> text <sep>`` (as fastlm's masked-LM
    objective builds rows) and its text tokens are scored, masked with the tokenizer's
    ``<mask>``. With ``tokenizer`` None, ``texts`` are complete id sequences, scored at
    every position, and ``mask_id`` is required. Texts must fit the model's positions.
    """
    if tokenizer is None:
        if mask_id is None:
            raise ValueError("mask_id is required when texts are token ids (tokenizer None)")
        return PerplexityResult.of(masked_token_nlls(model, texts, mask_id, None, batch_size))
    if mask_id is not None:
        raise ValueError("mask_id: pass it only with token ids; the tokenizer's <mask> is used")
    encoded = _encode(tokenizer, texts)
    cls_id = tokenizer.require("<cls>", "pseudo-perplexity")
    sep_id = tokenizer.require("<sep>", "pseudo-perplexity")
    mask = tokenizer.require("<mask>", "pseudo-perplexity")
    rows = [[cls_id, *ids, sep_id] for ids in encoded]
    positions = [range(1, len(ids) + 1) for ids in encoded]
    return PerplexityResult.of(masked_token_nlls(model, rows, mask, positions, batch_size))
