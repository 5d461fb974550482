"""The trainer under ``torchrun``: the process group from torchrun's environment, the
model parallelized from outside (``fastlm.parallel.parallelize``: tensor parallel within
groups of ``tp`` ranks, DDP across them), each data-parallel replica reading its share of
every batch, and checkpoints written as one shard per tensor-parallel rank.

``torchrun --nproc_per_node N -m fastlm.train --tp T [--dp D] ...`` runs the same job as
``fastlm train``; only rank 0 logs, draws the progress bar and writes the shared files.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

import fastlm.train.checkpoint as ckpt
from fastlm.models import loading
from fastlm.parallel import check_consistent, parallelize, unwrap
from fastlm.parallel.checkpoint import save_shard, shard_name
from fastlm.train.config import TrainConfig

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(config: TrainConfig) -> bool:
    """Join the process group torchrun set up (NCCL with one GPU per process, else gloo);
    returns whether the run is distributed. ``--tp``/``--dp`` above 1 need torchrun."""
    if dist.is_initialized():
        return True
    if not launched():
        if config.tp > 1 or config.dp > 1:
            raise ValueError(
                f"tp={config.tp}, dp={config.dp} need one process per rank: "
                f"torchrun --nproc_per_node N -m fastlm.train ..."
            )
        return False
    cuda = config.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=config.dist_timeout)
    )
    return True


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def from_main(make: Callable[[], T]) -> T:
    """``make()``, run by rank 0 alone and sent to every rank (one process, itself)."""
    if not dist.is_initialized():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclasses.dataclass
class Layout:
    """Where this process sits: its tensor-parallel rank and its data-parallel replica."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "dp": self.dp, "world": self.tp * self.dp}


def parallelize_model(model: nn.Module, config: TrainConfig) -> tuple[nn.Module, Layout]:
    """Check that every rank runs the same model and config, then parallelize."""
    world = dist.get_world_size()
    if config.dp and config.tp * config.dp != world:
        raise ValueError(f"tp {config.tp} x dp {config.dp} != world size {world}")
    check_consistent(model, extra=config.to_dict())
    parallel, mesh = parallelize(model, config.tp, config.dp or None, config.sequence_parallel)
    layout = Layout(
        config.tp, world // config.tp, mesh.get_local_rank("tp"), mesh.get_local_rank("dp")
    )
    if config.batch_size % layout.dp:
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {layout.dp} data-parallel replicas"
        )
    return parallel, layout


def save(
    root: Path,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    layout: Layout,
    extra: Any,
    keep_last: int | None,
) -> Path:
    """Checkpoint ``step`` of a distributed run, atomically as on one device: every rank
    writes into one temporary directory (replica 0's tensor-parallel ranks their model
    shard and optimizer state, every rank its RNG state, rank 0 the rest), then rank 0
    renames it into place once all are flushed."""
    rank = dist.get_rank()
    root.mkdir(parents=True, exist_ok=True)
    made = [
        tempfile.mkdtemp(prefix=f"{ckpt.TMP_PREFIX}{loading.checkpoint_name(step)}-", dir=root)
        if rank == 0
        else None
    ]
    dist.broadcast_object_list(made, src=0)
    tmp = Path(made[0])
    written = [tmp / f"rng-{rank:03d}.pt"]
    torch.save(state["rng"], written[0])
    if layout.dp_rank == 0:
        written.append(save_shard(model, tmp))
        written.append(tmp / f"state-tp{layout.tp_rank:02d}.pt")
        torch.save({k: v for k, v in state.items() if k != "rng"}, written[-1])
    if rank == 0:
        written += ckpt.write_meta(tmp, {**meta, "parallel": layout.to_dict()}, extra)
    for f in written:
        ckpt.fsync(f)
    dist.barrier()
    if rank == 0:
        ckpt.finish(tmp, root, step, keep_last)
    dist.barrier()
    return root / loading.checkpoint_name(step)


def require_layout(path: Path, layout: Layout | None) -> dict[str, Any]:
    """The checkpoint's metadata, if it was written with ``layout`` (None: one device),
    which resuming needs (the optimizer state is sharded as the model was)."""
    meta = loading.read_meta(path)
    saved, mine = meta.get("parallel"), layout.to_dict() if layout is not None else None
    if saved != mine:
        raise ValueError(
            f"checkpoint {path} was written with layout {saved or 'one device'}; "
            f"resuming needs the same (this run: {mine or 'one device'}). Its "
            f"weights load at any layout: fastlm.parallel.checkpoint."
            f"load_sharded"
        )
    return meta


def load(
    path: Path, model: nn.Module, layout: Layout, map_location: torch.device
) -> tuple[dict, dict]:
    """Resume a distributed run from its checkpoint (written with the same layout): each
    rank reads its own files."""
    meta = require_layout(path, layout)
    name = shard_name(layout.tp_rank, layout.tp) if layout.tp > 1 else "model.safetensors"
    ckpt.load_weights(path, name, unwrap(model), map_location)
    state = ckpt.read_state(path, f"state-tp{layout.tp_rank:02d}.pt", map_location)
    if isinstance(state, dict):
        state["rng"] = ckpt.read_state(path, f"rng-{dist.get_rank():03d}.pt")
    return state, meta
