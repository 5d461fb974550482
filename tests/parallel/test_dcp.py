"""DCP checkpoints in one process (no process group): a model and its AdamW state round-trip
exactly, a checkpoint of another model is refused naming the tensors, an adapters-only
checkpoint loads over a base from elsewhere, and a damaged checkpoint is named file by file
before anything is read. The layouts of several processes: tests/distributed."""

from __future__ import annotations

import json

import pytest
import torch

from fastlm.models import create
from fastlm.models.loading import CheckpointError, check_weights
from fastlm.parallel import dcp
from fastlm.parallel.checkpoint import consolidate, load_sharded
from fastlm.peft import apply_lora


def _trained(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = create("gpt2-tiny", vocab_size=64, **overrides)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _checkpoint(tmp_path, model, optimizer=None, **kwargs):
    """A checkpoint directory as a distributed run writes it: DCP files in a subdirectory."""
    dcp.save(tmp_path / "dcp", model, optimizer, **kwargs)
    return tmp_path


def test_model_and_adamw_state_round_trip_exactly(tmp_path):
    model, optimizer = _trained()
    path = _checkpoint(tmp_path, model, optimizer)
    assert dcp.find(path) == path / "dcp" and dcp.find(path / "dcp") == path / "dcp"
    check_weights(path)
    fresh, fresh_opt = _trained(seed=1)
    dcp.load(path / "dcp", fresh, fresh_opt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key, value in optimizer.state[p].items():
            assert torch.equal(value, fresh_opt.state[q][key]), key
    # The tied head is stored once, and the weights alone read back through the loader.
    stored = dcp.stored(path / "dcp")
    assert "model/lm_head.weight" not in stored and "model/tok_emb.weight" in stored
    assert set(consolidate(path)) == {k.removeprefix("model/") for k in stored if "model/" in k}
    again = create("gpt2-tiny", vocab_size=64)
    load_sharded(again, path)
    assert torch.equal(again.lm_head.weight, model.tok_emb.weight)


def test_a_checkpoint_of_another_model_is_refused_naming_tensors(tmp_path):
    model, _ = _trained()
    path = _checkpoint(tmp_path, model)
    wider = create("gpt2-tiny", vocab_size=64, hidden_size=96)
    with pytest.raises(ValueError, match=r"tok_emb.weight is \[64, 128\], the model's \[64, 96\]"):
        dcp.load(path / "dcp", wider)
    deeper = create("gpt2-tiny", vocab_size=64, num_layers=3)
    with pytest.raises(ValueError, match=r"missing \['blocks.2"):
        dcp.load(path / "dcp", deeper)


def test_adapters_alone_load_over_a_base_from_elsewhere(tmp_path):
    torch.manual_seed(0)
    model = apply_lora(create("gpt2-tiny", vocab_size=64), r=2, target_modules=["qkv"])
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    path = _checkpoint(tmp_path, model, trainable_only=True)
    assert all("lora_" in k for k in dcp.stored(path / "dcp"))
    torch.manual_seed(0)  # the same base, fresh adapters
    fresh = apply_lora(create("gpt2-tiny", vocab_size=64), r=2, target_modules=["qkv"])
    with pytest.raises(ValueError, match="missing"):  # strict unless the base comes from elsewhere
        dcp.load(path / "dcp", fresh)
    dcp.load(path / "dcp", fresh, frozen_from_elsewhere=True)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("damage", ["no metadata", "truncated", "missing file", "garbage"])
def test_a_damaged_checkpoint_is_named(tmp_path, damage):
    model, optimizer = _trained()
    path = _checkpoint(tmp_path, model, optimizer)
    (data,) = (path / "dcp").glob("*.distcp")
    if damage == "no metadata":
        (path / "dcp" / ".metadata").unlink()
        expected = r"dcp/\.metadata: missing \(the save did not finish\)"
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:100])
        expected = rf"dcp/{data.name}: truncated \(100 of \d+ bytes\)"
    elif damage == "missing file":
        data.unlink()
        expected = rf"dcp/{data.name}: missing"
    else:
        (path / "dcp" / ".metadata").write_text(json.dumps({"not": "dcp"}))
        expected = r"dcp/\.metadata: unreadable"
    with pytest.raises(CheckpointError, match=expected):
        check_weights(path)
