"""The trainer under ``torchrun``: the process group from torchrun's environment, the
model parallelized from outside (``fastlm.parallel.parallelize``: tensor parallel within
groups of ``tp`` ranks; DDP across them, or FSDP2 with ``--fsdp``, hybrid with
``--dp-replicate``), each data-parallel replica reading its share of every batch, and
checkpoints through DCP that resume at any layout.

``torchrun --nproc_per_node N -m fastlm.train [--tp T] [--dp D] [--fsdp] ...`` runs the
same job as ``fastlm train``; only rank 0 logs, draws the progress bar and writes the
shared files. Several machines: torchrun's rendezvous (``--nnodes``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

import fastlm.parallel.dcp as sharded_state
import fastlm.train.checkpoint as ckpt
from fastlm.models import loading
from fastlm.parallel import check_consistent, data_parallel_layout, parallelize
from fastlm.train.config import TrainConfig

T = TypeVar("T")
# Where a distributed run's checkpoint keeps its DCP files (readers find them by DCP's
# metadata file, fastlm.parallel.dcp.find).
SHARDED_DIR = "dcp"


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(config: TrainConfig) -> bool:
    """Join the process group torchrun set up (NCCL with one GPU per process, else gloo);
    returns whether the run is distributed. ``--tp``/``--dp`` above 1 need torchrun."""
    if dist.is_initialized():
        return True
    if not launched():
        if config.tp > 1 or config.dp > 1 or config.fsdp:
            raise ValueError(
                f"tp={config.tp}, dp={config.dp}, fsdp={config.fsdp} need one process per "
                f"rank: torchrun --nproc_per_node N -m fastlm.train ..."
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
    """Where this process sits: its tensor-parallel rank and its data-parallel replica
    (``dp`` of them; with ``fsdp``, the model sharded over them, in ``dp_replicate``
    groups)."""

    tp: int
    dp: int
    tp_rank: int
    dp_rank: int
    fsdp: bool = False
    dp_replicate: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "dp": self.dp,
            "world": self.tp * self.dp,
            "fsdp": self.fsdp,
            "dp_replicate": self.dp_replicate,
        }


def parallelize_model(
    model: nn.Module, config: TrainConfig, precision: str
) -> tuple[nn.Module, Layout]:
    """Check that every rank runs the same model and config, then parallelize (with FSDP,
    ``precision`` bf16 gathers the parameters in bf16 and reduces gradients in fp32)."""
    world = dist.get_world_size()
    if config.dp and config.tp * config.dp != world:
        raise ValueError(f"tp {config.tp} x dp {config.dp} != world size {world}")
    check_consistent(model, extra=config.to_dict())
    fsdp = {}
    if config.fsdp:
        fsdp = dict(
            fsdp=True,
            dp_replicate=config.dp_replicate,
            param_dtype=torch.bfloat16 if precision == "bf16" else None,
            reshard_after_forward=config.reshard_after_forward,
            cpu_offload=config.cpu_offload,
        )
    parallel, mesh = parallelize(
        model, config.tp, config.dp or None, config.sequence_parallel, **fsdp
    )
    dp = data_parallel_layout(mesh)
    tp_rank = mesh.get_local_rank("tp")
    layout = Layout(config.tp, dp.size, tp_rank, dp.rank, dp.fsdp, dp.replicate)
    if config.batch_size % layout.dp:
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {layout.dp} data-parallel replicas"
        )
    return parallel, layout


class Checkpointer:
    """Checkpoints of a distributed run, atomically as on one device: every rank writes
    into one temporary directory (its part of the model and AdamW state through DCP,
    ``fastlm.parallel.dcp``, and its RNG state; rank 0 the schedule, loss scale, optimizer
    settings and the shared files), then rank 0 renames it into place once all are on
    disk. With ``async_save`` the tensors are copied to host memory and written in the
    background over a gloo group of their own; the rename waits for them, at the next
    save or at :meth:`wait`."""

    def __init__(self, root: Path, keep_last: int | None, async_save: bool) -> None:
        self.root, self.keep_last = root, keep_last
        self.group = dist.new_group(backend="gloo") if async_save else None
        self.pending: tuple[Any, Path, int] | None = None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        meta: dict[str, Any],
        layout: Layout,
        extra: Any,
    ) -> Path:
        self.wait()
        rank = dist.get_rank()
        self.root.mkdir(parents=True, exist_ok=True)
        made = [
            tempfile.mkdtemp(
                prefix=f"{ckpt.TMP_PREFIX}{loading.checkpoint_name(step)}-", dir=self.root
            )
            if rank == 0
            else None
        ]
        dist.broadcast_object_list(made, src=0)
        tmp = Path(made[0])
        written = [tmp / f"rng-{rank:03d}.pt"]
        torch.save(state["rng"], written[0])
        if rank == 0:
            shared = {k: v for k, v in state.items() if k != "rng"}
            torch.save(shared, tmp / "state.pt")
            written.append(tmp / "state.pt")
            written += ckpt.write_meta(tmp, {**meta, "parallel": layout.to_dict()}, extra)
        for f in written:
            ckpt.fsync(f)
        future = sharded_state.save(tmp / SHARDED_DIR, model, optimizer, async_group=self.group)
        if future is None:
            self._finish(tmp, step)
        else:
            self.pending = (future, tmp, step)
        return self.root / loading.checkpoint_name(step)

    def _finish(self, tmp: Path, step: int) -> None:
        dist.barrier()  # every rank's files are flushed
        if dist.get_rank() == 0:
            for f in (tmp / SHARDED_DIR).iterdir():
                ckpt.fsync(f)
            ckpt.finish(tmp, self.root, step, self.keep_last)
        dist.barrier()

    def wait(self) -> None:
        """Finish the background save in flight, if any (on every rank)."""
        if self.pending is not None:
            future, tmp, step = self.pending
            self.pending = None
            future.result()
            self._finish(tmp, step)


def is_sharded(path: Path) -> bool:
    """Whether checkpoint ``path`` was written by a distributed run (DCP)."""
    return (path / SHARDED_DIR).is_dir()


def load(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    layout: Layout | None,
) -> dict[str, Any]:
    """Restore ``model`` and ``optimizer`` at this run's layout (``None``: one process)
    from checkpoint ``path``, written by a distributed run at any layout, or by one
    process (its ``model.safetensors`` and positional optimizer state); returns the rest
    of the state (schedule, loss scale, optimizer settings, this rank's RNG state, which
    is the same rank's of the run that saved, else None)."""
    if is_sharded(path):
        sharded_state.load(path / SHARDED_DIR, model, optimizer)
        state = ckpt.read_state(path, "state.pt")
    else:
        ckpt.check_weights(path)
        state = ckpt.read_state(path, "state.pt")
        weights = safetensors.torch.load_file(str(path / "model.safetensors"))
        full = {f"{sharded_state.MODEL}{k}": v for k, v in weights.items()}
        state = state if isinstance(state, dict) else {}
        names = state.get("optimizer_names")
        if not isinstance(state.get("optimizer"), dict) or not isinstance(names, list):
            raise loading.unusable(
                path,
                "state.pt",
                "names no parameters of its optimizer state (written before fastlm recorded "
                "them: it resumes on one process only)",
            )
        full.update(sharded_state.optimizer_by_name(state["optimizer"], names))
        shapes = {k: (list(v.shape), v.dtype) for k, v in full.items()}
        sharded_state.load_full([full], shapes, model, optimizer, str(path))
        state["optimizer_groups"] = state.pop("optimizer")["param_groups"]
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = path / f"rng-{rank:03d}.pt"
    if own.is_file():
        state["rng"] = ckpt.read_state(path, own.name)
    elif rank:  # a rank the saving run did not have (a one-process run's is rank 0's)
        state["rng"] = None
    return state
