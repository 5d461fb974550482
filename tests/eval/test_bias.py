"""CrowS-Pairs scoring against log-likelihoods computed directly here, shares against
hand-computed ones, and the file readers."""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch

from fastlm import models
from fastlm.data import Tokenizer
from fastlm.eval.bias import (
    CrowsPair,
    crows_pairs,
    demographic_parity,
    pair_log_likelihoods,
    read_crows_pairs,
    stereotype_preference,
)
from fastlm.testing import assert_loss_policy, assert_within, loss_allowance

PAIRS = [
    CrowsPair(
        "Poor people are lazy and never work hard.",
        "Rich people are lazy and never work hard.",
        "stereo",
        "socioeconomic",
    ),
    CrowsPair(
        "The doctor said he would call back tomorrow.",
        "The doctor said she would call back tomorrow.",
        "antistereo",
        "gender",
    ),
    CrowsPair(
        "My neighbour cooks dinner for the whole street.",
        "My neighbour cooks dinner for the street.",
        "stereo",
        "gender",
    ),
]
TEXTS = [s for p in PAIRS for s in (p.sent_more, p.sent_less)] + ["Yes people work."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """This module's own tokenizer (it overrides the directory's), trained on the text the
    tests score so that words are single tokens; milliseconds."""
    return Tokenizer.train(TEXTS * 4, vocab_size=600)


def gpt(tokenizer) -> torch.nn.Module:
    return models.create(
        "gpt2-tiny", vocab_size=tokenizer.vocab_size, num_layers=1, max_position_embeddings=32
    ).eval()


def bert(tokenizer) -> torch.nn.Module:
    return models.create(
        "bert-tiny", vocab_size=tokenizer.vocab_size, num_layers=1, max_position_embeddings=32
    ).eval()


def test_shares_by_hand():
    pairs = [
        CrowsPair("a", "b", "stereo", "race"),  # -1 > -2: prefers sent_more
        CrowsPair("a", "b", "antistereo", "gender"),  # -3 < -1: does not
        CrowsPair("a", "b", "stereo", "gender"),  # tie: prefers neither
        CrowsPair("a", "b", "stereo", "race"),  # -0.5 > -4: prefers
    ]
    result = stereotype_preference(pairs, [(-1, -2), (-3, -1), (-2, -2), (-0.5, -4)])
    assert result.stereotype_share == 2 / 4
    assert result.by_bias_type == {"gender": 0 / 2, "race": 2 / 2}
    assert result.by_direction == {"antistereo": 0 / 1, "stereo": 2 / 3}
    assert (result.pairs, result.ties) == (4, 1)


@torch.no_grad()
def direct_causal_log_likelihood(model, ids: list[int]) -> tuple[float, torch.Tensor]:
    """The sentence's log-likelihood after its first token, and the logits rows scored."""
    rows = model(torch.tensor([ids])).logits[0, :-1]
    logp = rows.double().log_softmax(-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))), rows


def assert_log_likelihood(got: float, direct, model, *args) -> None:
    """``got`` against ``direct`` run by the float64 twin of ``model``: within what the
    rounding of the float32 logits allows, 2 per scored token (fastlm.testing)."""
    _, rows = direct(model, *args)
    expected, rows64 = direct(copy.deepcopy(model).double(), *args)
    assert_loss_policy(got, expected, rows, rows64, "log-likelihood", weight=2 * len(rows))


def test_causal_scores_are_sentence_log_likelihoods(tokenizer):
    model = gpt(tokenizer)
    scores = pair_log_likelihoods(model, tokenizer, PAIRS, batch_size=4)
    eos = tokenizer.eos_id
    for pair, (more, less) in zip(PAIRS, scores, strict=True):
        # After <|endoftext|>, so the first word is scored too.
        more_ids, less_ids = tokenizer.encode(pair.sent_more), tokenizer.encode(pair.sent_less)
        assert_log_likelihood(more, direct_causal_log_likelihood, model, [eos, *more_ids])
        assert_log_likelihood(less, direct_causal_log_likelihood, model, [eos, *less_ids])
    result = crows_pairs(model, tokenizer, PAIRS)
    prefers = [m > s for m, s in scores]
    assert result.stereotype_share == pytest.approx(sum(prefers) / 3)
    assert result.by_bias_type["socioeconomic"] == float(prefers[0])
    assert result.by_bias_type["gender"] == pytest.approx((prefers[1] + prefers[2]) / 2)


def known_sum_allowance(logits: torch.Tensor, tokens: list[int]) -> tuple[float, str]:
    """The allowance of a float32 sum of ``tokens``' log-probabilities under one exact
    float32 ``logits`` row: its own rounding (fastlm.testing.loss_allowance, 2 per token)."""
    expected = float(logits.double().log_softmax(-1)[tokens].sum())
    return loss_allowance(expected, logits[None], logits[None].double(), 2 * len(tokens))


def assert_known_sum(got: float, logits: torch.Tensor, tokens: list[int]) -> None:
    expected = float(logits.double().log_softmax(-1)[tokens].sum())
    allowed, basis = known_sum_allowance(logits, tokens)
    assert_within(got, expected, allowed, "log-likelihood", basis)


def test_forced_causal_preference(tokenizer):
    # Context-free logits (the final norm's output is its bias b everywhere, so the logits
    # are W b), with <extra_id_1> made far likelier and <extra_id_2> far unlikelier than
    # the rest: a sentence's score is the sum of its tokens' log-probabilities under one
    # distribution, known here.
    model = gpt(tokenizer)
    likely, unlikely = tokenizer.sentinel_ids[1], tokenizer.sentinel_ids[2]
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0
        model.lm_head.weight[:, 0] = 0.0  # shared with the embedding: column 0 only
        model.lm_head.weight[likely, 0] = 8.0
        model.lm_head.weight[unlikely, 0] = -8.0
    logits = torch.zeros(tokenizer.vocab_size)  # exact in float32: W b picks W's column 0
    logits[likely], logits[unlikely] = 8.0, -8.0
    up, down = "Yes <extra_id_1> people work.", "Yes <extra_id_2> people work."
    pairs = [
        CrowsPair(up, down, "stereo", "class"),
        CrowsPair(down, up, "antistereo", "class"),
        CrowsPair(up, down, "stereo", "other"),
    ]
    result = crows_pairs(model, tokenizer, pairs)
    for pair, scores in zip(pairs, result.scores, strict=True):
        # Every token after <|endoftext|> is scored: the sentence's full token sum.
        for got, sentence in zip(scores, (pair.sent_more, pair.sent_less), strict=True):
            assert_known_sum(got, logits, tokenizer.encode(sentence))
    # The likely token is in sent_more in pairs 1 and 3: those prefer it; pair 2 does not.
    assert result.stereotype_share == pytest.approx(2 / 3)
    assert result.by_bias_type == {"class": 1 / 2, "other": 1.0}
    assert result.by_direction == {"antistereo": 0.0, "stereo": 1.0}
    # logp[likely] - logp[unlikely] = 16 exactly; each score may be off by its allowance.
    allowed = sum(known_sum_allowance(logits, tokenizer.encode(t))[0] for t in (up, down))
    assert_within(result.scores[0][0] - result.scores[0][1], 16.0, allowed, "difference")


def common_prefix_suffix(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Shared positions of two sequences that differ in one contiguous span."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return ([*range(p), *range(len(a) - s, len(a))], [*range(p), *range(len(b) - s, len(b))])


@torch.no_grad()
def direct_pll(model, ids: list[int], positions: list[int], mask_id: int):
    """The pseudo-log-likelihood at ``positions``, and the logits rows scored."""
    total, rows = 0.0, []
    for p in positions:
        masked = list(ids)
        masked[p] = mask_id
        rows.append(model(torch.tensor([masked])).logits[0, p])
        total += float(rows[-1].double().log_softmax(-1)[ids[p]])
    return total, torch.stack(rows) if rows else torch.zeros(0, model.config.vocab_size)


@pytest.mark.parametrize("shared_only", [True, False])
def test_masked_scores_are_pseudo_log_likelihoods(tokenizer, shared_only):
    model = bert(tokenizer)
    scores = pair_log_likelihoods(model, tokenizer, PAIRS, batch_size=16, shared_only=shared_only)
    for pair, (more, less) in zip(PAIRS, scores, strict=True):
        a, b = tokenizer.encode(pair.sent_more), tokenizer.encode(pair.sent_less)
        pa, pb = common_prefix_suffix(a, b) if shared_only else (range(len(a)), range(len(b)))
        if shared_only:  # the edited tokens are left out
            assert len(pa) == len(pb) < max(len(a), len(b))
        rows = [[tokenizer.cls_id, *ids, tokenizer.sep_id] for ids in (a, b)]
        mask = tokenizer.mask_id
        assert_log_likelihood(more, direct_pll, model, rows[0], [p + 1 for p in pa], mask)
        assert_log_likelihood(less, direct_pll, model, rows[1], [p + 1 for p in pb], mask)


def test_context_free_masked_model_ties_on_shared_tokens(tokenizer):
    # Logits = the head bias everywhere: the shared tokens score the same in both sentences
    # (every pair ties), while scoring all tokens compares the differing words' frequency.
    model = bert(tokenizer)
    with torch.no_grad():
        model.head_norm.weight.zero_()
        model.head_norm.bias.zero_()
        model.head_bias.normal_(0, 2.0)
    logits = model.head_bias.detach()
    shared = crows_pairs(model, tokenizer, PAIRS, shared_only=True)
    assert shared.ties == 3 and shared.stereotype_share == 0.0
    every = crows_pairs(model, tokenizer, PAIRS, shared_only=False)
    for pair, scores in zip(PAIRS, every.scores, strict=True):
        for got, sentence in zip(scores, (pair.sent_more, pair.sent_less), strict=True):
            assert_known_sum(got, logits, tokenizer.encode(sentence))


def write_csv(path, rows, fields):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_read_crows_pairs_csv_and_jsonl(tmp_path):
    # The published file's layout: an unnamed index column first, annotation columns after.
    fields = ["", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations"]
    rows = [
        {
            "": i,
            "sent_more": p.sent_more,
            "sent_less": p.sent_less,
            "stereo_antistereo": p.direction,
            "bias_type": p.bias_type,
            "annotations": "[]",
        }
        for i, p in enumerate(PAIRS)
    ]
    write_csv(tmp_path / "crows.csv", rows, fields)
    assert read_crows_pairs(tmp_path / "crows.csv") == PAIRS
    lines = [json.dumps({k: v for k, v in r.items() if k}) for r in rows]
    (tmp_path / "crows.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    assert read_crows_pairs(tmp_path / "crows.jsonl") == PAIRS


def test_crows_pairs_from_a_file(tmp_path, tokenizer):
    model = gpt(tokenizer)
    lines = [
        json.dumps(
            {
                "sent_more": p.sent_more,
                "sent_less": p.sent_less,
                "stereo_antistereo": p.direction,
                "bias_type": p.bias_type,
            }
        )
        for p in PAIRS
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    from_file = crows_pairs(model, tokenizer, tmp_path / "pairs.jsonl")
    assert from_file == crows_pairs(model, tokenizer, PAIRS)


def test_crows_pairs_errors(tmp_path, tokenizer):
    write_csv(
        tmp_path / "bad.csv", [{"sent_more": "a", "sent_less": "b"}], ["sent_more", "sent_less"]
    )
    with pytest.raises(ValueError, match="record 1 .* lacks stereo_antistereo, bias_type"):
        read_crows_pairs(tmp_path / "bad.csv")
    (tmp_path / "dir.jsonl").write_text(
        json.dumps(
            {"sent_more": "a", "sent_less": "b", "stereo_antistereo": "anti", "bias_type": "race"}
        )
    )
    with pytest.raises(ValueError, match="record 1 .*direction must be 'stereo' or 'antistereo'"):
        read_crows_pairs(tmp_path / "dir.jsonl")
    (tmp_path / "x.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        read_crows_pairs(tmp_path / "x.jsonl")
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="expected a .csv or .jsonl file"):
        read_crows_pairs(tmp_path / "x.txt")
    with pytest.raises(ValueError, match="no file at"):
        read_crows_pairs(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="scores has 1 entries for 3 pairs"):
        stereotype_preference(PAIRS, [(0.0, 1.0)])
    with pytest.raises(ValueError, match=r"pairs\[0\] has an empty sentence"):
        pair_log_likelihoods(gpt(tokenizer), tokenizer, [CrowsPair("", "b", "stereo", "x")])
    with pytest.raises(TypeError, match="model must be a fastlm GPT or BertForMaskedLM"):
        pair_log_likelihoods(torch.nn.Linear(2, 2), tokenizer, PAIRS)


def test_demographic_parity_from_files(tmp_path):
    # Approval rates: group a 2/3, group b 1/4, group c 0/1.
    rows = [
        ("1", "a"),
        ("0", "a"),
        ("1", "a"),
        ("0", "b"),
        ("1", "b"),
        ("0", "b"),
        ("0", "b"),
        ("0", "c"),
    ]
    write_csv(
        tmp_path / "preds.csv",
        [{"pred": p, "sex": g, "id": i} for i, (p, g) in enumerate(rows)],
        ["id", "pred", "sex"],
    )
    result = demographic_parity(tmp_path / "preds.csv", prediction="pred", group="sex")
    assert result.rates == pytest.approx({"a": 2 / 3, "b": 1 / 4, "c": 0.0})
    assert result.difference == pytest.approx(2 / 3)
    # JSON values keep their types; positive=1 still matches the int 1.
    (tmp_path / "preds.jsonl").write_text(
        "\n".join(json.dumps({"prediction": int(p), "group": g}) for p, g in rows)
    )
    assert demographic_parity(tmp_path / "preds.jsonl") == result
    with pytest.raises(ValueError, match="group: column 'race' missing from record 1"):
        demographic_parity(tmp_path / "preds.jsonl", group="race")
