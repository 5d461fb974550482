"""Sharded model checkpoints: each tensor-parallel rank writes its own shard, and a
checkpoint written at one tensor-parallel size loads at any other (or on one device), or
exports to a single-file model.

A shard is ``model-tp<r>-of-<n>.safetensors``: the rank's tensors under their usual names,
and in the file's metadata how each was cut (dimension, full size, the positions held, as
runs) or that rank 0 owns it; tensors not described are replicated. Loading reassembles the
full tensors from every shard and cuts them again for the model at hand, by its own
``tp_layout``; a single-device ``model.safetensors`` loads the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from fastlm.parallel.layers import Owned, Shard, Spec
from fastlm.parallel.parallelize import unwrap

_META_KEY = "fastlm_tensor_parallel"


def shard_name(rank: int, size: int) -> str:
    return f"model-tp{rank:02d}-of-{size:02d}.safetensors"


def _runs(index: Tensor) -> list[list[int]]:
    """``index`` as ``[start, stop)`` runs of consecutive positions."""
    values = index.tolist()
    runs: list[list[int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, v + 1])
    return runs


def _index(runs: list[list[int]]) -> Tensor:
    return torch.cat([torch.arange(a, b) for a, b in runs])


def _describe(spec: Spec) -> dict:
    if isinstance(spec, Owned):
        return {"owned": True}
    return {"dim": spec.dim, "full": spec.full, "runs": _runs(spec.index)}


def save_shard(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write this rank's shard of tensor-parallel ``model`` (or the whole of an unsharded
    one, as ``model.safetensors``) into ``directory``; returns the file."""
    inner = unwrap(model)
    layout = getattr(inner, "tp_layout", None)
    if layout is None:
        path = Path(directory) / "model.safetensors"
        safetensors.torch.save_model(inner, str(path))
        return path
    path = Path(directory) / shard_name(layout.rank, layout.size)
    meta = {
        "rank": layout.rank,
        "size": layout.size,
        "specs": {name: _describe(spec) for name, spec in layout.specs.items()},
    }
    safetensors.torch.save_model(inner, str(path), metadata={_META_KEY: json.dumps(meta)})
    return path


def _shard_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("model-tp*-of-*.safetensors"))
    if not files:
        return []
    size = int(files[0].name.split("-of-")[1].split(".")[0])
    expected = [directory / shard_name(r, size) for r in range(size)]
    if files != expected:
        raise ValueError(
            f"{directory} holds shards {[f.name for f in files]}, expected "
            f"{[f.name for f in expected]}"
        )
    return files


def consolidate(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The full (unsharded) tensors of the checkpoint in ``directory``, by name (tied
    weights once), on the CPU."""
    directory = Path(directory)
    files = _shard_files(directory)
    if not files:
        single = directory / "model.safetensors"
        if not single.is_file():
            raise ValueError(f"{directory} holds no model.safetensors and no model shards")
        return safetensors.torch.load_file(str(single))
    shards, metas = [], []
    for f in files:
        with safetensors.safe_open(str(f), "pt") as handle:
            metas.append(json.loads(handle.metadata()[_META_KEY]))
        shards.append(safetensors.torch.load_file(str(f)))
    full: dict[str, Tensor] = {}
    for name, first in shards[0].items():
        spec = metas[0]["specs"].get(name)
        if spec is None or spec.get("owned"):  # replicated, or rank 0's
            full[name] = first
            continue
        shape = list(first.shape)
        shape[spec["dim"]] = spec["full"]
        out = first.new_empty(shape)
        for tensors, meta in zip(shards, metas, strict=True):
            part = meta["specs"][name]
            out.index_copy_(part["dim"], _index(part["runs"]), tensors[name])
        full[name] = out
    return full


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """State-dict names of each tensor stored under several names (tied weights)."""
    by_storage: dict[tuple, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        by_storage.setdefault((t.data_ptr(), tuple(t.shape)), []).append(name)
    return {names[0]: names for names in by_storage.values() if len(names) > 1}


def load_sharded(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load the checkpoint in ``directory`` (sharded at any tensor-parallel size, or a
    single ``model.safetensors``) into ``model``, unsharded or tensor-parallel: the full
    tensors are reassembled, then cut by ``model.tp_layout``. Strict: every tensor of the
    model must be found, and every tensor found must belong to the model."""
    inner = unwrap(model)
    full = consolidate(directory)
    for names in _aliases(inner).values():
        present = [n for n in names if n in full]
        if present:
            for n in names:
                full.setdefault(n, full[present[0]])
    layout = getattr(inner, "tp_layout", None)
    if layout is not None:
        for name, spec in layout.specs.items():
            if name not in full:
                continue
            if isinstance(spec, Shard):
                full[name] = full[name].index_select(spec.dim, spec.index)
            elif isinstance(spec, Owned) and layout.rank != 0:
                full[name] = torch.zeros_like(full[name])
    own = inner.state_dict()
    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {directory} does not match the model: missing "
            f"{missing[:10]}, unexpected {unexpected[:10]}"
        )
    inner.load_state_dict(full)


def export(directory: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the checkpoint in ``directory`` as one unsharded ``.safetensors`` file at
    ``path`` (what ``safetensors.torch.load_model`` reads into a single-device model)."""
    path = Path(path)
    safetensors.torch.save_file(consolidate(directory), str(path))
    return path
