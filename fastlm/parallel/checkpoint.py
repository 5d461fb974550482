"""A checkpoint's weights into a model at any layout (tensor-parallel size, FSDP, or one
device), or exported as one single-file model, whichever wrote them: a distributed run
(DCP files, ``fastlm.parallel.dcp``) or a single-device one (``model.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
from torch import Tensor, nn

from fastlm.parallel import dcp


def consolidate(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The full (unsharded) tensors of the model in checkpoint ``directory``, by name
    (tied weights once), on the CPU."""
    directory = Path(directory)
    sharded = dcp.find(directory)
    if sharded is not None:
        return dcp.model_state(sharded)
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{directory} holds no model.safetensors and no DCP checkpoint")
    return safetensors.torch.load_file(str(single))


def load_sharded(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load the weights of checkpoint ``directory`` into ``model`` at its layout (one
    device, tensor parallel, FSDP): each rank keeps its part of the full tensors. Strict:
    every tensor of the model must be found, and every tensor found must belong to the
    model."""
    sharded = dcp.find(directory)
    if sharded is not None:
        dcp.load(sharded, model)
        return
    full = {f"{dcp.MODEL}{k}": v for k, v in consolidate(directory).items()}
    shapes = {k: (list(v.shape), v.dtype) for k, v in full.items()}
    dcp.load_full([full], shapes, model, None, str(directory))


def export(directory: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the model of checkpoint ``directory`` as one unsharded ``.safetensors`` file
    at ``path`` (what ``safetensors.torch.load_model`` reads into a single-device model,
    and ``generate``, ``from_hf``/``to_hf`` and other tools take)."""
    path = Path(path)
    safetensors.torch.save_file(consolidate(directory), str(path))
    return path
