"""Megatron-style tensor-parallel layers, built from full (unsharded) layers by slicing, so
a parallel model computes what the single-device one does whatever the number of ranks.

- :class:`ColumnParallelLinear`: the weight's output features split across ranks; the input
  is replicated (its gradient all-reduced), the output stays split unless gathered.
- :class:`RowParallelLinear`: the input features split; partial products all-reduced, the
  bias added once after the reduction.
- :class:`VocabParallelEmbedding`: vocabulary rows split; each rank looks up the ids it
  owns, zeros elsewhere, and the results are all-reduced.
- :func:`vocab_parallel_cross_entropy`: cross-entropy of vocabulary-split logits without
  gathering them: the max, the sum of exponentials and the target logit are all-reduced in
  fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.parallel.comm import copy_to_group, gather_from_group, reduce_from_group


def _shard(size: int, group, what: str) -> tuple[int, int]:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise ValueError(f"{what} = {size} does not split over {world} tensor-parallel ranks")
    part = size // world
    return rank * part, (rank + 1) * part


class ColumnParallelLinear(nn.Module):
    """``y[..., shard] = x @ W[shard].T + b[shard]``; ``gather_output`` all-gathers y.

    ``segments`` (sizes summing to out_features) shards each segment separately and keeps
    their order: a fused q/k/v projection ``[H*D, Hkv*D, Hkv*D]`` gives every rank its own
    heads of q, k and v, laid out as the unsharded layer's (fewer heads each)."""

    def __init__(self, linear: nn.Linear, group=None, gather_output: bool = False,
                 segments: list[int] | None = None) -> None:  # fmt: skip
        super().__init__()
        segments = segments or [linear.out_features]
        if sum(segments) != linear.out_features:
            raise ValueError(f"segments {segments} do not add up to out_features "
                             f"{linear.out_features}")  # fmt: skip
        rows, offset = [], 0
        for size in segments:
            start, stop = _shard(size, group, "a segment of out_features")
            rows.append(torch.arange(offset + start, offset + stop))
            offset += size
        index = torch.cat(rows).to(linear.weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group, self.gather_output = group, gather_output
        self.weight = nn.Parameter(linear.weight.detach()[index].clone())
        self.bias = (nn.Parameter(linear.bias.detach()[index].clone())
                     if linear.bias is not None else None)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        return gather_from_group(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x[..., shard] @ W[:, shard].T) + b``; ``input_is_parallel`` says x
    arrives already split (the output of a :class:`ColumnParallelLinear`)."""

    def __init__(self, linear: nn.Linear, group=None, input_is_parallel: bool = True) -> None:
        super().__init__()
        self.start, self.stop = _shard(linear.in_features, group, "in_features")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group, self.input_is_parallel = group, input_is_parallel
        self.weight = nn.Parameter(linear.weight.detach()[:, self.start : self.stop].clone())
        self.bias = (nn.Parameter(linear.bias.detach().clone())
                     if linear.bias is not None else None)  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = x[..., self.start : self.stop]
        y = reduce_from_group(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """An ``nn.Embedding`` whose rows (the vocabulary) are split across ranks."""

    def __init__(self, embedding: nn.Embedding, group=None) -> None:
        super().__init__()
        self.start, self.stop = _shard(embedding.num_embeddings, group, "num_embeddings")
        self.num_embeddings = embedding.num_embeddings
        self.group = group
        self.weight = nn.Parameter(embedding.weight.detach()[self.start : self.stop].clone())

    def forward(self, ids: Tensor) -> Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, 0)
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1)
        return reduce_from_group(out, self.group)


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, group, ignore_index):
        logits = logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = target - start
        mine = (local >= 0) & (local < logits.shape[-1]) & (target != ignore_index)
        picked = shifted.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(mine, picked, 0.0)
        dist.all_reduce(picked, group=group)
        loss = torch.where(target == ignore_index, 0.0, sum_exp.log() - picked)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, target)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad):
        probs, local, mine, target = ctx.saved_tensors
        d = probs.clone()
        rows = mine.nonzero(as_tuple=True)
        d[(*rows, local[rows])] -= 1.0
        d = d * torch.where(target == ctx.ignore_index, 0.0, grad).unsqueeze(-1)
        return d, None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, vocab_start: int,
                                 group=None, ignore_index: int = -100) -> Tensor:  # fmt: skip
    """Mean cross-entropy over the non-ignored rows of ``logits`` (N, V / tp), this rank's
    vocabulary slice starting at ``vocab_start``; fp32; gradients to ``logits``."""
    losses = _VocabParallelCE.apply(logits, target, vocab_start, group, ignore_index)
    return losses.sum() / (target != ignore_index).sum().clamp_min(1)
