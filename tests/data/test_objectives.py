"""fastlm.data objectives: causal LM, BERT masked LM, T5 span corruption, collate."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.data import (
    CausalLMDataset,
    MaskedLMDataset,
    ResumableSampler,
    SpanCorruptionDataset,
    collate,
    pack,
    span_corruption_lengths,
)


def _rows(tokenizer, n: int, length: int) -> torch.Tensor:
    """(n, length) int32 rows of non-special tokens with some separators and pads mixed in."""
    first = len(tokenizer.special_ids)
    rows = torch.randint(first, tokenizer.vocab_size, (n, length), dtype=torch.int32)
    rows[torch.rand(n, length) < 0.03] = tokenizer.eos_id
    rows[torch.rand(n, length) < 0.01] = tokenizer.pad_id
    return rows


def _within(observed: int, total: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(observed - total * p) <= sigmas * math.sqrt(total * p * (1 - p))


# ---------------------------------------------------------------------------------------------
# Causal LM


def test_causal_lm_is_the_row_twice(tokenizer):
    rows = _rows(tokenizer, 5, 9)
    ds = CausalLMDataset(rows)
    assert len(ds) == 5
    for i in range(5):
        ex = ds[i]
        assert ex.keys() == {"input_ids", "labels"}
        assert ex["input_ids"].dtype == torch.int64 and ex["labels"].dtype == torch.int64
        assert ex["input_ids"].tolist() == rows[i].tolist() == ex["labels"].tolist()
    assert torch.equal(ds[-1]["input_ids"], ds[4]["input_ids"])
    ex = CausalLMDataset(rows.long())[0]
    ex["input_ids"][0] = -5  # a caller editing a batch in place must not edit the dataset
    assert rows[0, 0] != -5 and ex["labels"][0] != -5
    with pytest.raises(IndexError):
        ds[5]


# ---------------------------------------------------------------------------------------------
# Masked LM


def test_masked_lm_structure_and_statistics(tokenizer):
    assert MaskedLMDataset.extra_tokens == 2
    rows = _rows(tokenizer, 1200, 126)
    ds = MaskedLMDataset(rows, tokenizer, mask_prob=0.15, seed=11)
    batch = collate([ds[i] for i in range(len(ds))])
    inputs, labels = batch["input_ids"], batch["labels"]
    assert inputs.shape == labels.shape == (1200, 128) and inputs.dtype == torch.int64
    original = torch.cat(
        [
            torch.full((1200, 1), tokenizer.cls_id),
            rows.long(),
            torch.full((1200, 1), tokenizer.sep_id),
        ],
        dim=1,
    )
    special = torch.tensor(sorted(tokenizer.special_ids))
    is_special = torch.isin(original, special)
    selected = labels != -100

    assert (inputs[:, 0] == tokenizer.cls_id).all() and (inputs[:, -1] == tokenizer.sep_id).all()
    assert not (selected & is_special).any()  # cls, sep, eos and pad are never targets
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(inputs[~selected], original[~selected])
    assert (selected.sum(1) >= 1).all()

    maskable = int((~is_special).sum())
    num_selected = int(selected.sum())
    assert num_selected > 20_000
    assert _within(num_selected, maskable, 0.15)
    chosen, before = inputs[selected], original[selected]
    replaced = (chosen != before) & (chosen != tokenizer.mask_id)
    vocab = tokenizer.vocab_size - len(special)  # a random draw can equal the original
    assert _within(int((chosen == tokenizer.mask_id).sum()), num_selected, 0.8)
    assert _within(int(replaced.sum()), num_selected, 0.1 * (1 - 1 / vocab))
    assert _within(int((chosen == before).sum()), num_selected, 0.1 + 0.1 / vocab)
    # Replacements: uniform over the non-special ids [105, 600).
    drawn = chosen[replaced].double()
    assert drawn.min() >= len(special) and drawn.max() < tokenizer.vocab_size
    mean, std = (len(special) + tokenizer.vocab_size - 1) / 2, vocab / math.sqrt(12)
    assert abs(drawn.mean() - mean) < 4 * std / math.sqrt(drawn.numel())


def test_masked_lm_always_has_a_target(tokenizer):
    rows = _rows(tokenizer, 200, 30)
    ds = MaskedLMDataset(rows, tokenizer, mask_prob=1e-9)
    for i in range(len(ds)):
        ex = ds[i]
        (pos,) = (ex["labels"] != -100).nonzero(as_tuple=True)
        assert pos.numel() == 1
        assert int(ex["labels"][pos]) not in tokenizer.special_ids
        assert int(ex["labels"][pos]) == int(rows[i, pos - 1])
    only_special = torch.full((1, 4), tokenizer.eos_id, dtype=torch.int32)
    assert (MaskedLMDataset(only_special, tokenizer)[0]["labels"] == -100).all()
    # mask_prob = 1 selects every non-special position.
    labels = MaskedLMDataset(rows, tokenizer, mask_prob=1.0)[0]["labels"]
    original = [tokenizer.cls_id, *rows[0].tolist(), tokenizer.sep_id]
    assert (labels != -100).tolist() == [t not in tokenizer.special_ids for t in original]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["mlm", "span"])
def test_examples_are_a_function_of_seed_epoch_index(tokenizer, kind):
    rows = _rows(tokenizer, 40, 62)

    def make(seed):
        if kind == "mlm":
            return MaskedLMDataset(rows, tokenizer, seed=seed)
        return SpanCorruptionDataset(rows, tokenizer, seed=seed)

    ds = make(seed=3)
    first = [ds[i] for i in range(40)]
    torch.manual_seed(1234)  # the global RNG plays no part
    other = make(seed=3)
    assert all(_same(other[i], first[i]) for i in reversed(range(40)))  # nor access order
    assert _same(ds[-1], first[39])
    ds.set_epoch(1)
    epoch1 = [ds[i] for i in range(40)]
    assert sum(_same(a, b) for a, b in zip(first, epoch1, strict=True)) <= 2
    ds.set_epoch(0)
    assert all(_same(ds[i], first[i]) for i in range(40))
    reseeded = make(seed=4)
    assert sum(_same(reseeded[i], first[i]) for i in range(40)) <= 2
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)
    with pytest.raises(TypeError, match="epoch"):
        ds.set_epoch(1.0)


def test_masked_lm_errors(tokenizer, foreign_tokenizer):
    rows = _rows(tokenizer, 4, 10)
    with pytest.raises(ValueError, match=r"no <mask> token \(needed for masked-LM\)"):
        MaskedLMDataset(rows % 300, foreign_tokenizer(["<|endoftext|>"]))
    with pytest.raises(ValueError, match="<cls>"):
        MaskedLMDataset(rows % 300, foreign_tokenizer(["<|endoftext|>", "<mask>"]))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask_prob"):
            MaskedLMDataset(rows, tokenizer, mask_prob=bad)
    with pytest.raises(ValueError, match="2-D"):
        MaskedLMDataset(rows[0], tokenizer)
    with pytest.raises(TypeError, match="integers"):
        MaskedLMDataset(rows.float(), tokenizer)
    with pytest.raises(TypeError, match="torch.Tensor"):
        MaskedLMDataset(rows.tolist(), tokenizer)
    with pytest.raises(ValueError, match="600"):
        MaskedLMDataset(rows + 600, tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        MaskedLMDataset(rows, "gpt2")
    with pytest.raises(ValueError, match="seed"):
        MaskedLMDataset(rows, tokenizer, seed=-1)


# ---------------------------------------------------------------------------------------------
# Span corruption


def _expected_counts(length: int, density: float, mean_span: float) -> tuple[int, int]:
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), noise, length - noise)
    return noise, spans


def _parse(inputs: list[int], labels: list[int], sentinels: list[int], eos: int):
    """Undo span corruption: (the original row, noise spans, kept segments)."""
    assert inputs[-1] == eos and labels[-1] == eos
    number = {s: k for k, s in enumerate(sentinels)}
    spans: list[list[int]] = []
    for t in labels[:-1]:
        if t in number:
            assert number[t] == len(spans), "targets' sentinels out of order"
            spans.append([])
        else:
            spans[-1].append(t)  # IndexError: the targets do not start with a sentinel
    row: list[int] = []
    kept: list[list[int]] = [[]]
    for t in inputs[:-1]:
        if t in number:
            assert number[t] == len(kept) - 1, "inputs' sentinels out of order"
            row.extend(spans[number[t]])
            kept.append([])
        else:
            row.append(t)
            kept[-1].append(t)
    assert kept.pop() == [], "the row must end with a noise span"
    assert len(kept) == len(spans)
    return row, spans, kept


@pytest.mark.parametrize(
    "length, density, mean_span",
    [
        (2, 0.15, 3.0),
        (3, 0.5, 3.0),
        (7, 0.15, 3.0),
        (64, 0.15, 3.0),
        (100, 0.15, 3.0),
        (513, 0.15, 3.0),
        (100, 0.5, 1.0),
        (200, 0.3, 10.0),
        (50, 0.9, 2.0),
    ],
)
def test_span_corruption_round_trip(tokenizer, length, density, mean_span):
    rows = _rows(tokenizer, 30, length)
    ds = SpanCorruptionDataset(rows, tokenizer, density, mean_span, seed=2)
    noise, num_spans = _expected_counts(length, density, mean_span)
    shapes = span_corruption_lengths(length, density, mean_span)
    assert shapes == (length - noise + num_spans + 1, noise + num_spans + 1)
    sentinels = tokenizer.sentinel_ids
    for i in range(len(ds)):
        ex = ds[i]
        assert ex["input_ids"].dtype == ex["labels"].dtype == torch.int64
        assert (ex["input_ids"].numel(), ex["labels"].numel()) == shapes
        row, spans, kept = _parse(
            ex["input_ids"].tolist(), ex["labels"].tolist(), sentinels, tokenizer.eos_id
        )
        assert row == rows[i].tolist()
        assert len(spans) == num_spans and sum(map(len, spans)) == noise
        assert all(spans) and all(kept)


def test_span_lengths_follow_a_uniform_random_partition(tokenizer):
    # L = 100: 15 noise tokens in 5 spans, 85 kept tokens in 5 segments. Under a uniform
    # composition of n into k parts, P(first part = j) = C(n-j-1, k-2) / C(n-1, k-1).
    samples = 4000
    ds = SpanCorruptionDataset(_rows(tokenizer, samples, 100), tokenizer, seed=5)
    eos, sentinels = tokenizer.eos_id, tokenizer.sentinel_ids
    first_span = torch.zeros(16, dtype=torch.int64)
    all_spans, first_kept = [], []
    for i in range(samples):
        ex = ds[i]
        _, spans, kept = _parse(ex["input_ids"].tolist(), ex["labels"].tolist(), sentinels, eos)
        first_span[len(spans[0])] += 1
        all_spans += map(len, spans)
        first_kept.append(len(kept[0]))
    assert sum(all_spans) / len(all_spans) == pytest.approx(3.0)
    n, k = 15, 5
    for j in range(1, n - k + 2):
        p = math.comb(n - j - 1, k - 2) / math.comb(n - 1, k - 1)
        assert _within(int(first_span[j]), samples, p), j
    # Kept segments: mean (L - n) / k = 17; variance of a composition part, 4 sigma.
    m, kk = 85, 5
    var = (m - kk) * (kk - 1) * m / (kk * kk * (kk + 1))
    mean_kept = sum(first_kept) / samples
    assert abs(mean_kept - m / kk) < 4 * math.sqrt(var / samples)


def test_span_corruption_lengths():
    # T5's published setting: 568 raw tokens -> 512 inputs and 114 targets.
    assert span_corruption_lengths(568, 0.15, 3.0) == (512, 114)
    for length in range(2, 300):
        noise, spans = _expected_counts(length, 0.15, 3.0)
        assert span_corruption_lengths(length) == (length - noise + spans + 1, noise + spans + 1)
    with pytest.raises(ValueError, match="length"):
        span_corruption_lengths(1)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="noise_density"):
            span_corruption_lengths(10, bad)
    with pytest.raises(ValueError, match="mean_span_length"):
        span_corruption_lengths(10, 0.15, 0.0)


def test_span_corruption_errors(tokenizer, foreign_tokenizer):
    with pytest.raises(ValueError, match="0 sentinel tokens"):
        SpanCorruptionDataset(_rows(tokenizer, 2, 20) % 300, foreign_tokenizer(["<|endoftext|>"]))
    no_eos = foreign_tokenizer([f"<extra_id_{k}>" for k in range(10)])
    with pytest.raises(ValueError, match=r"no <\|endoftext\|> token \(needed for span corr"):
        SpanCorruptionDataset(torch.randint(10, 300, (2, 20)), no_eos)
    # 4000 tokens at density 0.15 make 200 spans; the tokenizer has 100 sentinels.
    with pytest.raises(ValueError, match="has 100 sentinel tokens.*need 200"):
        SpanCorruptionDataset(_rows(tokenizer, 1, 4000), tokenizer)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        SpanCorruptionDataset(_rows(tokenizer, 2, 1), tokenizer)


# ---------------------------------------------------------------------------------------------
# collate and the whole pipeline


def test_collate():
    examples = [{"a": torch.arange(3) + i, "b": torch.zeros(2, 2)} for i in range(4)]
    batch = collate(examples)
    assert batch["a"].tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert batch["b"].shape == (4, 2, 2)
    with pytest.raises(ValueError, match=r"key 'a'.*examples\[1\] has shape \(4,\)"):
        collate([{"a": torch.zeros(3)}, {"a": torch.zeros(4)}])
    with pytest.raises(ValueError, match="keys"):
        collate([{"a": torch.zeros(3)}, {"b": torch.zeros(3)}])
    with pytest.raises(ValueError, match="empty"):
        collate([])


def test_pipeline_resumes_bit_for_bit(tokenizer, corpus):
    rows = pack(tokenizer.encode_batch(corpus[300:340]), 30, tokenizer.eos_id)
    ds = MaskedLMDataset(rows, tokenizer, seed=1)
    sampler = ResumableSampler(len(ds), 8, seed=1)

    def step(ds, sampler):
        ds.set_epoch(sampler.epoch)
        return collate([ds[i] for i in sampler.next_batch()])

    for _ in range(sampler.batches_per_epoch - 1):
        step(ds, sampler)
    state = sampler.state_dict()
    expected = [step(ds, sampler) for _ in range(3)]  # crosses into epoch 1
    ds2 = MaskedLMDataset(rows, tokenizer, seed=1)
    sampler2 = ResumableSampler(len(ds), 8, seed=1)
    sampler2.load_state_dict(state)
    got = [step(ds2, sampler2) for _ in range(3)]
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True))
    assert expected[0]["input_ids"].shape == (8, 32)
