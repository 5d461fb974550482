"""``parallelize(model, tp_size, dp_size)``: Megatron-style tensor parallelism inside groups
of ``tp_size`` ranks and DDP across them, applied from outside to a built model by reading
the plan its class declares (the models know nothing of process groups, and this module
imports none of them).

The plan, ``tp_plan``: a class attribute mapping module names (parameter names for
``"vocab_bias"``), ``*`` standing for one part of a name (``"blocks.*.attn"``), to how the
module is cut. Modules the plan does not name stay whole on every rank. The kinds:

- ``"attention"``: a region split by heads. The module holds ``num_heads``,
  ``num_kv_heads`` and ``head_dim``, and either a fused ``qkv`` linear (output rows: the
  query heads, then the key heads, then the value heads) or, with ``cross`` true, ``q``
  and a fused ``kv`` (key heads, then value heads), and ``o``. Each rank keeps ``H / tp``
  query heads and ``Hkv / tp`` key/value heads (GQA), or one key/value head shared by
  ``tp / Hkv`` ranks when there are fewer; ``q``/``qkv``/``kv`` are cut column-wise and
  ``o`` row-wise by those heads.
- ``"mlp"``: a region over a :class:`~fastlm.nn.FusedMLP` (``fc1`` column-wise, ``fc2``
  row-wise) or :class:`~fastlm.nn.GatedMLP` (``gate_proj``, ``up_proj`` / ``down_proj``),
  split along the intermediate features; the fused kernels still run whole on each rank.
- ``"position_bias_heads"``: an ``nn.Embedding`` of per-head biases (T5's relative
  positions), its columns (the heads) split as the attention's.
- ``"vocab_embedding"``: the token embedding, its rows (the vocabulary) split; each rank
  looks up the ids it owns.
- ``"vocab_head"``: a linear onto the vocabulary, its rows split as the embedding's (a
  head tied to the embedding stays tied to its shard).
- ``"vocab_bias"``: a bias over the vocabulary (a parameter), split the same way.
- ``"vocab_projection"``: the model's projection onto the vocabulary (an ``nn.Module`` with
  ``logits(hidden, weight, bias)`` and ``loss(hidden, weight, labels, bias)``), replaced
  by :class:`~fastlm.parallel.layers.VocabParallelProjection`: the logits are gathered, and
  the loss is the vocabulary-parallel cross-entropy (logits never gathered).
- ``"replicate"``: kept whole on every rank (the default; named where it informs).

A region's input goes through ``copy_to_group`` and its output through
``reduce_from_group`` (forward hooks): one all-reduce per region in the forward, one in the
backward.

Sequence parallelism (``sequence_parallel=True``, training only): between regions the
activations stay split along the sequence, from the first block of each stack the model
declares in ``block_stacks`` (names of its ``nn.ModuleList``s of blocks) to the end of its
last; a region all-gathers its input and reduce-scatters its output instead, and the
norms' gradients are summed over the ranks.

Every cut is recorded in ``model.tp_layout`` (a :class:`TensorParallelLayout`), which
sharded checkpoints and the gradient norm read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastlm.nn.mlp import FusedMLP, GatedMLP
from fastlm.parallel.comm import (
    all_gather_group,
    copy_to_group,
    gather_from_group,
    reduce_from_group,
    reduce_scatter_group,
    scatter_to_group,
)
from fastlm.parallel.layers import (
    Shard,
    Spec,
    VocabParallelEmbedding,
    VocabParallelProjection,
    prefixed,
    shard_linear,
    shard_range,
    sum_grad_over,
)

REGION_KINDS = ("attention", "mlp")
VOCAB_KINDS = ("vocab_embedding", "vocab_head", "vocab_bias", "vocab_projection")
PLAN_KINDS = (*REGION_KINDS, "position_bias_heads", *VOCAB_KINDS, "replicate")


@dataclasses.dataclass
class TensorParallelLayout:
    """How a model was cut: its tensor-parallel group, size and rank, whether its
    vocabulary (embedding, head, loss) was split, and for each cut tensor (by state-dict
    name) its :class:`Shard` or ``Owned`` spec; tensors not named are replicated."""

    group: object
    size: int
    rank: int
    sequence_parallel: bool
    specs: dict[str, Spec]
    vocab_parallel: bool = False


def _pattern(name: str) -> re.Pattern:
    return re.compile(r"[^.]+".join(re.escape(part) for part in name.split("*")))


def read_plan(model: nn.Module) -> dict[str, str]:
    """Every module (and, for ``"vocab_bias"``, parameter) of ``model`` that its class's
    ``tp_plan`` names, by name, with its kind, in the order of ``named_modules()`` then
    ``named_parameters()``. Raises if the model has no plan, if a kind is unknown, or if a
    pattern names nothing or a name is matched twice."""
    plan = getattr(type(model), "tp_plan", None)
    if plan is None:
        raise TypeError(
            f"model: {type(model).__name__} declares no tensor-parallel plan (a tp_plan class "
            f"attribute mapping module names to cuts: see fastlm.parallel.parallelize)"
        )
    for pattern, kind in plan.items():
        if kind not in PLAN_KINDS:
            raise ValueError(
                f"{type(model).__name__}.tp_plan[{pattern!r}]: unknown kind {kind!r} "
                f"(one of {', '.join(PLAN_KINDS)})"
            )
    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    cuts: dict[str, str] = {}
    for pattern, kind in plan.items():
        regex = _pattern(pattern)
        found = [n for n in names if regex.fullmatch(n)]
        if not found:
            raise ValueError(f"{type(model).__name__}.tp_plan[{pattern!r}] names nothing")
        for name in found:
            if name in cuts:
                raise ValueError(
                    f"{type(model).__name__}.tp_plan: {name} is both {cuts[name]!r} and {kind!r}"
                )
            cuts[name] = kind
    return {name: cuts[name] for name in names if name in cuts}


def _heads(count: int, tp: int, what: str) -> int:
    if count % tp:
        raise ValueError(f"{what} = {count} does not split over {tp} tensor-parallel ranks")
    return count // tp


def _rows(heads: Iterable[int], head_dim: int, offset: int = 0) -> Tensor:
    return torch.cat(
        [torch.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads]
    )


def _shard_attention(attn: nn.Module, tp: int, rank: int, group) -> dict[str, Spec]:
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    per_rank = _heads(h, tp, "num_heads")
    q_heads = range(rank * per_rank, (rank + 1) * per_rank)
    if hkv % tp == 0:
        kv_heads, shared_by = range(rank * hkv // tp, (rank + 1) * hkv // tp), 1
    elif tp % hkv == 0:  # fewer key/value heads than ranks: each serves tp / hkv ranks
        kv_heads, shared_by = [rank // (tp // hkv)], tp // hkv
    else:
        raise ValueError(
            f"num_kv_heads = {hkv} neither splits over nor divides {tp} tensor-parallel ranks"
        )
    q, k, v = _rows(q_heads, d), _rows(kv_heads, d, h * d), _rows(kv_heads, d, (h + hkv) * d)
    kv_copies = torch.full((len(k) + len(v),), shared_by)
    specs: dict[str, Spec] = {}
    if attn.cross:
        specs.update(prefixed("q", shard_linear(attn.q, 0, q, group, owner=attn, path="q")))
        kv = torch.cat([k, v]) - h * d
        specs.update(
            prefixed("kv", shard_linear(attn.kv, 0, kv, group, kv_copies, owner=attn, path="kv"))
        )
    else:
        copies = torch.cat([torch.ones(len(q), dtype=torch.long), kv_copies])
        specs.update(
            prefixed(
                "qkv",
                shard_linear(attn.qkv, 0, torch.cat([q, k, v]), group, copies, h * d, attn, "qkv"),
            )
        )
    specs.update(prefixed("o", shard_linear(attn.o, 1, q, group, owner=attn, path="o")))
    attn.num_heads, attn.num_kv_heads = per_rank, len(kv_heads)
    return specs


def _shard_mlp(mlp: nn.Module, group) -> dict[str, Spec]:
    if not isinstance(mlp, (FusedMLP, GatedMLP)):
        raise TypeError(f"an 'mlp' cut needs a FusedMLP or GatedMLP, got {type(mlp).__name__}")
    first, last = (
        (["fc1"], "fc2") if isinstance(mlp, FusedMLP) else (["gate_proj", "up_proj"], "down_proj")
    )
    hidden = getattr(mlp, last).in_features
    index = torch.arange(*shard_range(hidden, group, "intermediate_size"))
    specs: dict[str, Spec] = {}
    for name in first:
        cut = shard_linear(getattr(mlp, name), 0, index, group, owner=mlp, path=name)
        specs.update(prefixed(name, cut))
    specs.update(
        prefixed(last, shard_linear(getattr(mlp, last), 1, index, group, owner=mlp, path=last))
    )
    return specs


def _shard_position_bias(embedding: nn.Embedding, group) -> dict[str, Spec]:
    full = embedding.embedding_dim
    heads = torch.arange(*shard_range(full, group, "num_heads"))
    embedding.weight = nn.Parameter(embedding.weight.detach()[:, heads].clone())
    embedding.embedding_dim = len(heads)
    return {"weight": Shard(1, heads, full)}


def _make_region(module: nn.Module, group, sequence_parallel: bool) -> None:
    """Hooks making ``module`` a tensor-parallel region: its input replicated in (gathered
    along the sequence under sequence parallelism), its output summed out (scattered)."""

    def enter(mod, args, kwargs):
        x, *rest = args
        split = sequence_parallel and mod.training
        x = all_gather_group(x, group) if split else copy_to_group(x, group)
        if kwargs.get("context") is not None:  # cross-attention's encoder states
            kwargs = {**kwargs, "context": copy_to_group(kwargs["context"], group)}
        return (x, *rest), kwargs

    def leave(mod, args, output):
        if sequence_parallel and mod.training:
            return reduce_scatter_group(output, group)
        return reduce_from_group(output, group)

    module.register_forward_pre_hook(enter, with_kwargs=True)
    module.register_forward_hook(leave)


def _sequence_parallel(model: nn.Module, regions: set[nn.Module], group) -> None:
    """Split the activations along the sequence from the first block of each stack to the
    end of its last; parameters used on the split activations (the norms) get their
    gradients summed over the ranks."""
    stacks = getattr(type(model), "block_stacks", None)
    if stacks is None:
        raise TypeError(
            f"sequence_parallel: {type(model).__name__} declares no block_stacks (the names "
            f"of its nn.ModuleLists of blocks)"
        )

    def split(mod, args):
        return (scatter_to_group(args[0], group, dim=1), *args[1:]) if mod.training else None

    def join(mod, args, output):
        return gather_from_group(output, group, dim=1) if mod.training else None

    inside = {id(p) for r in regions for p in r.parameters()}
    for stack in map(model.get_submodule, stacks):
        stack[0].register_forward_pre_hook(split)
        stack[-1].register_forward_hook(join)
        for block in stack:
            # Hooked on the module holding each parameter (a norm): its forward runs inside
            # the block's, after FSDP has gathered the block.
            for module in block.modules():
                for name, p in module.named_parameters(recurse=False):
                    if id(p) not in inside:
                        sum_grad_over(module, name, group)


def _shard_vocab(model: nn.Module, cuts: dict[str, str], group) -> dict[str, Spec]:
    """Split the plan's vocabulary embedding, head and bias by rows, and swap in the
    vocabulary-parallel projection."""
    by_kind = {kind: [n for n, k in cuts.items() if k == kind] for kind in VOCAB_KINDS}
    if not any(by_kind.values()):
        return {}
    if len(by_kind["vocab_embedding"]) != 1:
        raise ValueError(
            f"{type(model).__name__}.tp_plan: a split vocabulary needs one "
            f"'vocab_embedding', got {by_kind['vocab_embedding']}"
        )
    (emb_name,) = by_kind["vocab_embedding"]
    parent_name, _, attr = emb_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    emb = VocabParallelEmbedding(old, group)
    setattr(parent, attr, emb)
    specs = {f"{emb_name}.weight": emb.specs["weight"]}
    rows = torch.arange(emb.start, emb.stop)
    for head_name in by_kind["vocab_head"]:
        head = model.get_submodule(head_name)
        if head.weight is old.weight:  # tied: the head reads the embedding's shard
            head.weight = emb.weight
            head.out_features = emb.weight.shape[0]
            specs[f"{head_name}.weight"] = emb.specs["weight"]
        else:
            specs.update(prefixed(head_name, shard_linear(head, 0, rows, group)))
    for bias_name in by_kind["vocab_bias"]:
        owner_name, _, attr = bias_name.rpartition(".")
        owner = model.get_submodule(owner_name)
        full = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(full.detach()[emb.start : emb.stop].clone()))
        specs[bias_name] = Shard(0, rows, full.shape[0])
    for name in by_kind["vocab_projection"]:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        softcap = getattr(owner, attr).softcap
        setattr(owner, attr, VocabParallelProjection(emb.start, group, softcap))
    return specs


def tensor_parallel(
    model: nn.Module, group=None, sequence_parallel: bool = False, vocab_parallel: bool = True
) -> nn.Module:
    """Shard ``model`` over ``group`` (default: the world) as its class's ``tp_plan`` says
    (the vocabulary kinds only with ``vocab_parallel``), in place, by slicing the full
    weights every rank holds, so the result does not depend on the number of ranks. Every
    rank of the group must hold the same model (checked). Apply LoRA and quantization
    before this, not after. Returns ``model`` with ``model.tp_layout``."""
    if not dist.is_initialized():
        raise RuntimeError(
            "tensor_parallel needs torch.distributed initialized (launch with torchrun)"
        )
    if hasattr(model, "tp_layout"):
        raise ValueError("model is tensor-parallel already")
    cuts = read_plan(model)
    check_consistent(model, group)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    specs: dict[str, Spec] = {}
    regions: set[nn.Module] = set()
    for name, kind in cuts.items():
        if kind == "attention":
            cut = _shard_attention(model.get_submodule(name), tp, rank, group)
        elif kind == "mlp":
            cut = _shard_mlp(model.get_submodule(name), group)
        elif kind == "position_bias_heads":
            specs.update(prefixed(name, _shard_position_bias(model.get_submodule(name), group)))
            continue
        else:
            continue
        module = model.get_submodule(name)
        _make_region(module, group, sequence_parallel)
        regions.add(module)
        specs.update(prefixed(name, cut))
    if vocab_parallel:
        specs.update(_shard_vocab(model, cuts, group))
    if sequence_parallel:
        _sequence_parallel(model, regions, group)
    split_vocab = vocab_parallel and "vocab_embedding" in cuts.values()
    model.tp_layout = TensorParallelLayout(group, tp, rank, sequence_parallel, specs, split_vocab)
    return model


def check_consistent(model: nn.Module, group=None, extra: object = None) -> None:
    """Raise on every rank of ``group`` if the ranks do not hold the same model (class,
    config, parameter names, shapes and dtypes) and ``extra`` (a training config): a
    desynchronized launch fails here with the difference named, instead of hanging in a
    collective later."""
    config = getattr(model, "config", None)
    mine = {
        "model": type(model).__name__,
        "config": repr(config) if config is not None else None,
        "tensors": [(n, tuple(t.shape), str(t.dtype)) for n, t in model.state_dict().items()],
        "extra": repr(extra),
    }
    every: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    for rank, theirs in enumerate(every):
        if theirs == every[0]:
            continue
        what = next(k for k in mine if theirs[k] != every[0][k])
        first, other = every[0][what], theirs[what]
        if what == "tensors":
            diff = [(a, b) for a, b in zip(first, other, strict=False) if a != b]
            first, other = diff[0] if diff else (len(first), len(other))
        raise ValueError(
            f"ranks hold different models ({what}): group rank 0 has "
            f"{str(first)[:300]}, group rank {rank} has "
            f"{str(other)[:300]}"
        )


@dataclasses.dataclass(frozen=True)
class DataParallelLayout:
    """Where a rank sits among the data-parallel ranks ``parallelize`` set up: ``size``
    replicas of the batch (each reads its share ``rank``); with FSDP, ``replicate`` groups
    (HSDP) of ``size // replicate`` ranks that shard the model between them."""

    size: int
    rank: int
    fsdp: bool
    replicate: int


def _fsdp_policies(param_dtype, reduce_dtype, cpu_offload: bool, device: torch.device) -> dict:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    policies: dict = {
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    }
    if cpu_offload:
        if device.type != "cuda":
            raise ValueError(
                "cpu_offload: moves the sharded parameters, gradients and optimizer state from "
                "the GPU to pinned host memory; this model is on the CPU already"
            )
        policies["offload_policy"] = CPUOffloadPolicy()
    return policies


def _fully_shard(model: nn.Module, mesh, reshard_after_forward: bool, policies: dict) -> None:
    """FSDP2 on ``mesh``: each block of the model's stacks its own unit (its parameters
    gathered just before its forward and backward, freed after), then the root (embeddings,
    final norm, head). The last block is kept gathered after its forward, as torchtitan
    does: the backward needs it at once; so is the root."""
    from torch.distributed.fsdp import fully_shard

    stacks = getattr(type(model), "block_stacks", None)
    if stacks is None:
        raise TypeError(
            f"fsdp: {type(model).__name__} declares no block_stacks (the names of its "
            f"nn.ModuleLists of blocks, the units FSDP gathers one at a time)"
        )
    blocks = [block for name in stacks for block in model.get_submodule(name)]
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(
            block, mesh=mesh, reshard_after_forward=reshard_after_forward and not last, **policies
        )
    # The root (embeddings, final norm, head) stays gathered from its forward to its backward,
    # which begins with the head at once: torch 2.11's FSDP2 would re-gather it through hooks
    # on the output's tensors, and does not look inside the model's output dataclass for them.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, **policies)


def parallelize(
    model: nn.Module,
    tp_size: int = 1,
    dp_size: int | None = None,
    sequence_parallel: bool = False,
    *,
    fsdp: bool = False,
    dp_replicate: int = 1,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
):
    """Tensor parallel over groups of ``tp_size`` ranks (the innermost mesh dimension: one
    node's GPUs) and data parallel across them: DDP, or with ``fsdp`` fully sharded
    (PyTorch's FSDP2, ``fully_shard``) over the data-parallel ranks, ``dp_replicate`` > 1
    making it hybrid (HSDP: the model sharded within each of ``dp_replicate`` groups and
    replicated across them). ``dp_size`` counts every data-parallel rank (``dp_replicate``
    x the shard group's size; None: the rest of the world).

    FSDP options: ``param_dtype`` the dtype parameters are gathered in for compute (bf16;
    None: as stored, fp32), ``reduce_dtype`` the one gradients are reduced in (fp32), the
    master weights and AdamW state staying fp32 and sharded; ``reshard_after_forward``
    frees each block's gathered parameters after its forward (False: keeps them to the
    backward, more memory, one all-gather fewer); ``cpu_offload`` keeps the shards in host
    memory (a GPU run).

    Apply activation checkpointing, LoRA and quantization before this. Returns ``(model,
    mesh)``; :func:`data_parallel_layout` says where a rank sits."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed initialized (torchrun)")
    world = dist.get_world_size()
    if not isinstance(tp_size, int) or tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size {tp_size!r} does not divide the world size {world}")
    dp = world // tp_size if dp_size is None else dp_size
    if dp * tp_size != world:
        raise ValueError(f"dp_size {dp} x tp_size {tp_size} != world size {world}")
    if not isinstance(dp_replicate, int) or dp_replicate < 1 or dp % dp_replicate:
        raise ValueError(f"dp_replicate {dp_replicate!r} does not divide dp_size {dp}")
    if not fsdp and (dp_replicate != 1 or param_dtype is not None or cpu_offload):
        raise ValueError(
            "dp_replicate, param_dtype and cpu_offload shape fully sharded data parallelism: "
            "pass fsdp=True"
        )
    check_consistent(model)
    device = next(model.parameters()).device
    if fsdp:
        policies = _fsdp_policies(param_dtype, reduce_dtype, cpu_offload, device)
        shape, names = (
            (dp_replicate, dp // dp_replicate, tp_size),
            ("dp_replicate", "dp_shard", "tp"),
        )
    else:
        shape, names = (dp, tp_size), ("dp", "tp")
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    if tp_size > 1:
        tensor_parallel(model, mesh.get_group("tp"), sequence_parallel)
    if fsdp:
        dp_mesh = mesh["dp_replicate", "dp_shard"] if dp_replicate > 1 else mesh["dp_shard"]
        _fully_shard(model, dp_mesh, reshard_after_forward, policies)
    elif dp > 1:
        # Parameters that get no gradient (BERT's pooler under the masked-LM loss) must be
        # found each step rather than waited for.
        model = DistributedDataParallel(
            model, process_group=mesh.get_group("dp"), find_unused_parameters=True
        )
    return model, mesh


def data_parallel_layout(mesh) -> DataParallelLayout:
    """This rank's data-parallel replica on a mesh :func:`parallelize` built."""
    names = mesh.mesh_dim_names
    if "dp" in names:
        return DataParallelLayout(mesh.size(names.index("dp")), mesh.get_local_rank("dp"), False, 1)
    replicate, shard = (mesh.size(names.index(n)) for n in ("dp_replicate", "dp_shard"))
    rank = mesh.get_local_rank("dp_replicate") * shard + mesh.get_local_rank("dp_shard")
    return DataParallelLayout(replicate * shard, rank, True, replicate)


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: an FSDP-sharded parameter's (or gradient's,
    or optimizer state's) local shard, anything else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def fsdp_rows(tensor: Tensor) -> tuple[int, int]:
    """Rows ``[start, stop)`` of dimension 0 that ``local(tensor)`` holds of the tensor
    FSDP sharded (FSDP2 cuts dimension 0 as ``torch.chunk`` does: ``ceil(n / ranks)`` rows
    each, the last ranks' shares shorter or empty); all of them when not FSDP-sharded."""
    rows = tensor.shape[0] if tensor.dim() else 1
    if not isinstance(tensor, DTensor):
        return 0, rows
    (axis,) = [i for i, p in enumerate(tensor.placements) if p.is_shard()]
    if tensor.placements[axis].dim != 0:
        raise ValueError(f"FSDP shards dimension 0, this tensor {tensor.placements}")
    ranks, rank = tensor.device_mesh.size(axis), tensor.device_mesh.get_local_rank(axis)
    chunk = -(-rows // ranks)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def copies_across_data_parallel(tensor: Tensor, model: nn.Module) -> int:
    """How many data-parallel ranks hold the same values as this one's ``local(tensor)``:
    the HSDP replicas of an FSDP shard, every replica of a DDP model, else one."""
    if isinstance(tensor, DTensor):
        mesh = tensor.device_mesh
        return math.prod(mesh.size(i) for i, p in enumerate(tensor.placements) if p.is_replicate())
    if isinstance(model, DistributedDataParallel):
        return dist.get_world_size(model.process_group)
    return 1


def model_class(model: nn.Module) -> type:
    """The class ``model`` was built as (inside a DDP wrapper): FSDP2 turns a module it
    shards into an instance of a subclass it makes (``FSDPGPT`` of ``GPT``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(unwrap(model)).__mro__ if not issubclass(c, FSDPModule))


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or the model itself)."""
    return getattr(model, "module", model)


def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a model :func:`parallelize` (or
    :func:`tensor_parallel`) set up: the global norm of the unsharded gradients, the same on
    every rank. Each rank sums the squares of the gradient it holds (an FSDP shard, a
    tensor-parallel slice), each value divided by the number of ranks holding it too (key/
    value rows shared by tensor-parallel ranks, replicated tensors, DDP and HSDP replicas),
    so one all-reduce over the world counts every value once. Clips in place and returns
    the norm."""
    inner = unwrap(model)
    layout: TensorParallelLayout | None = getattr(inner, "tp_layout", None)
    params = [(n, p) for n, p in inner.named_parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    device = local(params[0][1].grad).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    tp = layout.size if layout is not None else 1
    for name, p in params:
        g = local(p.grad).float()
        spec = layout.specs.get(name) if layout is not None else None
        held = copies_across_data_parallel(p.grad, model)
        if spec is None:  # the same on every tensor-parallel rank
            held *= tp
        if isinstance(spec, Shard) and spec.copies is not None:
            copies = spec.copies.to(device=device, dtype=g.dtype)
            if spec.dim == 0:
                copies = copies[slice(*fsdp_rows(p.grad))]
            shape = [1] * g.dim()
            shape[spec.dim] = -1
            total += (g.square() / copies.reshape(shape)).sum() / held
        else:
            total += g.square().sum() / held
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    norm = total.sqrt()
    if math.isfinite(max_norm):
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, p in params:
            local(p.grad).mul_(coefficient)
    return norm
