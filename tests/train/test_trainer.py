"""The training loop: exact resume, precision modes, non-finite handling, logging."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import shutil
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
from fastlm.testing import assert_loss_policy, assert_policy_norm
from fastlm.train import TrainConfig, Trainer, TrainingDiverged, latest_checkpoint
from fastlm.train.activation_checkpointing import Checkpointed
from fastlm.train.optim import build_optimizer, build_scheduler

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
        model = presets.create(
            "gpt2-tiny", vocab_size=v, hidden_size=32, num_layers=2, num_heads=2, dropout=dropout
        )
        data = CausalLMDataset(rows)
    elif family == "bert":
        model = presets.create(
            "bert-tiny",
            vocab_size=v,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            pad_token_id=tokenizer.pad_id,
        )
        data = MaskedLMDataset(rows[:, : SEQ - MaskedLMDataset.extra_tokens], tokenizer, seed=3)
    else:
        model = presets.create(
            "t5-tiny",
            vocab_size=v,
            hidden_size=32,
            head_dim=8,
            num_heads=2,
            intermediate_size=64,
            num_layers=1,
            pad_token_id=tokenizer.pad_id,
            decoder_start_token_id=tokenizer.pad_id,
            eos_token_id=tokenizer.eos_id,
        )
        data = SpanCorruptionDataset(rows, tokenizer, seed=3)
    return model, data


def config(tmp_path, name="run", **kw):
    defaults = dict(
        batch_size=4,
        grad_accum=2,
        max_steps=8,
        warmup_steps=2,
        save_every=3,
        eval_every=4,
        eval_batches=2,
        log_every=1,
        keep_last=5,
        progress=False,
        out_dir=str(tmp_path / name),
        lr=3e-3,
    )
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
    resumed = Trainer(
        model2,
        config(tmp_path, "resumed", precision=precision, resume=str(checkpoint)),
        data2,
        data2,
    )
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
    twin = copy.deepcopy(model).double()  # the reference
    total = count = 0
    rows, rows64 = [], []
    data.set_epoch(0)
    for start in range(0, 12, 4):
        for i in range(start, start + 4):
            ex = data[i]
            inputs = dict(labels=ex["labels"][None], return_logits=True)
            with torch.no_grad():
                out, out64 = (m(ex["input_ids"][None], **inputs) for m in (model, twin))
            predicted = ex["labels"] != -100
            n = int(predicted.sum())
            total, count = total + out64.loss * n, count + n
            rows += [out.logits[0, predicted]]
            rows64 += [out64.logits[0, predicted]]
    # A float32 mean over the tokens, against the float64 one.
    assert_loss_policy(got, total / count, torch.cat(rows), torch.cat(rows64), "val_loss")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(precision, tokenizer, rows, tmp_path):
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
        run = config(tmp_path, f"c{every}", checkpointing=every, max_steps=3)
        trainer = Trainer(model, run, data)
        assert isinstance(model.blocks[0], Checkpointed) == bool(every)
        trainer.fit()
        results.append(trainer.losses)
    # Bit for bit: the checkpointed blocks recompute the same forward, in the same order.
    assert results[0] == results[1]


def test_gradient_accumulation_matches_a_larger_batch(tokenizer, rows, tmp_path):
    def fresh():
        torch.manual_seed(0)
        return setup("gpt", tokenizer, rows, dropout=0.0)[0]

    losses, weights = [], []
    for batch, accum in ((8, 1), (4, 2)):
        model = fresh()
        data = CausalLMDataset(rows[:8])  # one step sees all 8 rows either way
        cfg = config(tmp_path, f"b{batch}", batch_size=batch, grad_accum=accum, max_steps=1)
        trainer = Trainer(model, cfg, data)
        trainer.fit()
        losses.append(trainer.losses[1])
        weights.append(dict(model.named_parameters()))
    # The reference: the same step on the float64 twin, by the trainer's own optimizer and
    # schedule. The float32 runs sum in other orders: against it, within the policy.
    model, twin = fresh(), fresh().double()
    ids = rows[:8]
    out = model(ids, labels=ids, return_logits=True)
    out64 = twin(ids, labels=ids, return_logits=True)
    for loss, what in zip(losses, ("one batch of 8", "2 x 4 accumulated"), strict=True):
        assert_loss_policy(loss, out64.loss, out.logits[:, :-1], out64.logits[:, :-1], what)
    optimizer = build_optimizer(twin, cfg)
    build_scheduler(optimizer, cfg)  # sets the first step's learning rate
    out64.loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), cfg.grad_clip)
    optimizer.step()
    # In 2-norm over all the weights: AdamW's normalized first step turns the rounding of a
    # near-zero gradient into a change of the order of the step, at single elements.
    reference = dict(twin.named_parameters())
    assert_policy_norm(weights[1], reference, weights[0], "weights after one step")


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
    with (
        pytest.raises(ValueError, match="no CUDA device")
        if not torch.cuda.is_available()
        else pytest.raises(AssertionError)
    ):
        Trainer(model, config(tmp_path, device="cuda"), data)
    full = Trainer(model, config(tmp_path, max_steps=3), data)
    full.fit()
    with pytest.raises(ValueError, match="was trained in fp32; resuming in bf16"):
        Trainer(
            model, config(tmp_path, "x", precision="bf16", resume=str(full.last_checkpoint)), data
        )


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


# -- a run's identity ------------------------------------------------------------------------


def test_a_run_directory_belongs_to_one_run(tokenizer, rows, tmp_path):
    """A new run in a directory holding another run is refused, naming --resume and
    --overwrite, and changes nothing there; overwrite deletes that run's files (only
    those) before the new run starts."""
    model, data = setup("gpt", tokenizer, rows)
    Trainer(model, config(tmp_path, max_steps=2, save_every=2), data, data).fit()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    other, data = setup("bert", tokenizer, rows)
    files = "checkpoints, metrics.jsonl" + (
        ", loss.png" if importlib.util.find_spec("matplotlib") else ""
    )
    refusal = (
        rf"--out-dir {run} holds a run already \({files}\): continue it "
        r"with --resume latest, or delete it and start afresh with --overwrite"
    )
    with pytest.raises(ValueError, match=refusal):
        Trainer(other, config(tmp_path), data)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    with pytest.raises(ValueError, match=r"--overwrite would delete .*step-00000002, the "):
        Trainer(other, config(tmp_path, overwrite=True, resume="latest"), data)
    trainer = Trainer(other, config(tmp_path, overwrite=True, max_steps=1), data)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    trainer.fit()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000001"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1]


def test_out_dir_must_be_a_writable_directory(tokenizer, rows, tmp_path):
    model, data = setup("gpt", tokenizer, rows)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=rf"--out-dir {tmp_path / 'file'} is a file"):
        Trainer(model, config(tmp_path, "file"), data)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'file'} is a file, not a directory"):
        Trainer(model, config(tmp_path, "file/run"), data)


@pytest.fixture(scope="module")
def saved_run(tokenizer, rows, tmp_path_factory):
    """A 3-step GPT run with its tokenizer: checkpoints at steps 2 and 3."""
    root = tmp_path_factory.mktemp("saved")
    model, data = setup("gpt", tokenizer, rows)
    cfg = config(root, max_steps=3, save_every=2)
    Trainer(model, cfg, data, tokenizer=tokenizer).fit()
    return root / "run"


def _edit_meta(**changes):
    def edit(checkpoint):
        meta = json.loads((checkpoint / "trainer.json").read_text())
        for key, value in changes.items():
            *path, last = key.split(".")
            target = meta
            for part in path:
                target = target[part]
            target[last] = value
        (checkpoint / "trainer.json").write_text(json.dumps(meta))

    return edit


def _swap_two_ids(checkpoint):
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    token = {i: t for t, i in vocab.items()}
    vocab[token[300]], vocab[token[301]] = 301, 300
    (checkpoint / "tokenizer.json").write_text(json.dumps(spec))


def _foreign_state(checkpoint):
    torch.save({"optimizer": {}, "rng": [1, 2]}, checkpoint / "state.pt")


# (what is changed in the saved checkpoint, the model this run builds, the refusal)
MISMATCHES = [
    (
        None,
        dict(num_heads=4),
        r"the checkpoint's model has num_heads=2, num_kv_heads=2, head_dim=16, this "
        r"run's config num_heads=4, num_kv_heads=4, head_dim=8",
    ),
    (None, "bert", r"the checkpoint's model config is a GPTConfig, this run's a BertConfig"),
    (_swap_two_ids, None, r"this run's tokenizer is not the checkpoint's \(id 300 is "),
    (_edit_meta(step=-5), None, r"trainer.json: 'step' must be an int >= 0, got -5"),
    (_edit_meta(step="3"), None, r"trainer.json: 'step' must be an int >= 0, got '3'"),
    (_edit_meta(step=7), None, r"trainer.json: 'step' is 7, but the directory is step-00000003"),
    (_edit_meta(tokens_seen=True), None, r"'tokens_seen' must be an int >= 0, got True"),
    (_edit_meta(precision="fp8"), None, r"'precision' must be fp32, bf16 or fp16, got 'fp8'"),
    (_edit_meta(**{"config.lr": "fast"}), None, r"'config': config key 'lr' must be float"),
    (_edit_meta(**{"model.class": "Net"}), None, r"'model': class must be one of GPTConfig"),
    (_edit_meta(**{"model.fields.heads": 2}), None, r"'model': .*unexpected keyword .*'heads'"),
    (
        _edit_meta(**{"sampler.num_items": 7}),
        None,
        r"the data position does not fit this "
        r"run's data \(state was saved with num_items=7",
    ),
    (_foreign_state, None, r"state.pt: not the optimizer, schedule, loss-scale and RNG states"),
]


@pytest.mark.parametrize("damage, model, refusal", MISMATCHES)
def test_resume_refuses_a_checkpoint_of_another_run(
    saved_run, tokenizer, rows, tmp_path, damage, model, refusal
):
    """Each field of trainer.json is checked, and the model config (every field) and
    tokenizer must be the checkpoint's: a one-line refusal naming the difference. The
    same checkpoint undamaged resumes."""
    run = tmp_path / "copy"
    shutil.copytree(saved_run, run)
    latest = run / "checkpoints" / "step-00000003"
    if damage is not None:
        damage(latest)
    if model == "bert":
        net, data = setup("bert", tokenizer, rows)
    else:
        fields = dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=2, dropout=0.1
        )
        net = presets.create("gpt2-tiny", **{**fields, **(model or {})})
        data = CausalLMDataset(rows)
    cfg = config(tmp_path, "copy", max_steps=3, save_every=2, resume="latest")
    with pytest.raises(ValueError, match=refusal) as error:
        Trainer(net, cfg, data, tokenizer=tokenizer)
    assert "\n" not in str(error.value)
    shutil.rmtree(run)
    shutil.copytree(saved_run, run)
    net, data = setup("gpt", tokenizer, rows)
    assert Trainer(net, cfg, data, tokenizer=tokenizer).step == 3


def test_stale_temporary_directories_are_removed_at_the_start(saved_run, tokenizer, rows, tmp_path):
    """A save killed half-way leaves .tmp-*: gone when the run resumes, not only after its
    next save."""
    run = tmp_path / "copy"
    shutil.copytree(saved_run, run)
    stale = run / "checkpoints" / ".tmp-step-00000004-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    model, data = setup("gpt", tokenizer, rows)
    Trainer(model, config(tmp_path, "copy", resume="latest"), data, tokenizer=tokenizer)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000003",
    ]


def test_non_finite_weights_are_never_saved(tokenizer, rows, tmp_path):
    """Weights that turn NaN in a step whose loss and gradients were finite (what lr=inf
    does): the save is refused as TrainingDiverged, naming the weight and the last good
    checkpoint, and no checkpoint of that step exists."""
    model, data = setup("gpt", tokenizer, rows)
    trainer = Trainer(model, config(tmp_path, max_steps=4, save_every=1), data)
    steps = {"n": 0}

    def poison(optimizer, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 3:
            model.blocks[1].mlp.fc2.weight.data[0, 0] = float("nan")

    trainer.optimizer.register_step_post_hook(poison)
    expected = (
        r"step 3: non-finite weights \(blocks.1.mlp.fc2.weight\) after a finite loss "
        r"and gradient .*; not saved as a checkpoint; the last good checkpoint is "
        r".*step-00000002$"
    )
    with pytest.raises(TrainingDiverged, match=expected):
        trainer.fit()
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000002"
