"""Checkpoints of a parallel model and its optimizer through PyTorch's distributed
checkpoint (DCP): every rank writes the values it alone holds, in parallel, and a checkpoint
written at one layout (tensor-parallel size, FSDP or DDP, HSDP, world size, or one process)
loads at any other.

Each tensor is stored under its unsharded name and shape (``model/<state-dict name>``,
``optim/<parameter name>/<state>``, e.g. ``optim/blocks.0.mlp.fc1.weight/exp_avg``), so the
checkpoint is independent of the layout that wrote it. A rank's part of a tensor is what
tensor parallelism cut (a :class:`~fastlm.parallel.layers.Shard`'s positions, which for the
heads of a fused ``qkv`` are several runs of rows), then what FSDP cut of that (a range of
rows); it goes to DCP as a ``ShardedTensor`` of those rectangular pieces at their offsets in
the full tensor. Values held by several ranks are written by one: data-parallel replica 0
(DDP, or HSDP's first replica), tensor-parallel rank 0 for replicated tensors and the
row-parallel biases it owns, and for key/value rows shared by ``c`` tensor-parallel ranks
the first of them (rank ``% c == 0``).

Loading reads the unsharded tensors a group at a time (at most ``group_bytes`` of them),
and each rank keeps its part: peak memory is the shards plus one group.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from fastlm.parallel.layers import Owned, Shard, Spec
from fastlm.parallel.parallelize import TensorParallelLayout, fsdp_rows, local, unwrap

MODEL, OPTIM = "model/", "optim/"
METADATA = ".metadata"  # the file DCP writes last, once every rank's data is on disk


def find(directory: str | os.PathLike) -> Path | None:
    """The DCP checkpoint a checkpoint directory holds: itself, or its subdirectory with
    DCP's metadata (a distributed run's ``dcp/``); None if there is none."""
    directory = Path(directory)
    if (directory / METADATA).is_file():
        return directory
    found = sorted(d.parent for d in directory.glob(f"*/{METADATA}"))
    return found[0] if found else None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without two warnings of DCP's that say nothing to a user here: that ShardedTensor is
    deprecated (see :func:`_sharded`), and that a load without torch.distributed is one
    process's (as asked)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Please use DTensor instead", FutureWarning)
        warnings.filterwarnings(
            "ignore", ".*assuming the intent is to (load|save) in a single process"
        )
        yield


# -- which part of each tensor this rank holds ------------------------------------------------


def _tp(model: nn.Module) -> TensorParallelLayout | None:
    return getattr(model, "tp_layout", None)


def _full_shape(tensor: Tensor, spec: Spec | None) -> list[int]:
    shape = list(tensor.shape)  # a DTensor's: the tensor-parallel shard's, over FSDP ranks
    if isinstance(spec, Shard) and shape:  # (a parameter's step count is a scalar)
        shape[spec.dim] = spec.full
    return shape


def _positions(tensor: Tensor, spec: Spec | None) -> list[Tensor]:
    """For each dimension of ``local(tensor)``, the positions in the full tensor that its
    entries hold."""
    index = [torch.arange(n) for n in tensor.shape]
    if isinstance(spec, Shard):
        index[spec.dim] = spec.index
    if tensor.dim():
        index[0] = index[0][slice(*fsdp_rows(tensor))]
    return index


def _first_data_parallel_copy(tensor: Tensor, wrapper: nn.Module) -> bool:
    """Whether this rank is the first of the data-parallel ranks holding these values: of
    an FSDP parameter's replicas (HSDP), of the data-parallel ranks for a tensor FSDP
    leaves whole (a buffer: quantized codes), of DDP's replicas."""
    if isinstance(tensor, DTensor):
        mesh = tensor.device_mesh
        return all(
            mesh.get_local_rank(i) == 0 for i, p in enumerate(tensor.placements) if p.is_replicate()
        )
    sharded = next((p for p in wrapper.parameters() if isinstance(p, DTensor)), None)
    if sharded is not None:
        mesh = sharded.device_mesh
        return all(mesh.get_local_rank(i) == 0 for i in range(mesh.ndim))
    group = getattr(wrapper, "process_group", None)  # DDP's
    return group is None or dist.get_rank(group) == 0


def _owned(tensor: Tensor, spec: Spec | None, tp: TensorParallelLayout | None) -> Tensor | None:
    """Which positions along the tensor-parallel dimension this rank writes (a bool mask),
    None for all of them or an empty mask for none."""
    rank = tp.rank if tp is not None else 0
    if spec is None or isinstance(spec, Owned):
        return None if rank == 0 else torch.zeros(0, dtype=torch.bool)
    if spec.copies is None:
        return None
    # Rows shared by c consecutive ranks (GQA key/value heads): the first of them writes.
    return rank % spec.copies == 0


def _runs(local_pos: Tensor, full_pos: Tensor) -> list[tuple[int, int, int]]:
    """``(local start, full start, length)`` of the stretches where both advance by one."""
    if not len(full_pos):
        return []
    breaks = ((local_pos.diff() != 1) | (full_pos.diff() != 1)).nonzero().squeeze(1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*starts[1:], len(full_pos)]
    return [(int(local_pos[a]), int(full_pos[a]), b - a) for a, b in zip(starts, ends, strict=True)]


def _pieces(
    tensor: Tensor, spec: Spec | None, keep: Tensor | None
) -> Iterator[tuple[Tensor, list[int]]]:
    """The rectangular pieces of ``local(tensor)`` (views) with their offsets in the full
    tensor, of the positions ``keep`` selects along the tensor-parallel dimension."""
    held = local(tensor)
    index = _positions(tensor, spec)
    per_dim = []
    for d, full_pos in enumerate(index):
        local_pos = torch.arange(len(full_pos))
        if keep is not None and isinstance(spec, Shard) and d == spec.dim:
            mask = keep[slice(*fsdp_rows(tensor))] if d == 0 else keep
            local_pos, full_pos = local_pos[mask], full_pos[mask]
        per_dim.append(_runs(local_pos, full_pos))
    for combo in itertools.product(*per_dim):
        piece = held
        for d, (start, _, length) in enumerate(combo):
            piece = piece.narrow(d, start, length)
        yield piece, [full for _, full, _ in combo]


def _needs_pieces(tensor: Tensor, spec: Spec | None) -> bool:
    """Whether ranks hold different values of ``tensor`` (else each holds all of it, DCP
    writes one copy, and a scalar is always whole)."""
    return tensor.dim() > 0 and (isinstance(tensor, DTensor) or spec is not None)


def _sharded(
    tensor: Tensor | None, full_shape: list[int], spec: Spec | None, tp, wrapper, copy: bool
):
    """A ``ShardedTensor`` of the pieces of ``tensor`` this rank writes (none if it does
    not hold the tensor at all); ``copy``: of host-memory copies of them.

    ShardedTensor is the one public way to hand DCP pieces at arbitrary offsets (a DTensor
    describes even splits only, and a fused ``qkv``'s heads are not one); torch marks it
    deprecated in favour of DTensor, and 2.11 to 2.14 save and load it alike."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard as Piece
    from torch.distributed._shard.sharded_tensor import init_from_local_shards

    pieces = []
    if tensor is not None and _first_data_parallel_copy(tensor, wrapper):
        keep = _owned(tensor, spec, tp)
        device = "cpu" if copy else local(tensor).device
        where = f"rank:{dist.get_rank()}/{device}"
        if keep is None or keep.numel():
            for piece, offsets in _pieces(tensor, spec, keep):
                if piece.numel():
                    meta = ShardMetadata(offsets, list(piece.shape), where)
                    data = piece.detach().to(device, copy=copy).contiguous()
                    pieces.append(Piece(data, meta))
    with _quiet():
        return init_from_local_shards(pieces, *full_shape)


# -- what a model and its optimizer hold, by unsharded name -----------------------------------


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The state-dict tensors of ``model``, each once (tied weights under their first
    name)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{OPTIM}{names[id(param)]}/{key}"] = value
    return out


def _spec_of(key: str, tp: TensorParallelLayout | None) -> Spec | None:
    if tp is None:
        return None
    name = key[len(MODEL) :] if key.startswith(MODEL) else key[len(OPTIM) :].rpartition("/")[0]
    return tp.specs.get(name)


def save(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    trainable_only: bool = False,
    async_group=None,
):
    """Write ``model``'s tensors (``trainable_only``: its trainable parameters alone, a
    LoRA run's adapters) and ``optimizer``'s state into ``directory`` as a DCP checkpoint,
    every rank its own part in parallel (one process: all of it). With
    ``async_group`` (a gloo process group of every rank, kept for checkpoints: the writer's
    collectives must not interleave with training's), the tensors are copied to host
    memory and written by a background thread: returns the future to wait on; else None
    once written. DCP writes ``.metadata`` last, so a directory without it
    is not a checkpoint."""
    inner = unwrap(model)
    tp = _tp(inner)
    tensors = {f"{MODEL}{n}": t for n, t in _model_tensors(inner).items()}
    if trainable_only:
        trainable = _trainable(inner)
        tensors = {k: t for k, t in tensors.items() if k[len(MODEL) :] in trainable}
    if optimizer is not None:
        tensors.update(_optimizer_tensors(inner, optimizer))
    copy = async_group is not None  # a snapshot: training goes on changing the tensors

    def whole(t: Tensor) -> Tensor:
        return local(t).detach().to("cpu" if copy else local(t).device, copy=copy)

    if not dist.is_initialized():
        state = {k: whole(t) for k, t in tensors.items()}
    else:
        state = {}
        for key, (shape, pieces) in _every_ranks(tensors, tp).items():
            mine = tensors.get(key)
            if pieces:
                state[key] = _sharded(mine, shape, _spec_of(key, tp), tp, model, copy)
            elif mine is not None:
                state[key] = whole(mine)
    with _quiet():
        if copy:  # DCP's own async_save cannot stage ShardedTensors: the copies are made here
            return _writer().submit(
                dcp.save, state, checkpoint_id=str(directory), process_group=async_group
            )
        dcp.save(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())
    return None


@functools.cache
def _writer() -> concurrent.futures.ThreadPoolExecutor:
    """The thread background saves run in, one at a time."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastlm-dcp")


def _every_ranks(tensors: dict[str, Tensor], tp) -> dict[str, tuple[list[int], bool]]:
    """Every rank's tensors, in one order: unsharded shape, and whether they are written
    in pieces. Every rank must take part in building each ShardedTensor, also one it does
    not hold (the optimizer state of a row-parallel bias, which tensor-parallel ranks
    other than 0 keep frozen at zero)."""
    mine = {
        k: (_full_shape(t, _spec_of(k, tp)), _needs_pieces(t, _spec_of(k, tp)))
        for k, t in tensors.items()
    }
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    union: dict[str, tuple[list[int], bool]] = {}
    for theirs in every:
        union.update(theirs)
    return {k: union[k] for k in sorted(union)}


# -- reading ----------------------------------------------------------------------------------


def stored(directory: str | os.PathLike) -> dict[str, tuple[list[int], torch.dtype]]:
    """The tensors of the checkpoint in ``directory``: unsharded shape and dtype by key."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return {
        key: (list(meta.size), meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def read_full(
    directory: str | os.PathLike, keys: list[str], group_bytes: int = 1 << 30
) -> Iterator[dict[str, Tensor]]:
    """The unsharded tensors ``keys`` of the checkpoint, on the CPU, in groups of at most
    ``group_bytes`` (one tensor if larger). Under torch.distributed every rank must ask for
    the same keys (each reads them all)."""
    shapes = stored(directory)
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise ValueError(f"checkpoint {directory} holds no {', '.join(missing[:5])}")
    group: dict[str, Tensor] = {}
    size = 0
    for key in keys:
        shape, dtype = shapes[key]
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if group and size + nbytes > group_bytes:
            _read(group, directory)
            yield group
            group, size = {}, 0
        group[key] = torch.empty(shape, dtype=dtype)
        size += nbytes
    if group:
        _read(group, directory)
        yield group


def _read(state: dict[str, Tensor], directory) -> None:
    with _quiet():
        dcp.load(state, checkpoint_id=str(directory), no_dist=not dist.is_initialized())


def _part(full: Tensor, tensor: Tensor, spec: Spec | None, tp) -> Tensor:
    """This rank's part of the unsharded ``full`` for ``tensor``."""
    if isinstance(spec, Owned) and tp is not None and tp.rank != 0:
        return torch.zeros_like(local(tensor))
    part = full
    for d, positions in enumerate(_positions(tensor, spec)):
        if len(positions) != part.shape[d] or d == getattr(spec, "dim", None):
            part = part.index_select(d, positions)
    return part


def model_state(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The model's unsharded tensors in the checkpoint, by state-dict name, on the CPU."""
    keys = [k for k in stored(directory) if k.startswith(MODEL)]
    full: dict[str, Tensor] = {}
    for group in read_full(directory, keys):
        full.update({k[len(MODEL) :]: v for k, v in group.items()})
    return full


def load(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    group_bytes: int = 1 << 30,
    frozen_from_elsewhere: bool = False,
) -> None:
    """Load the DCP checkpoint in ``directory`` (written at any layout) into ``model`` (and
    ``optimizer``, built on it) at the layout they have: see :func:`load_full`."""
    shapes = stored(directory)
    keys = sorted(k for k in shapes if optimizer is not None or k.startswith(MODEL))
    groups = read_full(directory, keys, group_bytes)
    load_full(groups, shapes, model, optimizer, str(directory), frozen_from_elsewhere)


@torch.no_grad()
def load_full(
    groups: Iterable[dict[str, Tensor]],
    shapes: dict[str, tuple[list[int], torch.dtype]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    source: str,
    frozen_from_elsewhere: bool = False,
) -> None:
    """Give ``model`` (and ``optimizer``) at their layout their parts of the unsharded
    tensors ``groups`` yields (keyed as in a checkpoint; ``shapes``: every key's unsharded
    shape and dtype), strictly: every tensor of the model must be there with its unsharded
    shape (``frozen_from_elsewhere``: except the frozen ones, which stay as they are: a
    LoRA base loaded from its own file), and every model tensor there must belong to the
    model. Optimizer state is restored for the trainable parameters it is found for."""
    inner = unwrap(model)
    tp = _tp(inner)
    targets = {f"{MODEL}{n}": t for n, t in _model_tensors(inner).items()}
    aliases = _alias_keys(inner)
    sources = {}
    for key in targets:
        found = sorted(({key} | aliases.get(key, set())) & set(shapes))
        if found:
            sources[key] = found[0]
    known = set(targets).union(*aliases.values())
    if frozen_from_elsewhere:
        trainable = {f"{MODEL}{n}" for n in _trainable(inner)}
        targets = {k: t for k, t in targets.items() if k in sources or k in trainable}
    missing = sorted(set(targets) - set(sources))
    unexpected = sorted(k for k in shapes if k.startswith(MODEL) and k not in known)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source} does not match the model: missing "
            f"{[k[len(MODEL) :] for k in missing[:10]]}, unexpected "
            f"{[k[len(MODEL) :] for k in unexpected[:10]]}"
        )
    for key, t in targets.items():
        want, have = _full_shape(t, _spec_of(key, tp)), shapes[sources[key]][0]
        if have != want:
            raise ValueError(
                f"checkpoint {source}: {key[len(MODEL) :]} is {have}, the model's {want}"
            )
    slots: dict[str, tuple[nn.Parameter, str]] = {}
    if optimizer is not None:
        params = dict(inner.named_parameters())
        trainable = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for key in shapes:
            name, _, state_key = key[len(OPTIM) :].rpartition("/")
            if key.startswith(OPTIM) and name in params and id(params[name]) in trainable:
                slots[key] = (params[name], state_key)
    for group in groups:
        for key, source_key in sources.items():
            if source_key in group:
                t = targets[key]
                local(t).copy_(_part(group[source_key], t, _spec_of(key, tp), tp))
        for key, (param, state_key) in slots.items():
            if key in group:
                _set_state(optimizer, param, state_key, group[key], _spec_of(key, tp), tp)


def optimizer_by_name(saved: dict, names: list[str]) -> dict[str, Tensor]:
    """A one-process ``optimizer.state_dict()`` (``saved``: its state by position) keyed
    as in a DCP checkpoint, by parameter name: ``names`` lists the names of the parameters
    of its groups, in order."""
    positions = [i for g in saved["param_groups"] for i in g["params"]]
    if len(positions) != len(names):
        raise ValueError(
            f"the saved optimizer holds {len(positions)} parameters, {len(names)} are named"
        )
    out = {}
    for index, name in zip(positions, names, strict=True):
        for key, value in saved["state"].get(index, {}).items():
            out[f"{OPTIM}{name}/{key}"] = value
    return out


def _alias_keys(model: nn.Module) -> dict[str, set[str]]:
    """For each first name of a tied tensor, the other names it is stored under."""
    names: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names.setdefault(id(t), []).append(f"{MODEL}{name}")
    return {group[0]: set(group[1:]) for group in names.values() if len(group) > 1}


def _set_state(optimizer, param: nn.Parameter, key: str, full: Tensor, spec, tp) -> None:
    state = optimizer.state[param]
    if full.dim() == 0:  # AdamW's step: where the optimizer keeps it
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        on_device = group.get("fused") or group.get("capturable")
        state[key] = full.to(local(param).device if on_device else "cpu")
        return
    value = torch.zeros_like(param)  # a DTensor like an FSDP parameter, else a plain tensor
    local(value).copy_(_part(full, param, spec, tp))
    state[key] = value
