"""Sliding-window perplexity and pseudo-perplexity against naive loops written here, and
against models whose logits are known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm import models
from fastlm.data import Tokenizer
from fastlm.eval.perplexity import (
    causal_token_nlls,
    masked_token_nlls,
    perplexity,
    pseudo_perplexity,
)

VOCAB = 61
POSITIONS = 16
TEXTS = ["The doctor said she would call back tomorrow.", "Rich people cook dinner.",
         "Poor people are lazy.", "The engineer fixed the bridge."]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """This module's own tokenizer (it overrides the directory's), trained on the text the
    tests score so that words are single tokens; milliseconds."""
    return Tokenizer.train(TEXTS * 4, vocab_size=600)


def tiny_gpt(preset: str = "gpt2-tiny") -> torch.nn.Module:
    model = models.create(preset, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
                          num_layers=1)  # fmt: skip
    return model.eval()


def tiny_bert(vocab: int = VOCAB) -> torch.nn.Module:
    return models.create("bert-tiny", vocab_size=vocab, max_position_embeddings=48,
                         num_layers=1).eval()  # fmt: skip


@torch.no_grad()
def naive_causal_nlls(model, ids: list[int], max_length: int, stride: int) -> list[float]:
    """Each token scored alone with the context the sliding windows give it, in closed form:
    windows start at multiples of the stride, and token t belongs to the first window that
    reaches past it, k = max(0, ceil((t - max_length + 1) / stride)); its context is the
    window's tokens before it (none, and so unscored, when the window starts at t)."""
    out = [math.nan] * min(1, len(ids))
    for t in range(1, len(ids)):
        begin = max(0, -(-(t - max_length + 1) // stride)) * stride
        if begin == t:
            out.append(math.nan)
            continue
        logits = model(torch.tensor([ids[begin:t]])).logits[0, -1].double()
        out.append(-float(logits.log_softmax(-1)[ids[t]]))
    return out


def assert_nlls(got: torch.Tensor, expected: list[float]) -> None:
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got.nan_to_num(0.0), expected.nan_to_num(0.0), atol=1e-4, rtol=1e-4)


def test_one_window_is_exp_of_the_model_loss():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (POSITIONS,))
    result = perplexity(model, None, [ids], max_length=POSITIONS, stride=POSITIONS)
    with torch.no_grad():
        loss = float(model(ids[None], labels=ids[None]).loss)
    assert result.tokens == POSITIONS - 1
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert result.nll == pytest.approx(loss * (POSITIONS - 1), rel=1e-5)


def test_disjoint_windows_are_exp_of_the_pooled_chunk_losses():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (37,))
    length = 8
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in ids.split(length):  # 8, 8, 8, 8, 5 tokens
            if len(chunk) > 1:
                total += float(model(chunk[None], labels=chunk[None]).loss) * (len(chunk) - 1)
                count += len(chunk) - 1
    result = perplexity(model, None, [ids.tolist()], max_length=length, stride=length)
    assert (result.tokens, count) == (32, 32)  # 7 + 7 + 7 + 7 + 4
    assert result.nll == pytest.approx(total, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("max_length,stride", [(8, 1), (8, 3), (8, 5), (5, 5), (16, 8)])
def test_sliding_windows_match_the_naive_loop(preset, max_length, stride):
    model = tiny_gpt(preset)
    texts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (29, 1, 0, 2, 9)]
    nlls = causal_token_nlls(model, texts, max_length, stride, batch_size=3)
    for ids, got in zip(texts, nlls, strict=True):
        assert_nlls(got, naive_causal_nlls(model, ids, max_length, stride))
    # Every token but the first counted once, unless disjoint windows skip window starts.
    tokens = sum(int((~t.isnan()).sum()) for t in nlls)
    once = sum(max(0, len(ids) - 1) for ids in texts)
    skipped = 0 if stride < max_length else sum(len(range(stride, len(t), stride)) for t in texts)
    assert tokens == once - skipped
    result = perplexity(model, None, texts, max_length, stride, batch_size=2)
    assert result.tokens == tokens
    expected = sum(float(t.nansum()) for t in nlls)
    assert result.nll == pytest.approx(expected, rel=1e-6)


def test_known_logits_count_every_token_once():
    # The final norm's scale set to zero leaves its bias u as every position's hidden
    # state: the logits are lm_head(u) wherever the token sits and whatever precedes it, so
    # a token's NLL is -log_softmax(W u)[token], and the total is that summed once per
    # scored token.
    model = tiny_gpt()
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.normal_(0, 3.0)
        logp = (model.lm_head.weight.double() @ model.norm_f.bias.double()).log_softmax(-1)
    ids = torch.randint(0, VOCAB, (40,))
    expected = -float(logp[ids[1:]].sum())
    result = perplexity(model, None, [ids], max_length=6, stride=4)
    assert result.tokens == 39
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / 39), rel=1e-5)


def test_strings_through_the_tokenizer(tokenizer):
    model = models.create("gpt2-tiny", vocab_size=tokenizer.vocab_size, num_layers=1,
                          max_position_embeddings=32).eval()  # fmt: skip
    by_text = perplexity(model, tokenizer, TEXTS, max_length=4, stride=3)
    by_ids = perplexity(model, None, [tokenizer.encode(t) for t in TEXTS], 4, 3)
    assert by_text == by_ids
    assert by_text.tokens == sum(len(tokenizer.encode(t)) - 1 for t in TEXTS)


def test_training_flag_restored_and_batches_agree():
    model = tiny_gpt().train()
    texts = [torch.randint(0, VOCAB, (n,)) for n in (20, 7, 13)]
    one = perplexity(model, None, texts, max_length=8, stride=3, batch_size=1)
    assert model.training
    many = perplexity(model, None, texts, max_length=8, stride=3, batch_size=16)
    assert many.tokens == one.tokens
    assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_nothing_scored_is_nan():
    result = perplexity(tiny_gpt(), None, [[3], []])
    assert result.tokens == 0 and result.nll == 0.0 and math.isnan(result.perplexity)


def test_perplexity_errors(tokenizer):
    model = tiny_gpt()
    with pytest.raises(ValueError, match="stride must be at most max_length"):
        perplexity(model, None, [[1, 2, 3]], max_length=4, stride=5)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 16\]"):
        perplexity(model, None, [[1, 2, 3]], max_length=17)
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        perplexity(model, None, [[1, 2, 3]], max_length=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        perplexity(model, None, [[1, 2, 3]], batch_size=0)
    with pytest.raises(ValueError, match=r"sequences\[1\] holds ids outside"):
        perplexity(model, None, [[1, 2], [VOCAB]])
    with pytest.raises(TypeError, match=r"sequences\[0\] is a str"):
        perplexity(model, None, ["some text"])
    with pytest.raises(TypeError, match="flat sequence of int ids"):
        perplexity(model, None, [[0.5, 1.0]])
    with pytest.raises(TypeError, match="model must be a fastlm GPT"):
        perplexity(tiny_bert(), None, [[1, 2]])
    with pytest.raises(TypeError, match="tokenizer must be a fastlm Tokenizer"):
        perplexity(model, "gpt2", ["text"])


@torch.no_grad()
def naive_pll(model, ids: list[int], positions: list[int], mask_id: int) -> list[float]:
    out = []
    for p in positions:
        masked = list(ids)
        masked[p] = mask_id
        logits = model(torch.tensor([masked])).logits[0, p].double()
        out.append(-float(logits.log_softmax(-1)[ids[p]]))
    return out


def test_pseudo_perplexity_matches_the_naive_loop():
    model = tiny_bert()
    mask_id = VOCAB - 1
    texts = [torch.randint(0, VOCAB - 1, (n,)).tolist() for n in (9, 3, 14)]
    # batch_size 4 puts copies of different lengths (so padding) in one forward.
    result = pseudo_perplexity(model, None, texts, mask_id=mask_id, batch_size=4)
    expected = [v for ids in texts for v in naive_pll(model, ids, list(range(len(ids))), mask_id)]
    assert result.tokens == len(expected) == 26
    assert result.nll == pytest.approx(sum(expected), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(expected) / 26), rel=1e-5)


def test_masked_token_nlls_at_chosen_positions():
    model = tiny_bert()
    ids = torch.randint(0, VOCAB - 1, (11,)).tolist()
    (got,) = masked_token_nlls(model, [ids], VOCAB - 1, positions=[[0, 4, 10]], batch_size=2)
    expected = [math.nan] * 11
    for p, v in zip([0, 4, 10], naive_pll(model, ids, [0, 4, 10], VOCAB - 1), strict=True):
        expected[p] = v
    assert_nlls(got, expected)


def test_pseudo_perplexity_with_the_tokenizer_scores_the_text_between_cls_and_sep(tokenizer):
    model = tiny_bert(tokenizer.vocab_size)
    result = pseudo_perplexity(model, tokenizer, TEXTS, batch_size=8)
    expected = []
    for text in TEXTS:
        ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
        expected += naive_pll(model, ids, list(range(1, len(ids) - 1)), tokenizer.mask_id)
    assert result.tokens == len(expected)
    assert result.nll == pytest.approx(sum(expected), rel=1e-5)


def test_pseudo_perplexity_of_known_logits():
    # Zeroing the head's norm leaves the head bias as the logits at every position.
    model = tiny_bert()
    with torch.no_grad():
        model.head_norm.weight.zero_()
        model.head_norm.bias.zero_()
        model.head_bias.normal_(0, 2.0)
    logp = model.head_bias.detach().double().log_softmax(-1)
    ids = torch.randint(0, VOCAB - 1, (12,))
    result = pseudo_perplexity(model, None, [ids], mask_id=VOCAB - 1)
    expected = -float(logp[ids].sum())
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected / 12), rel=1e-5)


def test_pseudo_perplexity_errors(tokenizer):
    model = tiny_bert()
    with pytest.raises(ValueError, match="mask_id is required"):
        pseudo_perplexity(model, None, [[1, 2]])
    with pytest.raises(ValueError, match="mask_id must be a token id"):
        pseudo_perplexity(model, None, [[1, 2]], mask_id=VOCAB)
    with pytest.raises(ValueError, match="mask_id: pass it only with token ids"):
        pseudo_perplexity(tiny_bert(tokenizer.vocab_size), tokenizer, ["a"], mask_id=3)
    with pytest.raises(ValueError, match=r"sequences\[0\] has 49 tokens, more than the model's 48"):
        pseudo_perplexity(model, None, [[1] * 49], mask_id=2)
    with pytest.raises(ValueError, match=r"positions\[0\] holds 5"):
        masked_token_nlls(model, [[1, 2]], 3, positions=[[5]])
    with pytest.raises(TypeError, match="model must be a fastlm BertForMaskedLM"):
        pseudo_perplexity(tiny_gpt(), None, [[1, 2]], mask_id=3)
