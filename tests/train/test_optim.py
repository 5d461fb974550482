"""Weight-decay groups and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastlm.models import presets
from fastlm.train import TrainConfig
from fastlm.train.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"])
def test_decay_only_on_weight_matrices(name):
    model = presets.create(name, vocab_size=97)
    decay, other = parameter_groups(model, 0.1)
    assert (decay["weight_decay"], other["weight_decay"]) == (0.1, 0.0)
    ids = [id(p) for p in decay["params"] + other["params"]]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    for module_name, p in model.named_parameters(remove_duplicate=False):
        expect_decay = p.ndim == 2 and id(p) not in embeddings
        assert (id(p) in {id(q) for q in decay["params"]}) == expect_decay, module_name
    # Norm scales and biases really are there (not just absent).
    assert any(p.ndim == 1 for p in other["params"])


def test_tied_head_is_not_decayed():
    model = presets.create("gpt2-tiny", vocab_size=97)
    assert model.lm_head.weight is model.tok_emb.weight
    decay, _ = parameter_groups(model, 0.1)
    assert all(p is not model.lm_head.weight for p in decay["params"])


def test_frozen_parameters_are_left_out():
    model = presets.create("gpt2-tiny", vocab_size=97)
    model.blocks[0].requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    assert sum(len(g["params"]) for g in groups) == sum(
        1 for p in model.parameters() if p.requires_grad
    )


def test_optimizer_is_adamw_with_the_config():
    cfg = TrainConfig(lr=3e-4, betas=(0.8, 0.9), adam_eps=1e-6, weight_decay=0.05)
    opt = build_optimizer(presets.create("gpt2-tiny", vocab_size=97), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-6, 0.05)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_shape(schedule):
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule)
    f = [lr_factor(s, cfg) for s in range(cfg.max_steps)]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    decay_progress = [(s - 10) / 100 for s in range(10, 110)]
    expected = {
        "cosine": [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)) for p in decay_progress],
        "linear": [0.1 + 0.9 * (1 - p) for p in decay_progress],
        "constant": [1.0] * 100,
    }[schedule]
    assert f[10:] == pytest.approx(expected)
    assert lr_factor(cfg.max_steps + 50, cfg) == pytest.approx(
        expected[-1] if schedule == "constant" else 0.1
    )


def test_scheduler_drives_the_optimizer():
    cfg = TrainConfig(lr=1.0, max_steps=20, warmup_steps=4)
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_factor(s, cfg) for s in range(6)])
