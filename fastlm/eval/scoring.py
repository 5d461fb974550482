"""What evaluations ask of a language model: the log-likelihood of continuations given
contexts, the rolling log-likelihood of whole texts, and greedy (or sampled) generation until
a stop string. Shared by the task evaluation (``tasks``) and the lm-evaluation-harness
adapter (``lm_eval_adapter``).

GPT scores ``context + continuation`` in one causal pass; T5 encodes the context (with its
EOS, as it was trained) and its decoder scores the continuation. Requests run in batches,
longest first, padded on the right or the left with an attention mask (and, for GPT,
position ids counted from each row's first real token), so a request's score does not depend
on its batch: the tests check it against one unpadded forward per request.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastlm.data import Tokenizer
from fastlm.models.gpt import GPTConfig
from fastlm.models.t5 import T5Config

PADDING = ("right", "left")


@dataclasses.dataclass(frozen=True)
class Score:
    """A continuation's log-likelihood: the sum of its tokens' log-probabilities (natural
    log), whether greedy decoding would produce every one of its tokens, and how many
    tokens it has."""

    logprob: float
    greedy: bool
    tokens: int


def check_model(model: nn.Module) -> None:
    """Scoring needs a GPT or a T5: a masked LM (BERT) has no left-to-right likelihood."""
    if not isinstance(getattr(model, "config", None), (GPTConfig, T5Config)):
        raise ValueError(
            f"model must be a fastlm GPT or T5 (causal or encoder-decoder LM), got "
            f"{type(model).__name__}"
        )


def context_limit(model: nn.Module) -> int | None:
    """The most tokens a GPT sees at once (its position table or rotary cache); None for T5,
    whose relative positions have no limit."""
    c = model.config
    return c.max_position_embeddings if isinstance(c, GPTConfig) else None


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it.

    Whitespace ending the context moves to the continuation (``"Answer: " + "A"`` is scored
    as ``"Answer:" + " A"``): byte-level BPE attaches a space to the word that follows it.
    The continuation's ids are those of the whole text after the context's own ids, so the
    model sees the tokenization it would have read; when a merge straddles the boundary (the
    whole text's ids do not start with the context's), the continuation is encoded alone.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    if not continuation:
        raise ValueError("continuation is empty: there is nothing to score")
    ctx = tokenizer.encode(stripped)
    whole = tokenizer.encode(stripped + continuation)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else tokenizer.encode(continuation)
    return ctx, cont


def _pad(
    rows: list[list[int]], side: str, device: torch.device
) -> tuple[Tensor, Tensor, list[int]]:
    """(B, S) ids padded with 0, their mask, and each row's offset (where its tokens start)."""
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    offsets = []
    for i, row in enumerate(rows):
        start = width - len(row) if side == "left" else 0
        ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start : start + len(row)] = 1
        offsets.append(start)
    return ids.to(device), mask.to(device), offsets


def _check_requests(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], gpt: bool, limit: int | None
) -> None:
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"requests[{i}] has an empty continuation")
        if gpt and not ctx:
            raise ValueError(
                f"requests[{i}] has an empty context: a causal model needs at least "
                "one token to predict the first continuation token from"
            )
        if limit is not None and len(cont) > limit:
            raise ValueError(
                f"requests[{i}]: its continuation ({len(cont)} tokens) exceeds the "
                f"model's {limit}-token context"
            )


@torch.no_grad()
def score(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    padding: str = "right",
    progress: bool = False,
) -> list[Score]:
    """The log-likelihood of each ``(context_ids, continuation_ids)`` request, in order.

    GPT: the continuation's tokens are predicted from the context and the continuation's
    own earlier tokens; a text longer than the model's context loses its oldest context
    tokens (a GPT's context must hold at least one token: give an EOS when there is none).
    T5: the encoder reads ``context + [eos]``, the decoder predicts the continuation after
    its start token. ``padding`` is "right" or "left": the results agree either way.
    """
    check_model(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if padding not in PADDING:
        raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
    gpt = isinstance(model.config, GPTConfig)
    limit = context_limit(model)
    _check_requests(requests, gpt, limit)
    # Longest first: similar lengths share a batch (less padding), and a batch that runs
    # out of memory does so at the start.
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))
    out: list[Score | None] = [None] * len(requests)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress
        ):
            chunk = order[start : start + batch_size]
            batch = [requests[i] for i in chunk]
            scores = (
                _score_gpt(model, batch, padding, device, limit)
                if gpt
                else _score_t5(model, batch, padding, device)
            )
            for i, s in zip(chunk, scores, strict=True):
                out[i] = s
    finally:
        model.train(was_training)
    return out


def _gather(
    model: nn.Module,
    hidden: Tensor,
    rows: list[int],
    cols: list[int],
    targets: list[int],
    sizes: list[int],
    scale: float = 1.0,
) -> list[Score]:
    """Scores from the hidden states (B, S, hidden) at the positions that predict each
    continuation token: logits only where needed, not (B, S, vocab)."""
    device = hidden.device
    h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.lm_head(h * scale if scale != 1.0 else h).float()  # (N, vocab)
    target = torch.tensor(targets, device=device)
    logprobs = logits.log_softmax(-1).gather(1, target[:, None])[:, 0]
    hits = logits.argmax(-1) == target
    request = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    sums = torch.zeros(len(sizes), dtype=torch.float64, device=device)
    sums.index_add_(0, request, logprobs.double())
    misses = torch.zeros(len(sizes), dtype=torch.long, device=device)
    misses.index_add_(0, request, (~hits).long())
    return [
        Score(float(s), int(m) == 0, n)
        for s, m, n in zip(sums.tolist(), misses.tolist(), sizes, strict=True)
    ]


def _score_gpt(model, requests, padding, device, limit) -> list[Score]:
    rows, spans = [], []
    for ctx, cont in requests:
        seq = [*ctx, *cont][:-1]  # the last token is only predicted, never read
        cut = max(0, len(seq) - limit)
        rows.append(seq[cut:])
        spans.append((len(ctx) - 1 - cut, list(cont)))  # the position that predicts cont[0]
    ids, mask, offsets = _pad(rows, padding, device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: each row counts from 0
    hidden = model.hidden_states(ids, mask, positions)
    r, c, t, sizes = [], [], [], []
    for b, ((first, cont), offset) in enumerate(zip(spans, offsets, strict=True)):
        r += [b] * len(cont)
        c += range(offset + first, offset + first + len(cont))
        t += cont
        sizes.append(len(cont))
    return _gather(model, hidden, r, c, t, sizes)


def _score_t5(model, requests, padding, device) -> list[Score]:
    c = model.config
    enc, enc_mask, _ = _pad([[*ctx, c.eos_token_id] for ctx, _ in requests], padding, device)
    dec, dec_mask, offsets = _pad(
        [[c.decoder_start_token_id, *cont[:-1]] for _, cont in requests], padding, device
    )
    hidden = model(
        enc, enc_mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, return_logits=False
    ).hidden_states
    r, cols, t, sizes = [], [], [], []
    for b, ((_, cont), offset) in enumerate(zip(requests, offsets, strict=True)):
        r += [b] * len(cont)
        cols += range(offset, offset + len(cont))
        t += cont
        sizes.append(len(cont))
    return _gather(model, hidden, r, cols, t, sizes, scale=model.head_scale())


def rolling_windows(
    tokens: Sequence[int], prefix: int, window: int
) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` requests that together score every token of ``tokens``
    once, the first conditioned on ``prefix`` (an EOS): continuations of up to ``window``
    tokens, each with as much preceding text as fits in a ``window``-token input
    (lm-evaluation-harness's disjoint rolling windows)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    seq = [prefix, *tokens]  # seq[j + 1] is tokens[j]
    out = []
    for start in range(0, len(tokens), window):
        end = min(start + window, len(tokens))
        low = max(0, end - window)
        out.append((seq[low : start + 1], seq[start + 1 : end + 1]))
    return out


@torch.no_grad()
def generate_until(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str] = ("\n",),
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """The text each model writes after each prompt (GPT: continuing it; T5: its decoder
    answering the encoded prompt), greedy unless ``do_sample``, up to ``max_new_tokens``
    tokens, cut before EOS and before the first of the ``stop`` strings. Special tokens
    (padding, T5 sentinels, ...) are left out of the text, as Hugging Face's
    ``decode(skip_special_tokens=True)`` and lm-eval's ``hf`` models leave them out: an
    answer is compared as text, and the same tokens must give the same string.

    Every row of a batch runs ``max_new_tokens`` steps unless all emit EOS: ``generate``
    knows token ids, not stop strings. A GPT prompt longer than its context minus
    ``max_new_tokens`` loses its oldest tokens; an empty one reads a single EOS.
    """
    check_model(model)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    eos = tokenizer.require("<|endoftext|>", "generation (the end of an answer)")
    special = tokenizer.special_ids
    gpt = isinstance(model.config, GPTConfig)
    room = None
    if gpt:
        room = context_limit(model) - max_new_tokens
        if room < 1:
            raise ValueError(
                f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in "
                f"the model's {context_limit(model)}-token context"
            )
    device = next(model.parameters()).device
    encoded = []
    for ids in tokenizer.encode_batch(list(prompts)):
        encoded.append((ids or [eos])[-room:] if gpt else [*ids, eos])
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str | None] = [None] * len(encoded)
    for start in tqdm(
        range(0, len(order), batch_size), desc="generating", unit="batch", disable=not progress
    ):
        chunk = order[start : start + batch_size]
        # Left padding: every prompt ends at the last column, where generation continues.
        ids, mask, _ = _pad([encoded[i] for i in chunk], "left", device)
        out = model.generate(
            ids,
            max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            eos_token_id=eos,
            attention_mask=mask,
        )
        new = out[:, ids.shape[1] :] if gpt else out[:, 1:]  # T5: after the start token
        for i, row in zip(chunk, new.tolist(), strict=True):
            if eos in row:
                row = row[: row.index(eos)]
            text = tokenizer.decode([t for t in row if t not in special])
            for s in stop:
                if s and s in text:
                    text = text[: text.index(s)]
            texts[i] = text
    return texts
