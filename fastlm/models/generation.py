"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling, on a
contiguous (padded) cache or a paged one with continuous batching.

Prompts may come left-padded (as Hugging Face tokenizers pad for generation) or right-padded:
each row's real tokens are moved to the front, so every sequence's cache is left-aligned and
the decode kernel masks the rest by each sequence's length; the result is returned in the
input's layout with the new tokens appended.

The paged cache (:class:`PagedKVCache`) holds every layer's keys and values in pages of
``page_size`` tokens drawn from one pool: a sequence takes a page when its tokens fill the
last one and gives all of them back when it finishes, so the memory follows the tokens
actually held instead of batch x longest length. :class:`BatchScheduler` runs the decode
loop over it with continuous batching: each prompt is prefilled alone into its own pages,
joins the running batch, and leaves it when it finishes, its slot going to the next waiting
prompt. ``generate(paged=True)`` and ``generate_many`` use it.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from fastlm.models.layers import KVCache


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
    ``position_limit``. A decoder-only family that implements ``kv_layout()`` (each layer's
    (kv_heads, head_dim)) and ``_cached_logits(input_ids, position_ids, caches)`` (the last
    position's logits, extending the caches) also runs on the paged cache:
    ``generate(paged=True)`` and ``generate_many``."""

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
        paged: bool = False,
        page_size: int = 16,
        compile: bool | dict = False,
    ) -> Tensor:
        """Generate up to ``max_new_tokens`` per row after ``input_ids`` (B, S).

        ``attention_mask`` (B, S): 1 for tokens, 0 for padding (left or right). Greedy unless
        ``do_sample``; sampling divides the logits by ``temperature`` and keeps the ``top_k``
        most likely tokens and the nucleus of mass ``top_p``, drawing from ``generator``. A
        row that emits ``eos_token_id`` is finished: it continues with ``pad_token_id``
        (default: the EOS id), and generation stops when every row is finished.

        ``paged``: decode on a :class:`PagedKVCache` of ``page_size``-token pages (decoder-only
        models): each row holds the pages its own tokens need and a finished row gives its
        pages back, where the contiguous cache holds B x (S + max_new_tokens) positions.
        Greedy tokens are the same either way.

        ``compile``: decode on a :class:`StaticDecoder` (decoder-only models): static KV
        buffers and one decode step ``(token, input_pos) -> logits`` compiled once by
        ``torch.compile(fullgraph=True, dynamic=False)`` and reused for every position and
        every later call of the same batch size and cache bucket. True compiles with
        ``mode="reduce-overhead"`` (CUDA graphs) on CUDA and the default mode elsewhere; a
        dict is passed to ``torch.compile`` as its keyword arguments (``backend``, ``mode``,
        ``options``). The prefill runs eagerly. Greedy tokens are those of the eager path
        (the compiled step attends over the whole static buffer, masked: the same scores,
        summed in another order).

        Returns, for decoder-only models, (B, S + n) with the prompt as given; for T5, the
        decoder sequences (B, 1 + n) starting with the decoder start token. A model with
        learned positions refuses a prompt and ``max_new_tokens`` longer than them.
        """
        _check(input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
        if not isinstance(paged, bool):
            raise TypeError(f"paged must be a bool, got {type(paged).__name__}")
        if paged:
            self._check_paged(page_size)
        options = _compile_options(compile)
        if options is not None:
            if paged:
                raise ValueError("compile: the compiled decode step runs on the contiguous cache")
            self._check_decoder_only("compile")
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
            _check_room(longest, max_new_tokens, limit)
        pad = eos_token_id if pad_token_id is None else pad_token_id
        pad = 0 if pad is None else pad

        def select(logits: Tensor) -> Tensor:
            return next_tokens(logits, do_sample, temperature, top_k, top_p, generator)

        with _eval_mode(self):
            if options is not None:
                prompt, lengths = left_align(input_ids, mask.bool())
                longest = input_ids.shape[1] + max_new_tokens
                decoder = self.static_decoder(input_ids.shape[0], longest, options)
                new = decoder.generate(prompt, lengths, max_new_tokens, select, eos_token_id, pad)
                return torch.cat([input_ids, new.to(input_ids.dtype)], dim=1)
            if not paged:
                return self._decode(
                    input_ids, mask.bool(), max_new_tokens, select, eos_token_id, pad
                )
            prompt, lengths = left_align(input_ids, mask.bool())
            rows = [prompt[b, :n] for b, n in enumerate(lengths.tolist())]
            scheduler = BatchScheduler(self, max_batch=len(rows), page_size=page_size)
            news = scheduler.run(rows, [max_new_tokens] * len(rows), select, eos_token_id)
            width = max(len(n) for n in news)
            out = input_ids.new_full((len(rows), width), pad)
            for b, n in enumerate(news):
                out[b, : len(n)] = n
            return torch.cat([input_ids, out], dim=1)

    @torch.no_grad()
    def generate_many(
        self,
        prompts: Sequence[Tensor],
        max_new_tokens: int | Sequence[int],
        max_batch: int = 8,
        page_size: int = 16,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Continuous batching: generate after each of ``prompts`` (1-D token tensors of any
        lengths, any number of them) with at most ``max_batch`` sequences decoding at once on
        a paged cache. A prompt joins the running batch as soon as a slot is free (another
        sequence emitted ``eos_token_id`` or its ``max_new_tokens``), so slots never wait for
        the longest sequence of a batch. ``max_new_tokens``: one int for every prompt, or one
        per prompt. Sampling arguments as :meth:`generate`.

        Returns one 1-D tensor per prompt, in order: the prompt, then its new tokens up to
        and including its EOS (no padding). Greedy tokens are those ``generate`` gives each
        prompt alone."""
        self._check_paged(page_size)
        if not isinstance(prompts, Sequence) or isinstance(prompts, Tensor) or not prompts:
            raise ValueError("prompts must be a non-empty list of 1-D token tensors")
        budgets = (
            [max_new_tokens] * len(prompts)
            if isinstance(max_new_tokens, int)
            else list(max_new_tokens)
        )
        if len(budgets) != len(prompts):
            raise ValueError(
                f"max_new_tokens holds {len(budgets)} entries for {len(prompts)} prompts"
            )
        for i, (p, new) in enumerate(zip(prompts, budgets, strict=True)):
            if not isinstance(p, Tensor) or p.dim() != 1 or p.dtype.is_floating_point:
                raise ValueError(f"prompts[{i}] must be a 1-D integer tensor")
            if p.numel() == 0:
                raise ValueError(f"prompts[{i}] holds no token")
            _check(p[None], new, temperature, top_k, top_p, None)
        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        limit = self.position_limit()
        if limit is not None:
            for p, new in zip(prompts, budgets, strict=True):
                _check_room(p.numel(), new, limit)

        def select(logits: Tensor) -> Tensor:
            return next_tokens(logits, do_sample, temperature, top_k, top_p, generator)

        with _eval_mode(self):
            scheduler = BatchScheduler(self, max_batch=max_batch, page_size=page_size)
            news = scheduler.run(list(prompts), budgets, select, eos_token_id)
        return [torch.cat([p, n.to(p.dtype)]) for p, n in zip(prompts, news, strict=True)]

    def static_decoder(
        self, batch: int, max_len: int, options: dict | None = None
    ) -> StaticDecoder:
        """The model's :class:`StaticDecoder` for ``batch`` rows of up to ``max_len``
        positions, compiled with the ``torch.compile`` keyword arguments ``options`` (None:
        eager): kept and reused while batch, cache bucket, dtype, device and options stay
        the same; another one replaces it (and frees its buffers)."""
        self._check_decoder_only("static_decoder")
        weight = next(self.parameters())
        capacity = -(-max_len // CACHE_BUCKET) * CACHE_BUCKET
        key = (batch, capacity, weight.dtype, weight.device, repr(options))
        held = vars(self).get("_static_decoder")
        if held is None or held.key != key:
            vars(self)["_static_decoder"] = held = None  # the old buffers go first
            held = vars(self)["_static_decoder"] = StaticDecoder(self, batch, capacity, options)
            held.key = key
        return held

    def _check_decoder_only(self, what: str) -> None:
        if not hasattr(self, "_cached_logits"):
            raise ValueError(
                f"{what}: {type(self).__name__} has no decoder-only KV cache (GPT models have one)"
            )

    def _check_paged(self, page_size: int) -> None:
        self._check_decoder_only("paged")
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")


# Static buffers hold a multiple of this many positions, so that calls of nearby lengths
# share one buffer and one compiled step (gpt-fast preallocates to the model's maximum).
CACHE_BUCKET = 256


def _compile_options(compile: bool | dict) -> dict | None:
    """``generate``'s ``compile`` as torch.compile's keyword arguments (None: eager)."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if isinstance(compile, dict):
        bad = set(compile) - {"backend", "mode", "options"}
        if bad:
            raise ValueError(
                f"compile may set backend, mode and options (fullgraph=True and dynamic=False "
                f"are fixed), got {sorted(bad)}"
            )
        return dict(compile)
    raise TypeError(f"compile must be a bool or a dict, got {type(compile).__name__}")


class StaticDecoder:
    """Decoding on static buffers, as gpt-fast does it: every layer's keys and values
    preallocated to ``max_len`` positions for ``batch`` rows, and one decode step

        ``step(token (B, 1) int64, input_pos (B,) int64) -> logits (B, V)``

    that feeds ``token[b]`` at position ``input_pos[b]`` (row b's cache holds exactly its
    ``input_pos[b]`` earlier tokens), writes its keys and values into the buffers at that
    index and returns the next logits. The step is a function of its two tensors: the
    buffers are the same tensors at every call and every shape is fixed, so
    ``torch.compile(fullgraph=True, dynamic=False)`` traces it once and reuses the graph for
    every position; under ``mode="reduce-overhead"`` on CUDA it is one CUDA graph replay (the
    buffers are marked static addresses, so they are written in place, not copied in).

    ``options``: torch.compile's keyword arguments (backend, mode, options), {} for its
    defaults (``mode="reduce-overhead"`` on CUDA), None to run the step eagerly. The
    model's ``new_caches`` gives the buffers and ``_cached_logits`` the logits; rows start
    left-aligned (``prefill``), as in :meth:`GenerationMixin.generate`.
    """

    def __init__(self, model, batch: int, max_len: int, options: dict | None = None) -> None:
        weight = next(model.parameters())
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.key: tuple | None = None
        self.caches = model.new_caches(batch, max_len, weight)
        if options is not None:
            options = dict(options)
            if weight.is_cuda:
                options.setdefault("mode", "reduce-overhead")
            for cache in self.caches:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        self.graphed = options is not None and options.get("mode") in (
            "reduce-overhead",
            "max-autotune",
        )
        self._step = (
            self._eager_step
            if options is None
            else torch.compile(self._eager_step, fullgraph=True, dynamic=False, **options)
        )

    def _eager_step(self, token: Tensor, input_pos: Tensor) -> Tensor:
        # Every layer reads one int32 copy of input_pos (shared: the model advances it once,
        # after the last layer), made inside the step so that the graph mutates no input but
        # the buffers.
        lengths = input_pos.to(torch.int32, copy=True)
        caches = [KVCache(c.k, c.v, lengths, shared=True) for c in self.caches]
        return self.model._cached_logits(token, input_pos[:, None], caches)

    def step(self, token: Tensor, input_pos: Tensor) -> Tensor:
        """The logits (B, V) after feeding ``token`` (B, 1) at ``input_pos`` (B,)."""
        if self.graphed:
            # A new replay: the previous step's outputs (read already) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        return self._step(token, input_pos)

    def prefill(self, prompt: Tensor, lengths: Tensor) -> Tensor:
        """Run the left-aligned ``prompt`` (B, S) into the buffers eagerly; the logits (B, V)
        after each row's last real token (``lengths`` (B,) of them). Slots past a row's
        length keep what they hold (finite numbers, masked out, overwritten as it grows)."""
        if prompt.shape[0] != self.batch or prompt.shape[1] > self.max_len:
            raise ValueError(
                f"prompt {tuple(prompt.shape)} does not fit the decoder's buffers of "
                f"{self.batch} rows x {self.max_len} positions"
            )
        start = torch.zeros(self.batch, dtype=torch.int32, device=prompt.device)
        caches = [KVCache(c.k, c.v, start, shared=True) for c in self.caches]
        return self.model._prefill_logits(prompt, lengths, caches)

    def generate(
        self,
        prompt: Tensor,
        lengths: Tensor,
        max_new_tokens: int,
        select: Callable[[Tensor], Tensor],
        eos: int | None,
        pad: int,
    ) -> Tensor:
        """(B, n) new tokens after the left-aligned ``prompt`` (B, S) holding ``lengths``
        tokens per row, as :func:`decode_loop` picks them."""
        if prompt.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(
                f"{prompt.shape[1]} prompt positions and max_new_tokens {max_new_tokens} exceed "
                f"the decoder's {self.max_len} positions"
            )
        first = self.prefill(prompt, lengths)
        lengths = lengths.long()

        def step(token: Tensor, i: int) -> Tensor:
            return self.step(token[:, None], lengths + i)

        return decode_loop(first, max_new_tokens, select, step, eos, pad)


class _eval_mode:
    """The model in eval mode for the duration, then back to its mode."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


def _check_room(longest: int, max_new_tokens: int, limit: int) -> None:
    if longest + max_new_tokens > limit:
        raise ValueError(
            f"the prompt's {longest} tokens and max_new_tokens {max_new_tokens} "
            f"exceed the model's {limit} positions (max_position_embeddings): at most "
            f"{limit - longest} new tokens fit"
        )


class PagedKVCache:
    """Every layer's keys and values in pages of ``page_size`` tokens: per layer a pool
    k, v (num_pages, page_size, Hkv, D), all layers indexed by the same page ids; a free
    list; and the pages each sequence holds, in order (its block table).

    ``reserve(seq, tokens)`` gives ``seq`` pages for ``tokens`` tokens in all, taking them
    from the free list; ``release(seq)`` returns them. When the free list runs out the pools
    grow (doubling, so the copies cost O(1) per page over a run; page ids stay valid), so the
    memory follows the most tokens held at once rather than batch x longest sequence.
    ``layout``: each layer's (kv_heads, head_dim); ``like``: the dtype and device."""

    def __init__(
        self, layout: Sequence[tuple[int, int]], page_size: int, like: Tensor, num_pages: int = 1
    ) -> None:
        if not layout:
            raise ValueError("layout must name at least one layer")
        self.page_size = page_size
        self.k = [like.new_zeros((num_pages, page_size, h, d)) for h, d in layout]
        self.v = [like.new_zeros((num_pages, page_size, h, d)) for h, d in layout]
        self.free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() takes the lowest id
        self.pages: dict[int, list[int]] = {}
        self.peak_pages = 0
        self.version = 0  # bumped when the pools are reallocated (layer views go stale)
        self.bytes_per_page = sum(2 * t[0].numel() * t.element_size() for t in self.k)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self.free)

    def bytes_allocated(self) -> int:
        return self.num_pages * self.bytes_per_page

    def bytes_in_use(self) -> int:
        return self.pages_in_use * self.bytes_per_page

    def reserve(self, seq: int, tokens: int) -> list[tuple[int, int]]:
        """Pages for ``tokens`` tokens of ``seq`` in all; returns the new (slot, page) pairs:
        page ``page`` is now the ``slot``-th of ``seq``'s block table."""
        held = self.pages.setdefault(seq, [])
        need = -(-tokens // self.page_size) - len(held)
        if need <= 0:
            return []
        if need > len(self.free):
            self._grow(need - len(self.free))
        new = [(len(held) + i, self.free.pop()) for i in range(need)]
        held.extend(page for _, page in new)
        self.peak_pages = max(self.peak_pages, self.pages_in_use)
        return new

    def release(self, seq: int) -> None:
        """``seq``'s pages back to the free list (their contents stay: finite numbers that
        the next holder overwrites before reading)."""
        self.free.extend(reversed(self.pages.pop(seq, [])))

    def _grow(self, at_least: int) -> None:
        old = self.num_pages
        new = max(2 * old, old + at_least)
        self.k = [torch.cat([t, t.new_zeros((new - old, *t.shape[1:]))]) for t in self.k]
        self.v = [torch.cat([t, t.new_zeros((new - old, *t.shape[1:]))]) for t in self.v]
        self.free[:0] = range(new - 1, old - 1, -1)  # under the free pages: taken last
        self.version += 1

    def block_table(self, seqs: Sequence[int], width: int, device) -> Tensor:
        """int32 (len(seqs), width): each sequence's pages, then page 0 (never read)."""
        rows = [self.pages.get(s, []) for s in seqs]
        return torch.tensor(
            [r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=device
        )

    def layers(self, lengths: Tensor, block_table: Tensor) -> list[KVCache]:
        """One :class:`KVCache` per layer over the pools, sharing ``lengths`` (int32 (B,),
        advanced by the caller after each forward) and ``block_table``."""
        return [KVCache(k, v, lengths, block_table) for k, v in zip(self.k, self.v, strict=True)]


@dataclasses.dataclass
class _Sequence:
    index: int  # in the prompts given
    prompt: Tensor  # (L,)
    budget: int  # most new tokens
    length: int = 0  # tokens in the cache
    count: int = 0  # new tokens picked


class BatchScheduler:
    """Continuous batching on a :class:`PagedKVCache`: at most ``max_batch`` sequences
    decode together, one token each per step; each new prompt is prefilled alone into its
    own pages and joins at the next step; a sequence that emits EOS or its last token leaves
    and gives its pages back, and the next waiting prompt takes its slot.

    The decode step reads no token back to the host unless an EOS id is set (then it must,
    to know who finished); pages are assigned from host-side counts, the block table and
    lengths are updated in place. After ``run``, ``cache`` holds the pool and its peak."""

    def __init__(self, model, max_batch: int, page_size: int = 16) -> None:
        self.model = model
        self.max_batch = max_batch
        self.page_size = page_size
        self.cache: PagedKVCache | None = None
        self.steps = 0  # batched decode steps run

    def run(
        self,
        prompts: list[Tensor],
        max_new_tokens: Sequence[int],
        select: Callable[[Tensor], Tensor],
        eos: int | None,
    ) -> list[Tensor]:
        """The new tokens (1-D, up to and including EOS) of each of ``prompts`` (1-D), at
        most ``max_new_tokens[i]`` for prompt i, in order; ``select`` picks a token per row of
        logits (B, V)."""
        weight = next(self.model.parameters())
        device, ps = weight.device, self.page_size
        if self.cache is None:
            # Room for the first batch's prompts and the first new token of each; the pools
            # grow from there as the sequences do.
            first = prompts[: self.max_batch]
            pages = sum(-(-(p.numel() + 1) // ps) for p in first)
            self.cache = PagedKVCache(self.model.kv_layout(), ps, weight, num_pages=pages)
        cache = self.cache
        # Every block table is as wide as the longest sequence can need.
        width = -(-max(p.numel() + n for p, n in zip(prompts, max_new_tokens, strict=True)) // ps)
        history: list[tuple[Tensor, list[_Sequence]]] = []  # (tokens picked, their rows)
        waiting = deque(
            _Sequence(i, p.to(device), budget=n)
            for i, (p, n) in enumerate(zip(prompts, max_new_tokens, strict=True))
            if n > 0
        )
        rows: list[_Sequence] = []  # the running batch; replaced, never mutated (history)
        last = lengths = table = views = None
        version = -1

        def done(s: _Sequence, token: int | None) -> bool:
            return s.count == s.budget or (eos is not None and token == eos)

        while waiting or rows:
            joined: list[tuple[_Sequence, Tensor]] = []
            while waiting and len(rows) + len(joined) < self.max_batch:
                s = waiting.popleft()
                token = self._prefill(s, select, width, history)
                if done(s, int(token) if eos is not None else None):
                    cache.release(s.index)
                else:
                    joined.append((s, token))
            if joined:
                new_rows = [s for s, _ in joined]
                new_last = torch.cat([t for _, t in joined])
                new_lengths = torch.tensor(
                    [s.length for s in new_rows], dtype=torch.int32, device=device
                )
                new_table = cache.block_table([s.index for s in new_rows], width, device)
                if rows:
                    last = torch.cat([last, new_last])
                    lengths = torch.cat([lengths, new_lengths])
                    table = torch.cat([table, new_table])
                else:
                    last, lengths, table = new_last, new_lengths, new_table
                rows, version = rows + new_rows, -1
            if not rows:
                continue
            # A page for each row whose next token starts one: from host-side counts, so
            # no read back from the device.
            for i, s in enumerate(rows):
                if s.length % ps == 0:
                    for slot, page in cache.reserve(s.index, s.length + 1):
                        table[i, slot] = page
            if version != cache.version:
                views, version = cache.layers(lengths, table), cache.version
            logits = self.model._cached_logits(last[:, None], lengths[:, None].long(), views)
            lengths += 1
            last = select(logits)
            self.steps += 1
            history.append((last, rows))
            tokens = last.tolist() if eos is not None else [None] * len(rows)
            keep = []
            for i, (s, token) in enumerate(zip(rows, tokens, strict=True)):
                s.length += 1
                s.count += 1
                if done(s, token):
                    cache.release(s.index)
                else:
                    keep.append(i)
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                index = torch.tensor(keep, dtype=torch.long, device=device)
                last, lengths, table = last[index], lengths[index], table[index]
                version = -1
        picked: list[list[int]] = [[] for _ in prompts]
        for tokens, batch in history:  # one read back per step, after the loop
            for s, t in zip(batch, tokens.tolist(), strict=True):
                picked[s.index].append(t)
        return [torch.tensor(p, dtype=torch.long, device=device) for p in picked]

    def _prefill(self, s: _Sequence, select, width: int, history: list) -> Tensor:
        """Run ``s``'s prompt alone into its own pages; its first token (1,)."""
        n, device = s.prompt.numel(), s.prompt.device
        self.cache.reserve(s.index, n)
        table = self.cache.block_table([s.index], width, device)
        start = torch.zeros(1, dtype=torch.int32, device=device)
        logits = self.model._cached_logits(s.prompt[None], None, self.cache.layers(start, table))
        s.length, s.count = n, 1
        token = select(logits)
        history.append((token, [s]))
        return token


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
        token = select(logits)
        if eos is not None:  # without an EOS no row finishes: nothing to pad
            token = token.masked_fill(finished, pad)
            finished |= token == eos
        out.append(token)
        if eos is not None and bool(finished.all()):
            break
        if i + 1 < max_new_tokens:
            logits = step(token, i)
    if not out:
        return first_logits.new_zeros((first_logits.shape[0], 0), dtype=torch.long)
    return torch.stack(out, dim=1)
