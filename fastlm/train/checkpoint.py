"""Checkpoints that lose nothing, written atomically.

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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

_NAME = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name))]  # fmt: skip
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


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
    (``trainer.json``); ``extra(directory)`` may write more files. Afterwards only the
    newest ``keep_last`` checkpoints are kept, and temporary directories left by
    interrupted saves are removed.
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


def write_meta(directory: Path, meta: dict[str, Any],
               extra: Callable[[Path], None] | None) -> list[Path]:  # fmt: skip
    """Write ``trainer.json`` and the caller's extra files; returns the files written."""
    before = set(directory.iterdir())
    (directory / "trainer.json").write_text(json.dumps(meta, indent=1) + "\n")
    if extra is not None:
        extra(directory)
    return sorted(set(directory.iterdir()) - before)


def finish(tmp: Path, root: Path, step: int, keep_last: int | None) -> Path:
    """Rename the complete, flushed ``tmp`` into place as checkpoint ``step``, then drop
    stale temporary directories and all but the newest ``keep_last`` checkpoints."""
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
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    return final


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    file = Path(path) / "trainer.json"
    if not file.is_file():
        raise ValueError(f"{path} is not a fastlm checkpoint (no trainer.json)")
    return json.loads(file.read_text())


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    map_location: torch.device | str = "cpu") -> tuple[dict, dict]:  # fmt: skip
    """Load the weights into ``model`` (strictly: every key, no extras) and return
    ``(state, meta)``. Nothing in the files is executed."""
    path = Path(path)
    meta = read_meta(path)
    safetensors.torch.load_model(
        model, str(path / "model.safetensors"), strict=True, device=str(map_location)
    )
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    return state, meta
