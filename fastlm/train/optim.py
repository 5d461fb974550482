"""AdamW with weight-decay parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastlm.parallel.layers import VocabParallelEmbedding
from fastlm.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on weight matrices; none on 1-D parameters (norm scales,
    biases) or embedding tables (GPT-2 / BERT / Llama practice). A weight tied to an
    embedding (a tied LM head) counts as an embedding. Frozen parameters are left out."""
    no_decay = {
        id(p)
        for m in model.modules()
        if isinstance(m, (nn.Embedding, VocabParallelEmbedding))
        for p in m.parameters(recurse=False)
    }
    decay_params, other_params = [], []
    for p in model.parameters():  # each shared Parameter once
        if not p.requires_grad:
            continue
        (other_params if p.ndim < 2 or id(p) in no_decay else decay_params).append(p)
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": other_params, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW on fp32 parameters: the fused kernel on CUDA, the multi-tensor (foreach) one
    elsewhere."""
    groups = parameter_groups(model, config.weight_decay)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=config.betas,
        eps=config.adam_eps,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else True,
    )


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate at ``step`` (0-based) over ``config.lr``: linear warmup over
    ``warmup_steps``, then cosine or linear decay to ``min_lr_ratio`` at ``max_steps`` (or
    constant)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(
        1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    )
    if config.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
