"""Megatron-style tensor-parallel layers, built from full (unsharded) layers by slicing, so
a parallel model computes what the single-device one does whatever the number of ranks.

Slicing keeps each layer's class, parameter names and forward: :func:`shard_linear` cuts an
``nn.Linear``, a ``QuantLinear`` (its packed codes, scales and zero points) or a
``LoRALinear`` (its base and adapters) along its output features (column-parallel) or its
input features (row-parallel), in place, and returns how each tensor was cut (a
:class:`Shard` or :class:`Owned` per name), which is what sharded checkpoints record. The
communication sits at the boundary of the *region* the cut layers form (see
``fastlm.parallel.parallelize``), so an MLP's first and last projections still run as one
fused kernel on each rank.

Standalone layers for models of one's own:

- :class:`ColumnParallelLinear`: the output features split; the input is replicated (its
  gradient all-reduced), the output stays split unless gathered.
- :class:`RowParallelLinear`: the input features split; partial products all-reduced, the
  bias added once after the reduction.
- :class:`VocabParallelEmbedding`: vocabulary rows split; each rank looks up the ids it
  owns, zeros elsewhere, and the results are all-reduced.
- :func:`vocab_parallel_cross_entropy`: cross-entropy of vocabulary-split logits without
  gathering them: the max, the sum of exponentials and the target logit are all-reduced in
  fp32.
- :class:`VocabParallelProjection`: a model's logits and loss through a vocabulary-split
  head, built on the two above.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fastlm.nn.lora import LoRALinear
from fastlm.nn.quant import QuantLinear
from fastlm.parallel.comm import copy_to_group, gather_from_group, reduce_from_group


@dataclasses.dataclass
class Shard:
    """This rank holds positions ``index`` (int64) of dimension ``dim`` (of size ``full``
    unsharded). ``copies[i]`` counts the ranks holding position ``index[i]`` too (GQA
    key/value heads replicated when there are fewer than ranks); None: one each."""

    dim: int
    index: Tensor
    full: int
    copies: Tensor | None = None


@dataclasses.dataclass
class Owned:
    """A row-parallel bias: added once, by tensor-parallel rank 0; zeros (and frozen) on the
    other ranks, so the all-reduce of the partial outputs counts it once."""


Spec = Shard | Owned


def shard_range(size: int, group, what: str) -> tuple[int, int]:
    """This rank's contiguous share ``[start, stop)`` of ``size`` items."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if size % world:
        raise ValueError(f"{what} = {size} does not split over {world} tensor-parallel ranks")
    part = size // world
    return rank * part, (rank + 1) * part


def prefixed(prefix: str, specs: dict[str, Spec]) -> dict[str, Spec]:
    """``specs`` of a submodule, named from its parent (``prefix`` "" for the module
    itself)."""
    return {f"{prefix}.{k}" if prefix else k: v for k, v in specs.items()}


def _take(module: nn.Module, name: str, dim: int, index: Tensor) -> None:
    """Replace tensor ``name`` of ``module`` (parameter or buffer) by its ``index`` slice."""
    old = getattr(module, name)
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = new


def _own_bias(module: nn.Module, group) -> dict[str, Spec]:
    if getattr(module, "bias", None) is None:
        return {}
    if dist.get_rank(group) != 0:
        module.bias = nn.Parameter(torch.zeros_like(module.bias.detach()), requires_grad=False)
    return {"bias": Owned()}


def sum_grad_over(
    owner: nn.Module,
    name: str,
    group,
    rows: Tensor | None = None,
    slots: Tensor | None = None,
    buffer_rows: int = 0,
) -> None:
    """Make the gradient of parameter ``name`` (a dotted path within ``owner``, a module
    whose forward reads it) the sum of every rank's: for a replicated parameter whose
    gradient each rank computes from its share of the work (a LoRA factor beside a sharded
    base, a norm under sequence parallelism). With ``rows``, only those rows (dimension 0)
    are shared, each by the ranks holding the same ``slots`` of a ``buffer_rows`` buffer.

    The gradient hook goes onto the tensor the forward actually reads, looked up as each
    forward of ``owner`` starts: under FSDP that is the unsharded parameter FSDP gathered
    for the block, not the sharded one registered when the model was built (a hook on that
    would never fire)."""

    def summed(grad: Tensor) -> Tensor:
        if rows is None:
            grad = grad.clone()
            dist.all_reduce(grad, group=group)
            return grad
        buffer = grad.new_zeros((buffer_rows, *grad.shape[1:]))
        buffer[slots] = grad[rows]
        dist.all_reduce(buffer, group=group)
        grad = grad.clone()
        grad[rows] = buffer[slots]
        return grad

    def attach(module: nn.Module, args) -> None:
        param = module.get_parameter(name)
        # Once per tensor (marked on it): a checkpointed block's recomputation runs this again.
        marks = param.__dict__.setdefault("_fastlm_summed_by", set())
        if param.requires_grad and id(summed) not in marks:
            param.register_hook(summed)
            marks.add(id(summed))

    owner.register_forward_pre_hook(attach)


def _shard_quant(layer: QuantLinear, dim: int, index: Tensor) -> dict[str, Spec]:
    if hasattr(layer, "scales2"):
        raise ValueError(
            "double-quantized NF4 layers cannot be tensor-parallel (their "
            "second-level scales span rows): quantize without double_quant"
        )
    specs: dict[str, Spec] = {}
    full_k = layer.in_features
    if dim == 0:
        for name in ("qweight", "scales", "zeros"):
            if hasattr(layer, name):
                specs[name] = Shard(0, index, getattr(layer, name).shape[0])
                _take(layer, name, 0, index)
        return specs
    start, stop = int(index[0]), int(index[-1]) + 1
    if layer.bits == 8:
        specs["qweight"] = Shard(1, index, full_k)
        _take(layer, "qweight", 1, index)
        return specs
    group = layer.group_size
    if start % group or stop % group:
        raise ValueError(
            f"in_features shard [{start}, {stop}) of a 4-bit layer must align "
            f"with its group_size {group}"
        )
    packed = torch.arange(start // 2, stop // 2)
    groups = torch.arange(start // group, stop // group)
    specs["qweight"] = Shard(1, packed, full_k // 2)
    _take(layer, "qweight", 1, packed)
    for name in ("scales", "zeros"):
        if hasattr(layer, name):
            specs[name] = Shard(1, groups, full_k // group)
            _take(layer, name, 1, groups)
    return specs


def shard_linear(
    layer: nn.Module,
    dim: int,
    index: Tensor,
    group,
    copies: Tensor | None = None,
    shared_from: int = 0,
    owner: nn.Module | None = None,
    path: str = "",
) -> dict[str, Spec]:
    """Keep positions ``index`` of ``layer``'s output features (``dim`` 0: column-parallel)
    or input features (``dim`` 1: row-parallel), in place; returns each cut tensor's spec,
    by name within ``layer``. ``copies`` (column-parallel) counts the ranks holding each
    output row; the rows several ranks hold (all from row ``shared_from`` on) get their
    gradients summed over those ranks. ``owner`` (default: ``layer``) is the module whose
    forward reads the layer's tensors, ``path`` the layer's name within it."""
    owner = layer if owner is None else owner

    def within(name: str) -> str:
        return f"{path}.{name}" if path else name

    full = layer.out_features if dim == 0 else layer.in_features
    specs: dict[str, Spec]
    if isinstance(layer, LoRALinear):
        specs = prefixed(
            "base_layer",
            shard_linear(
                layer.base_layer,
                dim,
                index,
                group,
                copies,
                shared_from,
                owner,
                within("base_layer"),
            ),
        )
        for name in layer.lora_A:
            cut, partial = (
                (layer.lora_B[name], layer.lora_A[name])
                if dim == 0
                else (layer.lora_A[name], layer.lora_B[name])
            )
            key = f"lora_{'B' if dim == 0 else 'A'}.{name}.weight"
            specs[key] = Shard(dim, index, full, copies)
            _take(cut, "weight", dim, index)
            cut.out_features, cut.in_features = cut.weight.shape
            side = "A" if dim == 0 else "B"
            sum_grad_over(owner, within(f"lora_{side}.{name}.weight"), group)
            if dim == 0:
                shared = (owner, within(f"lora_B.{name}.weight"))
                _sum_shared_rows(shared, copies, index, full, shared_from, group)
    elif isinstance(layer, (QuantLinear, nn.Linear)):
        if isinstance(layer, QuantLinear):
            specs = _shard_quant(layer, dim, index)
        else:
            specs = {"weight": Shard(dim, index, full, copies)}
            _take(layer, "weight", dim, index)
            if dim == 0:
                shared = (owner, within("weight"))
                _sum_shared_rows(shared, copies, index, full, shared_from, group)
        if dim == 1:
            specs.update(_own_bias(layer, group))
        elif layer.bias is not None:
            specs["bias"] = Shard(0, index, full, copies)
            _take(layer, "bias", 0, index)
            shared = (owner, within("bias"))
            _sum_shared_rows(shared, copies, index, full, shared_from, group)
    else:
        raise TypeError(
            f"cannot tensor-parallelize a {type(layer).__name__} (nn.Linear, "
            f"QuantLinear or LoRALinear)"
        )
    count = len(index)
    layer.out_features, layer.in_features = (
        (count, layer.in_features) if dim == 0 else (layer.out_features, count)
    )
    return specs


def _sum_shared_rows(
    where: tuple[nn.Module, str],
    copies: Tensor | None,
    index: Tensor,
    full: int,
    shared_from: int,
    group,
) -> None:
    """Rows held by several ranks (``copies`` > 1, all at or after row ``shared_from`` of
    the full layer's ``full``) get their gradients summed over the ranks holding them."""
    if copies is None or not bool((copies > 1).any()):
        return
    rows = (copies > 1).nonzero().squeeze(1)
    sum_grad_over(*where, group, rows, index[rows] - shared_from, full - shared_from)


class ColumnParallelLinear(nn.Module):
    """``y[..., shard] = x @ W[shard].T + b[shard]``; ``gather_output`` all-gathers y.
    Built from the full ``linear``; ``weight`` and ``bias`` keep their names."""

    def __init__(self, linear: nn.Linear, group=None, gather_output: bool = False) -> None:
        super().__init__()
        start, stop = shard_range(linear.out_features, group, "out_features")
        self.specs = shard_linear(linear, 0, torch.arange(start, stop), group)
        self.weight, self.bias = linear.weight, linear.bias
        self.group, self.gather_output = group, gather_output

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(copy_to_group(x, self.group), self.weight, self.bias)
        return gather_from_group(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x[..., shard] @ W[:, shard].T) + b``; ``input_is_parallel`` says x
    arrives already split (the output of a :class:`ColumnParallelLinear`). The bias is
    :class:`Owned` by rank 0."""

    def __init__(self, linear: nn.Linear, group=None, input_is_parallel: bool = True) -> None:
        super().__init__()
        self.start, self.stop = shard_range(linear.in_features, group, "in_features")
        self.specs = shard_linear(linear, 1, torch.arange(self.start, self.stop), group)
        self.weight, self.bias = linear.weight, linear.bias
        self.group, self.input_is_parallel = group, input_is_parallel

    def forward(self, x: Tensor) -> Tensor:
        if not self.input_is_parallel:
            x = x[..., self.start : self.stop]
        return reduce_from_group(F.linear(x, self.weight, self.bias), self.group)


class VocabParallelEmbedding(nn.Module):
    """An ``nn.Embedding`` whose rows (the vocabulary) are split across ranks; same
    ``weight`` name and ``padding_idx`` (no gradient to that row)."""

    def __init__(self, embedding: nn.Embedding, group=None) -> None:
        super().__init__()
        self.start, self.stop = shard_range(embedding.num_embeddings, group, "vocab_size")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        pad = embedding.padding_idx
        self.padding_idx = (
            pad - self.start if pad is not None and self.start <= pad < self.stop else None
        )
        self.group = group
        self.weight = nn.Parameter(
            embedding.weight.detach()[self.start : self.stop].clone(),
            requires_grad=embedding.weight.requires_grad,
        )
        self.specs = {"weight": Shard(0, torch.arange(self.start, self.stop), self.num_embeddings)}

    def forward(self, ids: Tensor) -> Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        local = torch.where(mine, ids - self.start, 0)
        out = F.embedding(local, self.weight, self.padding_idx) * mine.unsqueeze(-1)
        return reduce_from_group(out, self.group)


class VocabParallelProjection(nn.Module):
    """What ``tensor_parallel`` swaps in for a model's projection onto the vocabulary once
    its head weight is split by vocabulary rows (this rank's from ``start``): the same
    ``logits`` and ``loss`` methods on the shard, the logits all-gathered, the loss the
    :func:`vocab_parallel_cross_entropy` of the local logits (never gathered). ``softcap``
    (the model's final soft-capping) caps each local logit, an elementwise step that needs
    no communication."""

    def __init__(self, start: int, group=None, softcap: float | None = None) -> None:
        super().__init__()
        self.start, self.group, self.softcap = start, group, softcap

    def _local_logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        local = F.linear(copy_to_group(hidden, self.group), weight, bias)
        if self.softcap is None:
            return local
        return self.softcap * torch.tanh(local / self.softcap)

    def logits(self, hidden: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return gather_from_group(self._local_logits(hidden, weight, bias), self.group)

    def loss(
        self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None
    ) -> Tensor:
        local = self._local_logits(hidden, weight, bias)
        return vocab_parallel_cross_entropy(local, labels, self.start, self.group)

    def extra_repr(self) -> str:
        capped = "" if self.softcap is None else f", softcap={self.softcap}"
        return f"start={self.start}{capped}"


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, group, ignore_index):
        dtype, logits = logits.dtype, logits.float()
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        local = target - start
        mine = (local >= 0) & (local < logits.shape[-1]) & (target != ignore_index)
        picked = shifted.gather(-1, torch.where(mine, local, 0).unsqueeze(-1)).squeeze(-1)
        picked = torch.where(mine, picked, 0.0)
        both = torch.stack([sum_exp, picked])  # one all-reduce for the two sums
        dist.all_reduce(both, group=group)
        sum_exp, picked = both[0], both[1]
        loss = torch.where(target == ignore_index, 0.0, sum_exp.log() - picked)
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), local, mine, target)
        ctx.ignore_index, ctx.dtype = ignore_index, dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        probs, local, mine, target = ctx.saved_tensors
        d = probs.clone()
        rows = mine.nonzero(as_tuple=True)
        d[(*rows, local[rows])] -= 1.0
        d = d * torch.where(target == ctx.ignore_index, 0.0, grad).unsqueeze(-1)
        return d.to(ctx.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor, target: Tensor, vocab_start: int, group=None, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy over the non-ignored rows of ``logits`` (N, V / tp), this rank's
    vocabulary slice starting at ``vocab_start``; fp32; gradients to ``logits`` (in their
    dtype). Two all-reduces: the row max, then the sum of exponentials with the target
    logit."""
    losses = _VocabParallelCE.apply(logits, target, vocab_start, group, ignore_index)
    return losses.sum() / (target != ignore_index).sum().clamp_min(1)
