"""Activation checkpointing applied from outside: the blocks each model declares are
recomputed in the backward, with the same loss and gradients as without."""

from __future__ import annotations

import copy

import pytest
import torch

from fastlm.models import create
from fastlm.testing import assert_equal
from fastlm.train.activation_checkpointing import Checkpointed, apply_activation_checkpointing

TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"]


def _no_dropout(name):
    return (
        dict(dropout=0.0, attention_dropout=0.0) if name.startswith("bert") else dict(dropout=0.0)
    )


def _inputs(name, batch=2, seqlen=9, vocab=500):
    ids = torch.randint(1, vocab, (batch, seqlen))
    if name.startswith("t5"):
        return dict(input_ids=ids, labels=torch.randint(1, vocab, (batch, 5)))
    return dict(input_ids=ids, labels=ids)


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Block")]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_changes_memory_not_results(name, every):
    model = create(name, vocab_size=500, **_no_dropout(name))
    batch = _inputs(name)
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    apply_activation_checkpointing(model, every)
    assert list(model.state_dict()) == keys
    recomputed = []

    def count(module, args):
        recomputed.append(module)

    handles = [b.register_forward_pre_hook(count) for b in _blocks(model)]
    loss = model(**batch).loss
    forward_calls = len(recomputed)
    loss.backward()
    plain(**batch).loss.backward()
    for h in handles:
        h.remove()
    assert len(recomputed) > forward_calls  # checkpointed blocks ran again in the backward
    # Bit for bit: the recomputed forward is the same computation, and so is the backward.
    why = "checkpointing recomputes the same operations"
    assert_equal(loss, plain(**batch).loss, "loss", why)
    for (name_, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name_
        if p.grad is not None:
            assert_equal(p.grad, q.grad, f"{name_} grad", why)
    with pytest.raises(ValueError, match="every"):
        apply_activation_checkpointing(model, -1)


def test_every_nth_block_of_each_stack_and_reapplying_replaces_the_choice():
    model = create("t5-tiny", vocab_size=500, num_layers=3, num_decoder_layers=2)
    apply_activation_checkpointing(model, 2)
    for stack, chosen in ((model.encoder.blocks, [0, 2]), (model.decoder.blocks, [0])):
        assert [i for i, b in enumerate(stack) if isinstance(b, Checkpointed)] == chosen
    apply_activation_checkpointing(model, 0)
    assert not any(isinstance(b, Checkpointed) for b in _blocks(model))
    assert all(type(b).__name__ == "T5Block" for b in _blocks(model))


def test_a_model_without_declared_blocks_is_refused():
    with pytest.raises(ValueError, match="block_stacks"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2), 1)
