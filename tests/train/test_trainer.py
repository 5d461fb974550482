"""The training loop: exact resume, precision modes, non-finite handling, logging."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from fastlm.data import (
    CausalLMDataset,
    MaskedLMDataset,
    SpanCorruptionDataset,
    Tokenizer,
    default_corpus,
    pack,
)
from fastlm.models import presets
from fastlm.train import TrainConfig, Trainer, TrainingDiverged, latest_checkpoint

SEQ = 24


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(default_corpus()[:300], vocab_size=420)


@pytest.fixture(scope="module")
def rows(tokenizer):
    return pack(tokenizer.encode_batch(default_corpus()[:200]), SEQ, tokenizer.eos_id)


def setup(family, tokenizer, rows, dropout=0.1):
    """A tiny model of ``family`` and its objective's dataset."""
    v = tokenizer.vocab_size
    if family == "gpt":
        model = presets.create("gpt2-tiny", vocab_size=v, hidden_size=32, num_layers=2,
                               num_heads=2, dropout=dropout)  # fmt: skip
        data = CausalLMDataset(rows)
    elif family == "bert":
        model = presets.create("bert-tiny", vocab_size=v, hidden_size=32, num_layers=2,
                               num_heads=2, intermediate_size=64,
                               pad_token_id=tokenizer.pad_id)  # fmt: skip
        data = MaskedLMDataset(rows[:, : SEQ - MaskedLMDataset.extra_tokens], tokenizer, seed=3)
    else:
        model = presets.create("t5-tiny", vocab_size=v, hidden_size=32, head_dim=8,
                               num_heads=2, intermediate_size=64, num_layers=1,
                               pad_token_id=tokenizer.pad_id,
                               decoder_start_token_id=tokenizer.pad_id,
                               eos_token_id=tokenizer.eos_id)  # fmt: skip
        data = SpanCorruptionDataset(rows, tokenizer, seed=3)
    return model, data


def config(tmp_path, name="run", **kw):
    defaults = dict(batch_size=4, grad_accum=2, max_steps=8, warmup_steps=2, save_every=3,
                    eval_every=4, eval_batches=2, log_every=1, keep_last=5, progress=False,
                    out_dir=str(tmp_path / name), lr=3e-3)  # fmt: skip
    return TrainConfig(**{**defaults, **kw})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_resume_is_bit_exact(family, precision, tokenizer, rows, tmp_path):
    """Stop after step 3, resume from its checkpoint in a fresh trainer (fresh weights, a
    different global RNG): steps 4..8 give the same losses and final weights, bit for bit,
    as the uninterrupted run (dropout, masking and data order included)."""
    model, data = setup(family, tokenizer, rows)
    full = Trainer(model, config(tmp_path, precision=precision), data, data)
    full.fit()
    checkpoint = full.out_dir / "checkpoints" / "step-00000003"
    assert checkpoint.is_dir()

    torch.manual_seed(12345)
    model2, data2 = setup(family, tokenizer, rows)
    resumed = Trainer(model2, config(tmp_path, "resumed", precision=precision,
                                     resume=str(checkpoint)), data2, data2)  # fmt: skip
    assert resumed.step == 3
    resumed.fit()
    assert resumed.losses == {s: full.losses[s] for s in range(4, 9)}
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert all(math.isfinite(x) for x in full.losses.values())


def test_loss_falls_and_metrics_are_logged(tokenizer, rows, tmp_path):
    model, data = setup("gpt", tokenizer, rows)
    cfg = config(tmp_path, max_steps=40, grad_accum=1, eval_every=20, save_every=20, lr=1e-2)
    result = Trainer(model, cfg, data, data).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 41))
    assert [r["step"] for r in val] == [20, 40]
    assert set(train[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb"}
    assert "mfu" not in train[0]  # CPU: no peak to measure against
    assert train[0]["tokens_per_s"] > 0 and train[0]["peak_memory_mb"] > 0
    assert train[0]["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert sum(r["loss"] for r in train[-5:]) / 5 < train[0]["loss"] - 1.0
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    assert result["val_loss"] == val[-1]["val_loss"]
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # optional: the run still completes
        assert "plot" not in result and not (tmp_path / "run" / "loss.png").exists()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000040"


def test_validation_loss_weights_batches_by_predicted_tokens(tokenizer, rows, tmp_path):
    """Masked-LM batches predict different numbers of tokens: the validation loss is the
    mean over tokens, not over batches."""
    model, data = setup("bert", tokenizer, rows)
    trainer = Trainer(model, config(tmp_path, eval_batches=3), data, data)
    got = trainer.evaluate()["val_loss"]
    model.eval()
    total = count = 0
    data.set_epoch(0)
    for start in range(0, 12, 4):
        for i in range(start, start + 4):
            ex = data[i]
            with torch.no_grad():
                out = model(ex["input_ids"][None], labels=ex["labels"][None])
            n = int((ex["labels"] != -100).sum())
            total, count = total + out.loss.double() * n, count + n
    assert got == pytest.approx(float(total / count), rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(precision, tokenizer, rows,
                                                             tmp_path):  # fmt: skip
    model, data = setup("gpt", tokenizer, rows)
    trainer = Trainer(model, config(tmp_path, precision=precision, save_every=2), data)
    real_forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # first micro-batch of step 5
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(
        TrainingDiverged,
        match=r"step 5: non-finite loss.*the last good "
        r"checkpoint is .*step-00000004",
    ):
        trainer.fit()
    assert trainer.step == 4
    latest = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step-00000004"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, _ = setup("gpt", tokenizer, rows)
    Trainer(fresh, config(tmp_path, "again", resume=str(latest), precision=precision), data)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, weights[k]), k  # the failed step changed nothing


def test_fp16_skips_overflowing_steps(tokenizer, rows, tmp_path):
    model, data = setup("gpt", tokenizer, rows)
    trainer = Trainer(model, config(tmp_path, precision="fp16", max_steps=3), data)
    real_forward = model.forward
    calls = {"n": 0}

    def overflow(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # step 2
            out.loss = out.loss * float("inf")
        return out

    model.forward = overflow
    trainer.train_step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = trainer.precision.scaler.get_scale()
    loss, _, _, skipped = trainer.train_step()
    assert skipped and math.isinf(loss)
    assert trainer.precision.scaler.get_scale() == scale / 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not trainer.train_step()[3]


def test_activation_checkpointing_changes_memory_not_results(tokenizer, rows, tmp_path):
    results = []
    for every in (0, 1):
        torch.manual_seed(0)
        model, data = setup("gpt", tokenizer, rows, dropout=0.0)
        trainer = Trainer(model, config(tmp_path, f"c{every}", checkpointing=every,
                                        max_steps=3), data)  # fmt: skip
        assert model.checkpoint_every == every
        trainer.fit()
        results.append(trainer.losses)
    assert results[0] == pytest.approx(results[1], rel=1e-6)


def test_gradient_accumulation_matches_a_larger_batch(tokenizer, rows, tmp_path):
    losses, weights = [], []
    for batch, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model, _ = setup("gpt", tokenizer, rows, dropout=0.0)
        data = CausalLMDataset(rows[:8])  # one step sees all 8 rows either way
        trainer = Trainer(model, config(tmp_path, f"b{batch}", batch_size=batch,
                                        grad_accum=accum, max_steps=1), data)  # fmt: skip
        trainer.fit()
        losses.append(trainer.losses[1])
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_bad_arguments(tokenizer, rows, tmp_path):
    model, data = setup("gpt", tokenizer, rows)
    with pytest.raises(ValueError, match="model parameters must be float32"):
        Trainer(model.to(torch.bfloat16), config(tmp_path), data)
    model, data = setup("gpt", tokenizer, rows)
    with pytest.raises(ValueError, match="fewer than batch_size 4"):
        Trainer(model, config(tmp_path), CausalLMDataset(rows[:3]))
    with pytest.raises(ValueError, match="holds no checkpoint"):
        Trainer(model, config(tmp_path, resume="latest"), data)
    with pytest.raises(ValueError, match="needs eval_data"):
        Trainer(model, config(tmp_path), data).evaluate()
    with pytest.raises(ValueError, match="no CUDA device") if not torch.cuda.is_available() \
            else pytest.raises(AssertionError):  # fmt: skip
        Trainer(model, config(tmp_path, device="cuda"), data)
    full = Trainer(model, config(tmp_path, max_steps=3), data)
    full.fit()
    with pytest.raises(ValueError, match="was trained in fp32; resuming in bf16"):
        Trainer(model, config(tmp_path, "x", precision="bf16", resume=str(full.last_checkpoint)),
                data)  # fmt: skip


def test_tensorboard_receives_the_metrics_when_installed(tokenizer, rows, tmp_path, monkeypatch):
    events = []

    class SummaryWriter:  # stands in for tensorboard's, which this machine may lack
        def __init__(self, log_dir):
            events.append(("log_dir", log_dir))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def close(self):
            events.append(("closed",))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    model, data = setup("gpt", tokenizer, rows)
    trainer = Trainer(model, config(tmp_path, max_steps=2, eval_every=2), data, data)
    trainer.fit()
    assert events[0] == ("log_dir", str(tmp_path / "run" / "tensorboard"))
    assert ("loss", trainer.losses[1], 1) in events and ("loss", trainer.losses[2], 2) in events
    assert {e[0] for e in events} >= {"lr", "grad_norm", "tokens_per_s", "val_loss", "val_ppl"}
    assert events[-1] == ("closed",)
