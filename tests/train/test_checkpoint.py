"""Checkpoint files: exact round trip, atomic replacement, keep-last-N, no code execution."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fastlm.models import loading, presets
from fastlm.train import checkpoint as ckpt


def _model():
    return presets.create("gpt2-tiny", vocab_size=61, num_layers=1, hidden_size=32)


def _state():
    return {
        "optimizer": {
            "state": {0: {"exp_avg": torch.randn(3, 4)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}],
        },
        "rng": {"cpu": torch.get_rng_state(), "cuda": []},
    }


def test_roundtrip_is_exact(tmp_path):
    model, state = _model(), _state()
    path = ckpt.save_checkpoint(
        tmp_path,
        5,
        model,
        state,
        {"step": 5, "x": [1, 2]},
        extra=lambda d: (d / "note.txt").write_text("hi"),
    )
    assert path.name == "step-00000005"
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "note.txt",
        "state.pt",
        "trainer.json",
    ]
    other = _model()
    loaded, meta = ckpt.load_checkpoint(path, other)
    assert meta == {"step": 5, "x": [1, 2]}
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert other.lm_head.weight is other.tok_emb.weight  # tying survives
    assert torch.equal(
        loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(loaded["rng"]["cpu"], state["rng"]["cpu"])


def test_load_refuses_a_different_model_in_one_line(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _model(), {}, {})
    other = presets.create("gpt2-tiny", vocab_size=62, num_layers=1, hidden_size=32)
    expected = r"model.safetensors does not fit the model: size mismatch for \S+: .*\[61, 32\]"
    with pytest.raises(ckpt.CheckpointError, match=expected) as error:
        ckpt.load_checkpoint(path, other)
    assert "\n" not in str(error.value)


def test_keep_last_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from step 10 of a run that had reached step 30, the run saves step 11: that
    one is kept (and step 10 with it, keep_last=2), and the checkpoints of the abandoned
    continuation (20, 30) are gone, so that --resume latest returns to this run."""
    model = _model()
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, step, model, {}, {"step": step}, keep_last=3)
    path = ckpt.save_checkpoint(tmp_path, 11, model, {}, {"step": 11}, keep_last=2)
    assert [p.name for p in loading.list_checkpoints(tmp_path)] == ["step-00000010", path.name]
    assert loading.latest_checkpoint(tmp_path) == path == tmp_path / "step-00000011"
    ckpt.save_checkpoint(tmp_path, 12, model, {}, {"step": 12}, keep_last=1)
    assert [p.name for p in loading.list_checkpoints(tmp_path)] == ["step-00000012"]


def test_keep_last_and_latest(tmp_path):
    model = _model()
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(tmp_path, step, model, {}, {"step": step}, keep_last=2)
    assert [p.name for p in loading.list_checkpoints(tmp_path)] == [
        "step-00000003",
        "step-00000010",
    ]
    assert loading.latest_checkpoint(tmp_path).name == "step-00000010"
    assert loading.latest_checkpoint(tmp_path / "none") is None


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    model = _model()
    ckpt.save_checkpoint(tmp_path, 1, model, {}, {"step": 1})

    def boom(directory):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model, {}, {"step": 2}, extra=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    assert ckpt.load_checkpoint(loading.latest_checkpoint(tmp_path), _model())[1] == {"step": 1}


def test_killed_during_save_leaves_the_previous_checkpoint(tmp_path):
    """A process SIGKILLed half-way through writing checkpoint 2 (after its weights, before
    the rest): checkpoint 1 is still the latest and loads; the next save cleans up."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from fastlm.models import presets
        from fastlm.train import checkpoint as ckpt
        model = presets.create("gpt2-tiny", vocab_size=61, num_layers=1, hidden_size=32)
        ckpt.save_checkpoint({str(tmp_path)!r}, 1, model, {{}}, {{"step": 1}})
        real_save = torch.save
        def save_then_die(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, model, {{}}, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (tmp_path / leftovers[0] / "state.pt").is_file()
    latest = loading.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    assert ckpt.load_checkpoint(latest, _model())[1] == {"step": 1}
    ckpt.save_checkpoint(tmp_path, 3, _model(), {}, {"step": 3})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_loading_never_executes_pickled_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = ckpt.save_checkpoint(tmp_path / "ckpts", 1, _model(), {}, {})
    with open(path / "state.pt", "wb") as f:  # a hostile state file
        pickle.dump({"optimizer": _Payload()}, f, protocol=2)
    expected = "state.pt: holds objects other than tensors and plain containers, refused unrun"
    with pytest.raises(ckpt.CheckpointError, match=expected) as error:
        ckpt.load_checkpoint(path, _model())
    assert "weights_only" not in str(error.value)  # torch's advice to run it is not ours
    assert not (tmp_path / "pwned").exists()


def _truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _empty(file):
    file.write_bytes(b"")


DAMAGES = [
    ("model.safetensors", _truncate, "truncated or not a safetensors file"),
    ("model.safetensors", _empty, "truncated or not a safetensors file"),
    ("model.safetensors", Path.unlink, "missing"),
    ("state.pt", _truncate, "truncated or not a torch.save file"),
    ("state.pt", _empty, "empty"),
    ("trainer.json", lambda f: f.write_text("{"), "not valid JSON"),
    ("trainer.json", lambda f: f.write_text("[]"), "expected a JSON object, got list"),
]


@pytest.mark.parametrize("name, damage, problem", DAMAGES)
def test_a_damaged_file_is_named_with_the_checkpoint_to_fall_back_to(
    tmp_path, name, damage, problem
):
    model = _model()
    for step in (1, 2):
        last = ckpt.save_checkpoint(tmp_path, step, model, _state(), {"step": step})
    damage(last / name)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(last, _model())
    message = str(error.value)
    assert message.startswith(f"{last / name}: {problem}"), message
    assert message.endswith(f"; the previous checkpoint is {tmp_path / 'step-00000001'}")
    assert "\n" not in message and "weights_only" not in message
    first = tmp_path / "step-00000001"
    damage(first / name)
    with pytest.raises(ckpt.CheckpointError, match="there is no earlier checkpoint"):
        ckpt.load_checkpoint(first, _model())


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is not a fastlm checkpoint"):
        ckpt.load_checkpoint(tmp_path, _model())
