"""Checkpoints that lose nothing, written atomically, read without trusting them.

A checkpoint is a directory ``step-00000100/`` holding

- ``model.safetensors``: the weights (tied weights stored once);
- ``state.pt``: optimizer, scheduler and loss-scaler state and the RNG states (CPU and every
  CUDA device): tensors, numbers and containers only, read back with
  ``torch.load(weights_only=True)``, which never executes code from the file;
- ``trainer.json``: step, data position, the training and model configs;
- whatever else the caller adds (the tokenizer).

It is written into a hidden temporary directory beside it, every file flushed to disk, then
renamed into place: a process killed during a save leaves at most a stale temporary
directory, never a half-written checkpoint, and the previous checkpoint untouched.

Reading checks every file before using it: a file that is missing, empty, truncated or not
what its name says raises :class:`CheckpointError` naming it and the previous checkpoint
to fall back to. The directory names and those checks are :mod:`fastlm.models.loading`'s,
shared with loading a saved model for inference.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from fastlm.models.loading import (
    CheckpointError,
    check_weights,
    checkpoint_name,
    checkpoints_by_step,
    mismatch,
    read_meta,
    unusable,
)

TMP_PREFIX = ".tmp-"


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    state: dict[str, Any],
    meta: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically and return its path.

    ``state`` holds tensors and plain containers (``state.pt``), ``meta`` JSON values
    (``trainer.json``); ``extra(directory)`` may write more files. Afterwards old
    checkpoints are pruned as :func:`finish` says.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{checkpoint_name(step)}-", dir=root))
    try:
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        write_meta(tmp, meta, extra)
        for f in tmp.iterdir():
            fsync(f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish(tmp, root, step, keep_last)


def write_meta(
    directory: Path, meta: dict[str, Any], extra: Callable[[Path], None] | None
) -> list[Path]:
    """Write ``trainer.json`` and the caller's extra files; returns the files written."""
    before = set(directory.iterdir())
    (directory / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
    if extra is not None:
        extra(directory)
    return sorted(set(directory.iterdir()) - before)


def remove_stale(root: Path) -> None:
    """Delete the temporary directories that saves killed half-way left under ``root``."""
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def finish(tmp: Path, root: Path, step: int, keep_last: int | None) -> Path:
    """Rename the complete, flushed ``tmp`` into place as checkpoint ``step``, then prune.

    Checkpoints of later steps are deleted: they continued this run from a point before
    ``step`` that it was since resumed from, and ``--resume latest`` must not return to
    them. Of the earlier ones, the newest ``keep_last - 1`` stay beside the new one (which
    is never deleted).
    """
    try:
        fsync(tmp)
        final = root / checkpoint_name(step)
        if final.exists():  # saving a step again (after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale(root)
    found = checkpoints_by_step(root)
    earlier = [p for s, p in sorted(found.items()) if s < step]
    doomed = [p for s, p in found.items() if s > step]
    if keep_last is not None:
        doomed += earlier[: max(len(earlier) - keep_last + 1, 0)]
    for old in doomed:
        shutil.rmtree(old)
    return final


# -- reading ---------------------------------------------------------------------------------


def read_state(path: Path, name: str, map_location: torch.device | str = "cpu") -> Any:
    """``torch.load`` of file ``name`` of checkpoint ``path``: tensors, numbers and plain
    containers only; anything else is refused without running it."""
    file = path / name
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise unusable(path, name, "missing") from None
    except EOFError:
        raise unusable(path, name, "empty") from None
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: never here
        problem = "holds objects other than tensors and plain containers, refused unrun"
        raise unusable(path, name, problem) from None
    except RuntimeError as e:  # the zip reader: truncated, or not torch.save's format
        reason = str(e).split(". ")[0]
        raise unusable(path, name, f"truncated or not a torch.save file ({reason})") from None


def load_weights(path: Path, name: str, model: nn.Module, device: torch.device | str) -> None:
    """Load weight file ``name`` of checkpoint ``path`` into ``model``, strictly: every
    tensor, no extras, the same shapes."""
    check_weights(path)
    try:
        safetensors.torch.load_model(model, str(path / name), strict=True, device=str(device))
    except RuntimeError as e:
        raise CheckpointError(f"{path / name} does not fit the model: {mismatch(e)}") from None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, map_location: torch.device | str = "cpu"
) -> tuple[dict, dict]:
    """Load the weights into ``model`` (strictly: every key, no extras) and return
    ``(state, meta)``. Nothing in the files is executed."""
    path = Path(path)
    meta = read_meta(path)
    load_weights(path, "model.safetensors", model, map_location)
    return read_state(path, "state.pt", map_location), meta
