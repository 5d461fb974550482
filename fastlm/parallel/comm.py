"""Autograd-aware collectives for tensor and sequence parallelism (Megatron-LM's mappings).

Each is a pair of forward / backward collectives over a process group:

=========================  ==============================  ==============================
function                   forward                         backward
=========================  ==============================  ==============================
``copy_to_group``          identity                        all-reduce (sum)
``reduce_from_group``      all-reduce (sum)                identity
``gather_from_group``      all-gather along ``dim``        split along ``dim``
``scatter_to_group``       split along ``dim``             all-gather along ``dim``
``reduce_scatter_group``   reduce-scatter along ``dim``    all-gather along ``dim``
``all_gather_group``       all-gather along ``dim``        reduce-scatter along ``dim``
=========================  ==============================  ==============================

The last two are sequence parallelism's replacements for the first two around a
tensor-parallel region: the activations between regions stay split along the sequence.
"""

from __future__ import annotations

import collections
import inspect
import sys

import torch
import torch.distributed as dist
from torch import Tensor


def _all_reduce(x: Tensor, group) -> Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: Tensor, dim: int, group) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"dimension {dim} of size {x.shape[dim]} does not split over "
            f"{world} tensor-parallel ranks"
        )
    return x.chunk(world, dim=dim)[rank].contiguous()


def _gather(x: Tensor, dim: int, group) -> Tensor:
    world = dist.get_world_size(group)
    front = x.movedim(dim, 0).contiguous()  # the collectives concatenate along dim 0
    out = front.new_empty((world * front.shape[0], *front.shape[1:]))
    dist.all_gather_into_tensor(out, front, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: Tensor, dim: int, group) -> Tensor:
    world = dist.get_world_size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"dimension {dim} of size {x.shape[dim]} does not split over "
            f"{world} tensor-parallel ranks"
        )
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((front.shape[0] // world, *front.shape[1:]))
    dist.reduce_scatter_tensor(out, front, group=group)
    return out.movedim(0, dim)


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


# (forward, backward) pairs of the dimension-wise collectives.
_PAIRS = {
    "gather": (_gather, _split),
    "scatter": (_split, _gather),
    "reduce_scatter": (_reduce_scatter, _gather),
    "all_gather": (_gather, _reduce_scatter),
}


class _AlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind, dim, group):
        ctx.kind, ctx.dim, ctx.group = kind, dim, group
        return _PAIRS[kind][0](x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _PAIRS[ctx.kind][1](grad, ctx.dim, ctx.group), None, None, None


def copy_to_group(x: Tensor, group=None) -> Tensor:
    return _Copy.apply(x, group)


def reduce_from_group(x: Tensor, group=None) -> Tensor:
    return _Reduce.apply(x, group)


def gather_from_group(x: Tensor, group=None, dim: int = -1) -> Tensor:
    return _AlongDim.apply(x, "gather", dim % x.dim(), group)


def scatter_to_group(x: Tensor, group=None, dim: int = -1) -> Tensor:
    return _AlongDim.apply(x, "scatter", dim % x.dim(), group)


def reduce_scatter_group(x: Tensor, group=None, dim: int = 1) -> Tensor:
    return _AlongDim.apply(x, "reduce_scatter", dim % x.dim(), group)


def all_gather_group(x: Tensor, group=None, dim: int = 1) -> Tensor:
    return _AlongDim.apply(x, "all_gather", dim % x.dim(), group)


class CollectiveCounter:
    """While active (``with CollectiveCounter() as c:``), counts the collectives fastlm's
    own code issues through ``torch.distributed`` and the bytes they move, by kind:
    ``c.calls["all_reduce"]``, ``c.bytes["all_reduce"]`` (the reduced tensor; for
    all-gather the gathered output, for reduce-scatter the input). PyTorch's DDP and FSDP
    collectives are not counted: DDP's go through its C++ reducer, and which Python entry
    points FSDP2 calls differs between torch versions (2.11: these, 2.14: ``*_single``), so
    counting them would make the tally depend on the version."""

    # kind: the argument whose size is the volume moved
    KINDS = {
        "all_reduce": "tensor",
        "all_gather_into_tensor": "output_tensor",
        "reduce_scatter_tensor": "input",
    }

    def __init__(self) -> None:
        self.calls: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self._saved: dict = {}

    def __enter__(self) -> CollectiveCounter:
        for kind, arg in self.KINDS.items():
            original = self._saved[kind] = getattr(dist, kind)
            signature = inspect.signature(original)

            def counted(*args, _kind=kind, _arg=arg, _f=original, _sig=signature, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller == "fastlm" or caller.startswith("fastlm."):
                    t = _sig.bind(*args, **kwargs).arguments[_arg]
                    self.calls[_kind] += 1
                    self.bytes[_kind] += t.numel() * t.element_size()
                return _f(*args, **kwargs)

            setattr(dist, kind, counted)
        return self

    def __exit__(self, *exc) -> None:
        for kind, original in self._saved.items():
            setattr(dist, kind, original)
