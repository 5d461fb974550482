"""Sliding-window perplexity and pseudo-perplexity against naive loops written here, and
against models whose logits are known by construction."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

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
from fastlm.testing import assert_loss_policy

VOCAB = 61
POSITIONS = 16
TEXTS = [
    "The doctor said she would call back tomorrow.",
    "Rich people cook dinner.",
    "Poor people are lazy.",
    "The engineer fixed the bridge.",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """This module's own tokenizer (it overrides the directory's), trained on the text the
    tests score so that words are single tokens; milliseconds."""
    return Tokenizer.train(TEXTS * 4, vocab_size=600)


def tiny_gpt(preset: str = "gpt2-tiny") -> torch.nn.Module:
    model = models.create(preset, vocab_size=VOCAB, max_position_embeddings=POSITIONS, num_layers=1)
    return model.eval()


def tiny_bert(vocab: int = VOCAB) -> torch.nn.Module:
    return models.create(
        "bert-tiny", vocab_size=vocab, max_position_embeddings=48, num_layers=1
    ).eval()


def twins(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and its float64 twin (the reference its float32 scores are held to)."""
    return model, copy.deepcopy(model).double()


@torch.no_grad()
def naive_causal_nlls(model, ids: list[int], max_length: int, stride: int) -> Naive:
    """Each token scored alone with the context the sliding windows give it, in closed form:
    windows start at multiples of the stride, and token t belongs to the first window that
    reaches past it, k = max(0, ceil((t - max_length + 1) / stride)); its context is the
    window's tokens before it (none, and so unscored, when the window starts at t)."""
    out, rows = [math.nan] * min(1, len(ids)), []
    for t in range(1, len(ids)):
        begin = max(0, -(-(t - max_length + 1) // stride)) * stride
        if begin == t:
            out.append(math.nan)
            continue
        rows.append(model(torch.tensor([ids[begin:t]])).logits[0, -1])
        out.append(-float(rows[-1].double().log_softmax(-1)[ids[t]]))
    return Naive(out, rows)


@dataclass
class Naive:
    """A naive loop's per-token NLLs (NaN: unscored) and the logits rows it scored with."""

    nlls: list[float]
    rows: list[torch.Tensor]


def reference(naive, model, *args) -> tuple[Naive, Naive]:
    """The naive loop by the model (float32) and by its float64 twin (the reference)."""
    return tuple(naive(m, *args) for m in twins(model))


def assert_nll_sum(got: float, runs: list[tuple[Naive, Naive]], name: str = "nll") -> None:
    """A float32 sum of token NLLs against the float64 naive loops' ``runs``: within what the
    rounding of the float32 logits allows, 2 per token (fastlm.testing)."""
    expected = math.fsum(v for _, r64 in runs for v in r64.nlls if not math.isnan(v))
    rows, rows64 = (torch.stack([row for run in runs for row in run[i].rows]) for i in (0, 1))
    assert_loss_policy(got, expected, rows, rows64, name, weight=2 * len(rows))


def assert_nlls(got: torch.Tensor, runs: tuple[Naive, Naive]) -> None:
    """Per-token NLLs: NaN where unscored, each within 2 x the logits' allowance."""
    expected = torch.tensor(runs[1].nlls, dtype=torch.float64)
    assert torch.equal(got.isnan(), expected.isnan())
    scored = ~expected.isnan()
    rows, rows64 = (torch.stack(run.rows) if run.rows else torch.zeros(0, VOCAB) for run in runs)
    # float32 values (the kernels' NLLs), held as float64
    assert_loss_policy(got[scored].float(), expected[scored], rows, rows64, "token NLLs")


def test_one_window_is_exp_of_the_model_loss():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (POSITIONS,))
    result = perplexity(model, None, [ids], max_length=POSITIONS, stride=POSITIONS)
    with torch.no_grad():
        out, out64 = (m(ids[None], labels=ids[None], return_logits=True) for m in twins(model))
    assert result.tokens == POSITIONS - 1
    assert result.perplexity == math.exp(result.nll / result.tokens)
    logits, logits64 = (o.logits[0, :-1] for o in (out, out64))
    n = POSITIONS - 1  # a sum of n token NLLs
    assert_loss_policy(result.nll, float(out64.loss) * n, logits, logits64, "nll", weight=2 * n)


def test_disjoint_windows_are_exp_of_the_pooled_chunk_losses():
    model = tiny_gpt()
    ids = torch.randint(0, VOCAB, (37,))
    length = 8
    total, count, rows, rows64 = 0.0, 0, [], []
    with torch.no_grad():
        for chunk in ids.split(length):  # 8, 8, 8, 8, 5 tokens
            if len(chunk) > 1:
                batch = dict(input_ids=chunk[None], labels=chunk[None], return_logits=True)
                out, out64 = (m(**batch) for m in twins(model))
                total += float(out64.loss) * (len(chunk) - 1)
                count += len(chunk) - 1
                rows += [out.logits[0, :-1]]
                rows64 += [out64.logits[0, :-1]]
    result = perplexity(model, None, [ids.tolist()], max_length=length, stride=length)
    assert (result.tokens, count) == (32, 32)  # 7 + 7 + 7 + 7 + 4
    assert_loss_policy(result.nll, total, torch.cat(rows), torch.cat(rows64), weight=2 * count)
    assert result.perplexity == math.exp(result.nll / result.tokens)


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("max_length,stride", [(8, 1), (8, 3), (8, 5), (5, 5), (16, 8)])
def test_sliding_windows_match_the_naive_loop(preset, max_length, stride):
    model = tiny_gpt(preset)
    texts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (29, 1, 0, 2, 9)]
    nlls = causal_token_nlls(model, texts, max_length, stride, batch_size=3)
    runs = [reference(naive_causal_nlls, model, ids, max_length, stride) for ids in texts]
    for got, run in zip(nlls, runs, strict=True):
        assert_nlls(got, run)
    # Every token but the first counted once, unless disjoint windows skip window starts.
    tokens = sum(int((~t.isnan()).sum()) for t in nlls)
    once = sum(max(0, len(ids) - 1) for ids in texts)
    skipped = 0 if stride < max_length else sum(len(range(stride, len(t), stride)) for t in texts)
    assert tokens == once - skipped
    result = perplexity(model, None, texts, max_length, stride, batch_size=2)
    assert result.tokens == tokens
    assert_nll_sum(result.nll, runs)


def test_known_logits_count_every_token_once():
    # The final norm's scale set to zero leaves its bias u as every position's hidden
    # state: the logits are lm_head(u) wherever the token sits and whatever precedes it, so
    # a token's NLL is -log_softmax(W u)[token], and the total is that summed once per
    # scored token.
    model = tiny_gpt()
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.normal_(0, 3.0)
        logits = model.lm_head.weight @ model.norm_f.bias
        logits64 = model.lm_head.weight.double() @ model.norm_f.bias.double()
    ids = torch.randint(0, VOCAB, (40,))
    expected = -float(logits64.log_softmax(-1)[ids[1:]].sum())
    result = perplexity(model, None, [ids], max_length=6, stride=4)
    assert result.tokens == 39
    assert_loss_policy(result.nll, expected, logits[None], logits64[None], weight=2 * 39)
    assert result.perplexity == math.exp(result.nll / result.tokens)


def test_strings_through_the_tokenizer(tokenizer):
    model = models.create(
        "gpt2-tiny", vocab_size=tokenizer.vocab_size, num_layers=1, max_position_embeddings=32
    ).eval()
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
    # Both against the float64 naive loop, within 2 x their logits' allowance per token.
    runs = [reference(naive_causal_nlls, model.eval(), t.tolist(), 8, 3) for t in texts]
    assert_nll_sum(one.nll, runs, "one by one")
    assert_nll_sum(many.nll, runs, "16 at a time")


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
def naive_pll(model, ids: list[int], positions: list[int], mask_id: int) -> Naive:
    out, rows = [], []
    for p in positions:
        masked = list(ids)
        masked[p] = mask_id
        rows.append(model(torch.tensor([masked])).logits[0, p])
        out.append(-float(rows[-1].double().log_softmax(-1)[ids[p]]))
    return Naive(out, rows)


def test_pseudo_perplexity_matches_the_naive_loop():
    model = tiny_bert()
    mask_id = VOCAB - 1
    texts = [torch.randint(0, VOCAB - 1, (n,)).tolist() for n in (9, 3, 14)]
    # batch_size 4 puts copies of different lengths (so padding) in one forward.
    result = pseudo_perplexity(model, None, texts, mask_id=mask_id, batch_size=4)
    runs = [reference(naive_pll, model, ids, list(range(len(ids))), mask_id) for ids in texts]
    assert result.tokens == sum(len(r.nlls) for r, _ in runs) == 26
    assert_nll_sum(result.nll, runs)
    assert result.perplexity == math.exp(result.nll / result.tokens)


def test_masked_token_nlls_at_chosen_positions():
    model = tiny_bert()
    ids = torch.randint(0, VOCAB - 1, (11,)).tolist()
    (got,) = masked_token_nlls(model, [ids], VOCAB - 1, positions=[[0, 4, 10]], batch_size=2)
    runs = reference(naive_pll, model, ids, [0, 4, 10], VOCAB - 1)
    for run in runs:  # NaN where unscored
        scored = dict(zip([0, 4, 10], run.nlls, strict=True))
        run.nlls = [scored.get(p, math.nan) for p in range(11)]
    assert_nlls(got, runs)


def test_pseudo_perplexity_with_the_tokenizer_scores_the_text_between_cls_and_sep(tokenizer):
    model = tiny_bert(tokenizer.vocab_size)
    result = pseudo_perplexity(model, tokenizer, TEXTS, batch_size=8)
    runs = []
    for text in TEXTS:
        ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
        inner = list(range(1, len(ids) - 1))
        runs.append(reference(naive_pll, model, ids, inner, tokenizer.mask_id))
    assert result.tokens == sum(len(r.nlls) for r, _ in runs)
    assert_nll_sum(result.nll, runs)


def test_pseudo_perplexity_of_known_logits():
    # Zeroing the head's norm leaves the head bias as the logits at every position.
    model = tiny_bert()
    with torch.no_grad():
        model.head_norm.weight.zero_()
        model.head_norm.bias.zero_()
        model.head_bias.normal_(0, 2.0)
    logits = model.head_bias.detach()
    ids = torch.randint(0, VOCAB - 1, (12,))
    result = pseudo_perplexity(model, None, [ids], mask_id=VOCAB - 1)
    expected = -float(logits.double().log_softmax(-1)[ids].sum())
    # The logits are exact (float32 bias values): only the NLLs' own float32 rounding.
    assert_loss_policy(result.nll, expected, logits[None], logits[None].double(), weight=2 * 12)
    assert result.perplexity == math.exp(result.nll / result.tokens)


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
