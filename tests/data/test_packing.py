"""fastlm.data.pack and fastlm.data.ResumableSampler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastlm.data import ResumableSampler, pack

# ---------------------------------------------------------------------------------------------
# pack


def _random_docs(n: int) -> list[list[int]]:
    lengths = torch.randint(0, 30, (n,)).tolist()
    return [torch.randint(0, 50_000, (k,)).tolist() for k in lengths]


def _pack_reference(docs: list[list[int]], seq_len: int, separator: int | None) -> list[list[int]]:
    stream = []
    for doc in docs:
        stream.extend(doc)
        if separator is not None:
            stream.append(separator)
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


@pytest.mark.parametrize("seq_len", [1, 7, 64, 129])
@pytest.mark.parametrize("separator", [0, 50_256, None])
def test_pack_matches_reference(seq_len, separator):
    docs = _random_docs(40)
    rows = pack(docs, seq_len, separator)
    expected = _pack_reference(docs, seq_len, separator)
    assert rows.dtype == torch.int32 and rows.shape == (len(expected), seq_len)
    assert rows.tolist() == expected
    # The tail that does not fill a row is dropped, nothing else.
    total = sum(len(d) for d in docs) + (len(docs) if separator is not None else 0)
    assert rows.numel() == total - total % seq_len


def test_pack_accepts_any_iterable_of_sequences():
    docs = _random_docs(10) + [[]]
    expected = pack(docs, 5, 1)
    inputs = (np.asarray(d, dtype=np.int64) for d in docs)
    assert torch.equal(pack(inputs, 5, 1), expected)
    assert torch.equal(pack([torch.tensor(d, dtype=torch.int64) for d in docs], 5, 1), expected)
    assert torch.equal(pack(tuple(tuple(d) for d in docs), 5, 1), expected)


def test_pack_exact_fit_and_empty_documents():
    assert pack([[1, 2], [], [3]], 3, 9).tolist() == [[1, 2, 9], [9, 3, 9]]
    assert pack([[1, 2, 3, 4]], 2, None).tolist() == [[1, 2], [3, 4]]


def test_pack_errors():
    with pytest.raises(ValueError, match="seq_len"):
        pack([[1, 2]], 0, None)
    with pytest.raises(TypeError, match="seq_len"):
        pack([[1, 2]], 2.0, None)
    with pytest.raises(ValueError, match=r"holds 6 tokens.*seq_len=7.*smaller.*larger"):
        pack([[1, 2], [3, 4]], 7, 0)
    with pytest.raises(ValueError, match="holds 0 tokens"):
        pack([], 1, 0)
    with pytest.raises(ValueError, match="separator"):
        pack([[1, 2]], 1, -1)
    with pytest.raises(ValueError, match="token ids"):
        pack([[1, -2]], 1, None)
    with pytest.raises(ValueError, match="token ids"):
        pack([[1, 2**31]], 1, None)
    with pytest.raises(TypeError, match=r"token_lists\[1\].*integers"):
        pack([[1], [2.5]], 1, None)
    with pytest.raises(ValueError, match=r"token_lists\[0\].*1-D"):
        pack([[[1, 2]]], 1, None)
    with pytest.raises(TypeError, match="token_lists"):
        pack(torch.ones(4, 4, dtype=torch.int64), 2, None)


# ---------------------------------------------------------------------------------------------
# ResumableSampler


def _take_epochs(sampler: ResumableSampler, epochs: int) -> list[list[list[int]]]:
    """The batches of the next ``epochs`` epochs, grouped by the epoch the sampler reports."""
    out: list[list[list[int]]] = []
    first = sampler.epoch
    while sampler.epoch < first + epochs:
        e = sampler.epoch
        batch = sampler.next_batch()
        if e - first == len(out):
            out.append([])
        out[e - first].append(batch)
    return out


@pytest.mark.parametrize("num_items, batch_size", [(12, 4), (10, 3), (7, 7), (100, 1)])
def test_each_epoch_is_a_permutation_with_drop_last(num_items, batch_size):
    sampler = ResumableSampler(num_items, batch_size, seed=3)
    assert sampler.batches_per_epoch == num_items // batch_size
    epochs = _take_epochs(sampler, 4)
    for batches in epochs:
        assert len(batches) == num_items // batch_size
        assert all(len(b) == batch_size for b in batches)
        flat = [i for b in batches for i in b]
        assert all(isinstance(i, int) for i in flat)
        assert len(set(flat)) == len(flat)  # no repeats within an epoch
        assert set(flat) <= set(range(num_items))
    if num_items > 2:
        assert len({tuple(tuple(b) for b in batches) for batches in epochs}) == 4


def test_dropped_items_differ_between_epochs():
    epochs = _take_epochs(ResumableSampler(10, 3, seed=0), 20)
    dropped = [(set(range(10)) - {i for b in batches for i in b}).pop() for batches in epochs]
    assert len(set(dropped)) > 1  # a fixed tail would never be trained on


def test_iteration_and_next_batch_agree():
    a, b = ResumableSampler(50, 8, seed=1), ResumableSampler(50, 8, seed=1)
    it = iter(a)
    assert [next(it) for _ in range(20)] == [b.next_batch() for _ in range(20)]


def test_seeds_and_shuffle():
    first = ResumableSampler(64, 8, seed=0).next_batch()
    assert ResumableSampler(64, 8, seed=0).next_batch() == first
    assert ResumableSampler(64, 8, seed=1).next_batch() != first
    ordered = _take_epochs(ResumableSampler(10, 3, seed=5, shuffle=False), 2)
    assert ordered == [[[0, 1, 2], [3, 4, 5], [6, 7, 8]]] * 2


def test_epoch_and_state_track_the_next_batch():
    sampler = ResumableSampler(10, 3, seed=0)
    assert (sampler.epoch, sampler.state_dict()["position"]) == (0, 0)
    sampler.next_batch()
    sampler.next_batch()
    assert (sampler.epoch, sampler.state_dict()["position"]) == (0, 2)
    sampler.next_batch()  # the last full batch of epoch 0
    assert (sampler.epoch, sampler.state_dict()["position"]) == (1, 0)


@pytest.mark.parametrize("k", [0, 1, 5, 6, 13])
def test_resume_gives_the_same_batches(k):
    original = ResumableSampler(30, 5, seed=7)
    for _ in range(k):
        original.next_batch()
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint stores it
    resumed = ResumableSampler(30, 5, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == original.epoch
    assert _take_epochs(resumed, 3) == _take_epochs(original, 3)
    assert resumed.state_dict() == original.state_dict()


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(num_items=31, batch_size=5, seed=7), "num_items"),
        (dict(num_items=30, batch_size=6, seed=7), "batch_size"),
        (dict(num_items=30, batch_size=5, seed=8), "seed"),
        (dict(num_items=30, batch_size=5, seed=7, shuffle=False), "shuffle"),
    ],
)
def test_load_state_dict_rejects_other_arguments(kwargs, key):
    state = ResumableSampler(30, 5, seed=7).state_dict()
    other = ResumableSampler(**kwargs)
    with pytest.raises(ValueError, match=f"{key}="):
        other.load_state_dict(state)
    assert other.state_dict()["epoch"] == 0  # unchanged


def test_load_state_dict_rejects_bad_state():
    sampler = ResumableSampler(30, 5, seed=7)
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="position"):
        sampler.load_state_dict({**state, "position": 6})
    with pytest.raises(ValueError, match="epoch"):
        sampler.load_state_dict({**state, "epoch": -1})
    with pytest.raises(ValueError, match="'epoch'"):
        sampler.load_state_dict({k: v for k, v in state.items() if k != "epoch"})


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match=r"num_items \(3\).*batch_size \(4\)"):
        ResumableSampler(3, 4, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        ResumableSampler(3, 0, seed=0)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(3, 1, seed=-1)
    with pytest.raises(TypeError, match="num_items"):
        ResumableSampler(3.0, 1, seed=0)
    with pytest.raises(TypeError, match="shuffle"):
        ResumableSampler(3, 1, seed=0, shuffle=1)
