"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

Prompts may come left-padded (as Hugging Face tokenizers pad for generation) or right-padded:
each row's real tokens are moved to the front, so every sequence's cache is left-aligned and
the decode kernel masks the rest by each sequence's length; the result is returned in the
input's layout with the new tokens appended.
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_tokens(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The next token per row of ``logits`` (B, V): argmax, or a sample from the
    temperature-scaled distribution restricted to the ``top_k`` most likely tokens and to the
    smallest set whose probability reaches ``top_p``."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    attention_mask: Tensor | None,
) -> None:
    if (
        not isinstance(input_ids, Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype.is_floating_point
    ):
        raise ValueError("input_ids must be an integer (batch, seqlen) tensor")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token per row")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} differs from "
                f"input_ids {tuple(input_ids.shape)}"
            )
        if bool((attention_mask.sum(1) == 0).any()):
            raise ValueError("attention_mask has a row without tokens")


class GenerationMixin:
    """``generate`` for the models; each family implements ``_decode(prompt, lengths,
    max_new_tokens, select, stop)``, and one with a fixed number of positions
    ``position_limit``."""

    def position_limit(self) -> int | None:
        """The most tokens a sequence may hold (prompt and new ones together), or None
        when positions are unbounded (relative or rotary)."""
        return None

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: Tensor | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Generate up to ``max_new_tokens`` per row after ``input_ids`` (B, S).

        ``attention_mask`` (B, S): 1 for tokens, 0 for padding (left or right). Greedy unless
        ``do_sample``; sampling divides the logits by ``temperature`` and keeps the ``top_k``
        most likely tokens and the nucleus of mass ``top_p``, drawing from ``generator``. A
        row that emits ``eos_token_id`` is finished: it continues with ``pad_token_id``
        (default: the EOS id), and generation stops when every row is finished.

        Returns, for decoder-only models, (B, S + n) with the prompt as given; for T5, the
        decoder sequences (B, 1 + n) starting with the decoder start token. A model with
        learned positions refuses a prompt and ``max_new_tokens`` longer than them.
        """
        _check(input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        limit = self.position_limit()
        if limit is not None:
            # The prefill runs the padded prompt at positions 0..S-1; each row's new tokens
            # follow its own tokens.
            longest, width = int(mask.sum(1).max()), input_ids.shape[1]
            if width > limit:
                padded = f" ({longest} without padding)" if longest < width else ""
                raise ValueError(
                    f"the prompt holds {width} tokens{padded}, more than the model's {limit} "
                    f"positions (max_position_embeddings)"
                )
            if longest + max_new_tokens > limit:
                raise ValueError(
                    f"the prompt's {longest} tokens and max_new_tokens {max_new_tokens} "
                    f"exceed the model's {limit} positions (max_position_embeddings): at most "
                    f"{limit - longest} new tokens fit"
                )
        pad = eos_token_id if pad_token_id is None else pad_token_id
        was_training = self.training
        self.eval()
        try:
            return self._decode(
                input_ids,
                mask.bool(),
                max_new_tokens,
                lambda logits: next_tokens(logits, do_sample, temperature, top_k, top_p, generator),
                eos_token_id,
                0 if pad is None else pad,
            )
        finally:
            self.train(was_training)


def left_align(input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's real tokens moved to the front (order kept), and the per-row counts."""
    order = torch.sort((~mask).int(), dim=1, stable=True).indices
    return input_ids.gather(1, order), mask.sum(1)


def decode_loop(
    first_logits: Tensor, max_new_tokens: int, select, step, eos: int | None, pad: int
) -> Tensor:
    """Pick tokens until ``max_new_tokens`` or every row has emitted ``eos``; ``step(tokens
    (B,), i)`` feeds token i and returns the next logits. Returns (B, n) new tokens."""
    logits, out = first_logits, []
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        token = select(logits).masked_fill(finished, pad)
        out.append(token)
        if eos is not None:
            finished |= token == eos
            if bool(finished.all()):
                break
        if i + 1 < max_new_tokens:
            logits = step(token, i)
    if not out:
        return first_logits.new_zeros((first_logits.shape[0], 0), dtype=torch.long)
    return torch.stack(out, dim=1)
