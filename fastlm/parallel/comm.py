"""Autograd-aware collectives for tensor parallelism (Megatron-LM's four mappings).

Each is a pair of forward / backward collectives over a process group:

======================  ============================  ============================
function                forward                       backward
======================  ============================  ============================
``copy_to_group``       identity                      all-reduce (sum)
``reduce_from_group``   all-reduce (sum)              identity
``gather_from_group``   all-gather along the last dim split along the last dim
``scatter_to_group``    split along the last dim      all-gather along the last dim
======================  ============================  ============================
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: Tensor, group) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[-1] % world:
        raise ValueError(f"last dim {x.shape[-1]} does not split over {world} ranks")
    return x.chunk(world, dim=-1)[rank].contiguous()


def _gather_last(x: Tensor, group) -> Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _Reduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


def copy_to_group(x: Tensor, group=None) -> Tensor:
    return _Copy.apply(x, group)


def reduce_from_group(x: Tensor, group=None) -> Tensor:
    return _Reduce.apply(x, group)


def gather_from_group(x: Tensor, group=None) -> Tensor:
    return _Gather.apply(x, group)


def scatter_to_group(x: Tensor, group=None) -> Tensor:
    return _Scatter.apply(x, group)
