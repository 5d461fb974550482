"""Batched continuation scoring and generation against naive loops: one unpadded forward per
request, and greedy decoding by a full forward per token."""

from __future__ import annotations

import copy

import pytest
import torch

from fastlm.eval import scoring
from fastlm.testing import assert_loss_policy

FAMILIES = ["gpt", "llama", "t5"]
REQUESTS = [  # contexts and continuations of different lengths, so batches pad
    ("Question: what is the answer?\nA. one\nB. two\nAnswer:", " B"),
    ("The trophy did not fit in the suitcase because the trophy", " was too big."),
    ("Q: Is the sky blue?\nA:", " yes"),
    ("Return", " the number of items in the container"),
    ("The trophy did not fit in the suitcase because the suitcase", " was too big."),
    ("Q", ":"),
    ("Question: what is the answer?\nA. one\nB. two\nAnswer:", " A"),
]


def test_encode_pair_splits_where_the_context_ends(tokenizer):
    ctx, cont = scoring.encode_pair(tokenizer, "Answer:", " B")
    assert ctx == tokenizer.encode("Answer:") and cont == tokenizer.encode(" B")
    assert ctx + cont == tokenizer.encode("Answer: B")
    # A space ending the context belongs to the next word.
    assert scoring.encode_pair(tokenizer, "Answer: ", "B") == (ctx, cont)
    # A merge across the boundary: the continuation is encoded on its own.
    words = ["the", "trophy", "suitcase", "container", "Return"]
    straddling = [
        w
        for w in words
        if tokenizer.encode(w)[: len(tokenizer.encode(w[:-1]))] != tokenizer.encode(w[:-1])
    ]
    assert straddling, "the test needs a word whose last letter merges into its last token"
    w = straddling[0]
    assert scoring.encode_pair(tokenizer, w[:-1], w[-1]) == (
        tokenizer.encode(w[:-1]),
        tokenizer.encode(w[-1]),
    )
    with pytest.raises(ValueError, match="continuation is empty"):
        scoring.encode_pair(tokenizer, "Answer:", "")


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_scores_equal_one_forward_per_request(
    family, padding, models, tokenizer, assert_logprob
):
    model = models[family]
    pairs = [scoring.encode_pair(tokenizer, c, k) for c, k in REQUESTS]
    got = scoring.score(model, pairs, batch_size=3, padding=padding)
    one_batch = scoring.score(model, pairs, batch_size=len(pairs), padding=padding)
    for pair, s, s1 in zip(pairs, got, one_batch, strict=True):
        assert s.tokens == len(pair[1])
        assert_logprob(s.logprob, model, [pair], "batches of 3")
        assert_logprob(s1.logprob, model, [pair], "one batch")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_flag_says_whether_argmax_decoding_gives_the_continuation(
    family, models, tokenizer, naive_greedy_ids
):
    """A continuation the model decodes greedily is greedy; the same with its last token
    changed is not."""
    model = models[family]
    pairs = []
    for context, _ in REQUESTS[:4]:
        ids = tokenizer.encode(context)
        cont = naive_greedy_ids(model, tokenizer, ids, 3)
        if cont:  # not EOS at once
            other = cont[:-1] + [(cont[-1] + 1) % tokenizer.vocab_size]
            pairs += [(ids, cont), (ids, other)]
    assert len(pairs) >= 4
    flags = [s.greedy for s in scoring.score(model, pairs, batch_size=4)]
    assert flags == [True, False] * (len(pairs) // 2)


def test_a_long_gpt_context_loses_its_oldest_tokens(models, tokenizer):
    model = models["gpt"]
    limit = model.config.max_position_embeddings
    ctx = tokenizer.encode("The trophy did not fit in the suitcase. " * 40)
    cont = tokenizer.encode(" was too big.")
    assert len(ctx) > limit
    kept = (ctx + cont)[:-1][-limit:]  # the input the model can read
    with torch.no_grad():
        twin = copy.deepcopy(model).double()
        rows, rows64 = (m(torch.tensor([kept])).logits[0, -len(cont) :] for m in (model, twin))
    expected = sum(float(rows64.log_softmax(-1)[j, t]) for j, t in enumerate(cont))
    (got,) = scoring.score(model, [(ctx, cont)])
    # Against the float64 model: 2 x the logits' allowance per token (fastlm.testing).
    assert_loss_policy(got.logprob, expected, rows, rows64, "logprob", weight=2 * len(cont))
    with pytest.raises(ValueError, match=r"requests\[0\]: its continuation \(193 tokens\)"):
        scoring.score(model, [([1], [5] * (limit + 1))])


def test_score_errors(models):
    with pytest.raises(ValueError, match="model must be a fastlm GPT or T5"):
        scoring.score(models["bert"], [([1], [2])])
    with pytest.raises(ValueError, match="padding must be 'right' or 'left'"):
        scoring.score(models["gpt"], [([1], [2])], padding="middle")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        scoring.score(models["gpt"], [([1], [2])], batch_size=0)
    with pytest.raises(ValueError, match=r"requests\[1\] has an empty continuation"):
        scoring.score(models["t5"], [([1], [2]), ([1], [])])
    with pytest.raises(ValueError, match=r"requests\[0\] has an empty context"):
        scoring.score(models["gpt"], [([], [2])])
    assert scoring.score(models["t5"], [([], [2])])[0].tokens == 1  # T5 reads just the EOS


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_equals_naive_greedy_decoding(family, models, tokenizer, naive_greedy):
    model = models[family]
    prompts = [
        "Q: Is the sky blue?\nA:",
        "Return",
        "The trophy did not fit in the suitcase",
        "Question: what is the answer?\nA. one\nB. two\nAnswer:",
        "",
    ]
    got = scoring.generate_until(model, tokenizer, prompts, 6, stop=(), batch_size=2)
    for p, text in zip(prompts, got, strict=True):
        ids = tokenizer.encode(p) or [tokenizer.eos_id]  # an empty GPT prompt reads an EOS
        assert text == naive_greedy(model, tokenizer, ids, 6, stop="\0")
    # Stop strings cut the text before the first of them (in the longest text: special
    # tokens, which these untrained models emit often, are left out of the texts).
    i = max(range(len(got)), key=lambda i: len(got[i]))
    full = got[i]
    assert len(full) > 2
    a, b = full[1], full[2]
    cut = scoring.generate_until(model, tokenizer, prompts[i : i + 1], 6, stop=(b, a), batch_size=2)
    assert cut == [full[: min(full.index(a), full.index(b))]]


def test_a_long_gpt_prompt_keeps_its_newest_tokens(models, tokenizer, naive_greedy):
    model = models["gpt"]
    prompt = "The trophy did not fit in the suitcase. " * 40
    ids = tokenizer.encode(prompt)
    room = model.config.max_position_embeddings - 5
    assert len(ids) > room
    (got,) = scoring.generate_until(model, tokenizer, [prompt], 5, stop=())
    assert got == naive_greedy(model, tokenizer, ids[-room:], 5, stop="\0")
    with pytest.raises(ValueError, match="max_new_tokens \\(192\\) leaves no room"):
        scoring.generate_until(model, tokenizer, [prompt], 192)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        scoring.generate_until(model, tokenizer, [prompt], 0)


def test_rolling_windows_score_every_token_once_with_the_longest_context():
    tokens = list(range(1, 11))
    assert scoring.rolling_windows(tokens, 0, 4) == [
        ([0], [1, 2, 3, 4]),
        ([4], [5, 6, 7, 8]),
        ([6, 7, 8], [9, 10]),  # the last window still reads 4 tokens
    ]
    assert scoring.rolling_windows(tokens, 0, 20) == [([0], tokens)]
    assert scoring.rolling_windows([], 0, 4) == []
    with pytest.raises(ValueError, match="window must be a positive int"):
        scoring.rolling_windows(tokens, 0, 0)
