"""Generation with the KV cache: greedy output token-for-token identical to transformers'
``generate`` (batched, left-padded prompts), sampling controls, EOS, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import fastlm
from fastlm.models import create
from fastlm.models.generation import BatchScheduler, PagedKVCache, next_tokens
from fastlm.models.hf import from_hf
from fastlm.models.layers import few_rows_linear
from fastlm.testing import assert_policy, assert_policy_norm

T = pytest.importorskip("transformers")

VOCAB, EOS = 101, 5
SPECIAL = dict(pad_token_id=0, eos_token_id=EOS, bos_token_id=1)


def _models():
    return {
        "gpt2": T.GPT2LMHeadModel(
            T.GPT2Config(
                n_embd=48, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=64, **SPECIAL
            )
        ),
        "llama": T.LlamaForCausalLM(
            T.LlamaConfig(
                hidden_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_hidden_layers=2,
                intermediate_size=88,
                vocab_size=VOCAB,
                **SPECIAL,
            )
        ),
        # A window of 4 that the 9-token prompts and 12 new tokens cross (without it the
        # greedy tokens differ); the caps' numbers are held by the logits tests.
        "gemma2": T.Gemma2ForCausalLM(
            T.Gemma2Config(
                hidden_size=48,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                num_hidden_layers=2,
                intermediate_size=88,
                vocab_size=VOCAB,
                sliding_window=4,
                attn_logit_softcapping=0.5,
                final_logit_softcapping=0.3,
                attn_implementation="eager",
                **SPECIAL,
            )
        ),
        "t5": T.T5ForConditionalGeneration(
            T.T5Config(
                d_model=48,
                num_heads=4,
                d_kv=12,
                num_layers=2,
                d_ff=72,
                vocab_size=VOCAB,
                decoder_start_token_id=0,
                pad_token_id=0,
                eos_token_id=EOS,
            )
        ),
    }


def _left_padded_prompts(batch=3, seqlen=9):
    ids = torch.randint(EOS + 1, VOCAB, (batch, seqlen))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "t5"])
def test_greedy_matches_transformers_token_for_token(name):
    hf = _models()[name].eval()
    ours = from_hf(hf)
    ids, mask = _left_padded_prompts()
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = ours.generate(ids, 12, attention_mask=mask, eos_token_id=EOS, pad_token_id=0)
    assert torch.equal(got, theirs)
    # Each row alone (no padding) continues as it did in the batch (until its EOS).
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].bool()]
        single = ours.generate(alone, 12, eos_token_id=EOS, pad_token_id=0)[0]
        if name != "t5":  # decoder-only outputs start with the prompt
            single, batch_row = single[alone.shape[1] :], got[row, ids.shape[1] :]
        else:
            batch_row = got[row]
        assert torch.equal(single, batch_row[: len(single)])


@pytest.mark.parametrize("paged", [False, True])
def test_greedy_on_the_triton_kernels_picks_the_top_token_of_the_torch_backend(paged):
    """Decoding on the Triton kernels (the decode kernel with its cache, contiguous or
    paged, under the interpreter here): every token it picks is, by a full forward on the
    torch backend, the most likely one up to bf16 rounding (exact ties may break either
    way)."""
    model = create("llama-tiny", num_layers=1).to(torch.bfloat16).eval()
    ids, mask = _left_padded_prompts(batch=2, seqlen=5)
    new = 4
    with fastlm.use_backend("triton"):
        got = model.generate(ids, new, attention_mask=mask, paged=paged, page_size=2)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    with fastlm.use_backend("torch"):  # rotary is relative: left-pad offsets do not matter
        logits = model(got[:, :-1], attention_mask=full_mask[:, :-1]).logits.float()
    step_logits = logits[:, ids.shape[1] - 1 :]  # (B, new, V): predicting each new token
    chosen = step_logits.gather(-1, got[:, ids.shape[1] :, None]).squeeze(-1)
    best = step_logits.max(-1).values
    tolerance = 2e-2 * step_logits.abs().max().item()
    assert (chosen >= best - tolerance).all()


def test_eos_finishes_a_row_and_pads_it():
    """A row that emits EOS is finished: padded from there on while the other row continues
    as greedy decoding does, until every row is finished or max_new_tokens."""
    model = create("gpt2-tiny", vocab_size=VOCAB).eval()
    prompts = torch.randint(EOS + 1, VOCAB, (8, 4))
    greedy = model.generate(prompts, 6)[:, 4:].tolist()
    # EOS: a token one row emits within its first 5 new tokens and another row never does,
    # so the first finishes early and is padded (0) while the second runs to the end.
    i, j, eos = next(
        (i, j, token)
        for i in range(8)
        for j in range(8)
        for token in greedy[i][:5]
        if token != 0 and token not in greedy[j]
    )
    ids = prompts[[i, j]]
    out = model.generate(ids, 6, eos_token_id=eos, pad_token_id=0)
    stop = greedy[i].index(eos) + 1
    assert out.shape == (2, 10)
    assert torch.equal(out[:, :4], ids)
    assert out[0, 4:].tolist() == greedy[i][:stop] + [0] * (6 - stop), (greedy[i], eos)
    assert out[1, 4:].tolist() == greedy[j]
    # Generation stops once every row has finished: row i at once, row j at its first EOS.
    eos = greedy[i][0]
    stops = [row.index(eos) + 1 if eos in row else 6 for row in (greedy[i], greedy[j])]
    assert model.generate(ids, 6, eos_token_id=eos, pad_token_id=0).shape == (2, 4 + max(stops))


def test_generate_refuses_more_positions_than_the_model_has():
    """Learned positions end at max_position_embeddings: a longer prompt, or more new tokens
    than fit after it, is refused naming the limit (not an IndexError). Rotary positions
    extend, so a Llama-style model generates past it."""
    model = create("gpt2-tiny", vocab_size=VOCAB, num_layers=1).eval()  # 256 positions
    assert model.position_limit() == 256
    too_long = r"the prompt holds 257 tokens, more than the model's 256 positions"
    with pytest.raises(ValueError, match=too_long):
        model.generate(torch.randint(EOS + 1, VOCAB, (1, 257)), 1)
    ids = torch.randint(EOS + 1, VOCAB, (2, 250))
    too_many = "the prompt's 250 tokens and max_new_tokens 7 exceed the model's 256 positions"
    with pytest.raises(ValueError, match=too_many + r" \(max_position_embeddings\): at most 6"):
        model.generate(ids, 7)
    assert model.generate(ids, 6).shape == (2, 256)  # exactly the limit
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is shorter: its new tokens follow its own 247
    assert model.generate(ids, 6, attention_mask=mask).shape == (2, 256)
    rotary = create("llama-tiny", vocab_size=VOCAB, num_layers=1, max_position_embeddings=8)
    assert rotary.position_limit() is None
    assert rotary.eval().generate(torch.randint(EOS + 1, VOCAB, (1, 6)), 4).shape == (1, 10)


def test_sampling_controls():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    assert (next_tokens(logits, True, 1.0, 1, None, gen) == 1).all()  # top_k=1 is greedy
    top2 = next_tokens(logits, True, 1.0, 2, None, gen)
    assert set(top2.tolist()) == {1, 2}
    nucleus = next_tokens(logits, True, 1.0, None, 0.5, gen)  # p(1) ~ 0.47 < 0.5 <= p(1)+p(2)
    assert set(nucleus.tolist()) == {1, 2}
    cold = next_tokens(logits, True, 0.01, None, None, gen)
    assert (cold == 1).all()
    hot = next_tokens(logits, True, 100.0, None, None, gen)
    assert len(set(hot.tolist())) == 5
    a = next_tokens(logits, True, 1.0, None, None, torch.Generator().manual_seed(3))
    b = next_tokens(logits, True, 1.0, None, None, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
        (dict(input_ids=torch.ones(2, 4)), "input_ids"),
    ],
)
def test_bad_input(kwargs, word):
    model = create("gpt2-tiny", vocab_size=VOCAB)
    args = dict(input_ids=torch.ones(2, 4, dtype=torch.long), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=word):
        model.generate(**args)


# ---------------------------------------------------------------------------------------------
# The paged cache and continuous batching.


def _uneven_prompts(lengths=(3, 11, 6, 1, 8)):
    return [torch.randint(EOS + 1, VOCAB, (n,)) for n in lengths]


def _varied_gpt():
    # Wide initial weights, so that greedy decoding does not repeat one token (a test of
    # which token comes when needs tokens that differ).
    return create("gpt2-tiny", vocab_size=VOCAB, num_layers=2, initializer_range=0.3).eval()


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_paged_greedy_matches_padded_and_transformers(name):
    """Uneven left-padded prompts: the paged cache (pages of 4, so sequences cross pages)
    gives transformers' tokens and the padded cache's, with and without EOS."""
    hf = _models()[name].eval()
    ours = from_hf(hf)
    ids, mask = _left_padded_prompts()
    theirs = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    kw = dict(attention_mask=mask, eos_token_id=EOS, pad_token_id=0)
    padded = ours.generate(ids, 12, **kw)
    paged = ours.generate(ids, 12, paged=True, page_size=4, **kw)
    assert torch.equal(paged, theirs), (paged, theirs)
    assert torch.equal(paged, padded)
    # An EOS that one row emits early: that row stops and pads, the others go on.
    eos = int(padded[0, ids.shape[1] + 1])
    kw = dict(attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours.generate(ids, 12, paged=True, **kw), ours.generate(ids, 12, **kw))


def test_a_prompt_joining_mid_run_continues_as_it_does_alone():
    """Continuous batching: two slots, three prompts; the third joins when the second's
    budget runs out while the first is still decoding. Each gets the tokens it gets alone,
    and the run takes the first prompt's steps only (static batching would add the third's).
    """
    model = _varied_gpt()
    prompts, budgets = _uneven_prompts((5, 9, 3)), [12, 3, 8]
    scheduler = BatchScheduler(model, max_batch=2, page_size=4)
    picks = lambda logits: logits.argmax(-1)  # noqa: E731
    with torch.no_grad():
        news = scheduler.run(prompts, budgets, picks, eos=None)
    for prompt, new, budget in zip(prompts, news, budgets, strict=True):
        alone = model.generate(prompt[None], budget)[0, len(prompt) :]
        assert torch.equal(new, alone), (new, alone)
    # The first token of each comes from its prefill; prompt 2 decodes from step 3 (after
    # prompt 1's two steps) to step 9, inside prompt 0's 11.
    assert scheduler.steps == budgets[0] - 1, scheduler.steps
    got = model.generate_many(prompts, budgets, max_batch=2, page_size=4)
    for out, prompt, new in zip(got, prompts, news, strict=True):
        assert torch.equal(out, torch.cat([prompt, new]))


def test_finished_sequences_give_their_pages_back():
    """Pages are taken as tokens arrive and returned on finishing: with every prompt in the
    batch the peak is each sequence's own pages (ceil(tokens / page_size), tokens = prompt +
    new - 1, the last token is never fed back), not batch x longest; one slot at a time
    reuses the same pages; after a run every page is free, and an EOS that ends rows early
    frees theirs sooner."""
    model = _varied_gpt()
    prompts, new, ps = _uneven_prompts(), 7, 4
    together = BatchScheduler(model, max_batch=len(prompts), page_size=ps)
    with torch.no_grad():
        out = together.run(prompts, [new] * len(prompts), lambda x: x.argmax(-1), eos=None)
    cache = together.cache
    held = [-(-(len(p) + new - 1) // ps) for p in prompts]
    assert cache.peak_pages == sum(held), (cache.peak_pages, held)
    assert cache.pages_in_use == 0 and sorted(cache.free) == list(range(cache.num_pages))
    assert cache.pages == {}
    page_bytes = 2 * len(model.blocks) * ps * model.config.hidden_size * 4  # k and v, fp32
    assert cache.bytes_per_page == page_bytes
    assert cache.bytes_in_use() == 0
    assert cache.bytes_allocated() == cache.num_pages * page_bytes
    # One slot: each sequence finds the pages the one before it gave back.
    alone = BatchScheduler(model, max_batch=1, page_size=ps)
    with torch.no_grad():
        again = alone.run(prompts, [new] * len(prompts), lambda x: x.argmax(-1), eos=None)
    assert alone.cache.peak_pages == max(held), (alone.cache.peak_pages, held)
    assert all(torch.equal(a, b) for a, b in zip(out, again, strict=True))
    # EOS: a token row 0 picks first; row 0 stops there and gives back its pages.
    eos = int(out[0][0])
    early = BatchScheduler(model, max_batch=len(prompts), page_size=ps)
    with torch.no_grad():
        cut = early.run(prompts, [new] * len(prompts), lambda x: x.argmax(-1), eos=eos)
    for full, short in zip(out, cut, strict=True):
        stop = full.tolist().index(eos) + 1 if eos in full.tolist() else new
        assert torch.equal(short, full[:stop])
    assert early.cache.pages_in_use == 0 and early.cache.peak_pages <= sum(held)


def test_page_pool_grows_keeping_pages_and_ids():
    """Out of free pages, the pools grow (doubling); pages already held keep their ids and
    contents, and released pages come back in the free list."""
    cache = PagedKVCache([(2, 3), (1, 3)], page_size=2, like=torch.zeros(()), num_pages=1)
    assert cache.reserve(0, 2) == [(0, 0)]
    cache.k[0][0].fill_(7.0)
    assert cache.reserve(1, 3) == [(0, 1), (1, 2)]  # grew from 1 page to 3
    assert cache.num_pages == 3 and cache.version == 1
    assert bool((cache.k[0][0] == 7.0).all()) and bool((cache.k[0][1:] == 0).all())
    assert cache.reserve(1, 4) == []  # 4 tokens fit its two pages
    table = cache.block_table([1, 0], 3, torch.device("cpu"))
    assert table.tolist() == [[1, 2, 0], [0, 0, 0]] and table.dtype == torch.int32
    cache.release(1)
    assert sorted(cache.free) == [1, 2] and cache.pages_in_use == 1
    assert cache.reserve(2, 1) == [(0, 1)]  # the lowest free id first


@pytest.mark.parametrize(
    "call, word",
    [
        (
            lambda m: m.generate(torch.ones(1, 3, dtype=torch.long), 2, paged=True, page_size=0),
            "page_size",
        ),
        (lambda m: m.generate_many([], 2), "prompts"),
        (lambda m: m.generate_many([torch.ones(2, 3, dtype=torch.long)], 2), r"prompts\[0\]"),
        (lambda m: m.generate_many([torch.ones(3, dtype=torch.long)], [2, 3]), "max_new_tokens"),
        (lambda m: m.generate_many([torch.ones(3, dtype=torch.long)], 2, max_batch=0), "max_batch"),
        (lambda m: m.generate_many([torch.ones(250, dtype=torch.long)], 7), "at most 6"),
    ],
)
def test_paged_bad_input(call, word):
    with pytest.raises(ValueError, match=word):
        call(create("gpt2-tiny", vocab_size=VOCAB, num_layers=1))
    with pytest.raises(TypeError, match="paged must be a bool"):
        create("gpt2-tiny", vocab_size=VOCAB, num_layers=1).generate(
            torch.ones(1, 3, dtype=torch.long), 2, paged=1
        )


def test_t5_has_no_paged_cache():
    model = from_hf(_models()["t5"])
    with pytest.raises(ValueError, match="paged: T5"):
        model.generate(torch.ones(1, 3, dtype=torch.long), 2, paged=True)


@pytest.mark.parametrize(
    "rows, vocab, bias",
    [(4, 20011, False), (3, 16384, True), (1, 20011, False), (9, 20011, True), (4, 300, True)],
)
def test_few_rows_linear_is_the_linear_within_policy(rows, vocab, bias):
    """The decode step's logits (a few rows against the vocabulary, computed as weight @
    hidden.T on the CPU) against float64, within the policy of F.linear's own error."""
    hidden, weight = torch.randn(rows, 96), torch.randn(vocab, 96)
    b = torch.randn(vocab) if bias else None
    reference = torch.nn.functional.linear(
        hidden.double(), weight.double(), None if b is None else b.double()
    )
    baseline = torch.nn.functional.linear(hidden, weight, b)
    assert_policy_norm(few_rows_linear(hidden, weight, b), reference, baseline, name="logits")


def test_gemma2_decode_step_logits_equal_the_full_forward():
    """Greedy tokens cannot see the final cap (tanh keeps the order) and rarely the attention
    cap: the logits of each cached decode step are held to the full forward's instead,
    within the numerical policy, on a model whose weights are wide enough that both caps
    bend (the float64 forward is the reference), across the sliding window."""
    model = create(
        "gemma2-tiny", vocab_size=VOCAB, sliding_window=4, initializer_range=0.3, dropout=0.0
    )
    model.eval()
    twin = copy.deepcopy(model).double()
    ids = torch.randint(EOS + 1, VOCAB, (2, 11))
    prompt = 5
    with torch.no_grad():
        full = model(ids).logits[:, prompt - 1 :]
        reference = twin(ids).logits[:, prompt - 1 :]
        caches = model.new_caches(2, ids.shape[1], model.tok_emb.weight)
        cached = [model._cached_logits(ids[:, :prompt], None, caches)]
        for i in range(prompt, ids.shape[1]):
            positions = torch.full((2, 1), i)
            cached.append(model._cached_logits(ids[:, i : i + 1], positions, caches))
    assert_policy(torch.stack(cached, 1), reference, full, "cached decode logits")
    assert reference.abs().max() > 0.5 * model.config.final_softcap  # the final cap bends


def test_new_caches_share_one_lengths_that_the_model_advances_once_per_forward():
    """GPT's caches hold one lengths tensor for every layer, advanced once per forward by
    the tokens fed (not once per layer); the decode step's logits are the full forward's;
    caches that claim to share but hold different tensors are refused (a layer would keep
    a stale length)."""
    model = create("llama-tiny", vocab_size=VOCAB, num_layers=3, dropout=0.0).eval()
    ids = torch.randint(EOS + 1, VOCAB, (2, 7))
    with torch.no_grad():
        caches = model.new_caches(2, 8, model.tok_emb.weight)
        lengths = caches[0].lengths
        assert all(c.shared and c.lengths is lengths for c in caches)
        model._cached_logits(ids[:, :5], None, caches)
        assert lengths.tolist() == [5, 5]
        step = model._cached_logits(ids[:, 5:6], torch.full((2, 1), 5), caches)
        assert lengths.tolist() == [6, 6]
        full = model(ids[:, :6]).logits[:, -1]
        reference = copy.deepcopy(model).double()(ids[:, :6]).logits[:, -1]
        assert_policy(step, reference, full, "decode step logits")

        mixed = model.new_caches(2, 8, model.tok_emb.weight)
        mixed[1] = fastlm.models.layers.KVCache(
            mixed[1].k, mixed[1].v, mixed[1].lengths.clone(), shared=True
        )
        with pytest.raises(ValueError, match="one lengths tensor"):
            model._cached_logits(ids[:, :2], None, mixed)
        mixed[1].shared = False  # one layer advancing its own, the others shared
        with pytest.raises(ValueError, match="must all be shared"):
            model._cached_logits(ids[:, :2], None, mixed)


def test_a_host_counted_cache_is_read_and_advanced_on_the_host():
    """``KVCache.filled`` (T5's decoder: every row at one length, counted on the host)
    stands in for ``lengths[0]`` on the bias path: the new keys land at ``filled`` and both
    counts advance, so the decoder never reads the lengths back from the device."""
    attn = fastlm.models.layers.Attention(8, 2, 4, num_kv_heads=2, bias=False).eval()
    cache = fastlm.models.layers.KVCache.empty(1, 6, 2, 4, torch.zeros(()))
    cache.filled = 2
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        attn(x, bias=torch.zeros(1, 1, 1, 3), causal=True, cache=cache)
    written = cache.k.abs().sum((0, 2, 3)) != 0
    assert written.tolist() == [False, False, True, False, False, False]
    assert cache.filled == 3 and cache.lengths.tolist() == [1]
