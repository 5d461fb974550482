"""Loading a saved model: the checkpoint directories ``fastlm train`` writes
(``step-00000100/`` under a run's ``checkpoints/``), read without trusting them, and the
model and tokenizer they hold.

A checkpoint directory holds ``trainer.json`` (the model's config and class among them),
the weights (``model.safetensors``, or a tensor-parallel run's shards) and
``tokenizer.json``; :mod:`fastlm.train.checkpoint` writes them. Every file is checked
before it is used: a file that is missing, empty, truncated or not what its name says
raises :class:`CheckpointError` naming it and the previous checkpoint to fall back to.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from fastlm.data.tokenizer import Tokenizer
from fastlm.models import presets
from fastlm.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.t5 import T5, T5Config

# The model configs and modules a checkpoint may record (trainer.json's "model").
CONFIGS = {c.__name__: c for c in (GPTConfig, BertConfig, T5Config)}
MODULES = {m.__name__: m for m in (GPT, BertForMaskedLM, BertForSequenceClassification, T5)}


_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: a file missing, unreadable or not matching."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint directory's name says, or None for another name."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def checkpoints_by_step(root: Path) -> dict[int, Path]:
    """The complete checkpoints directly under ``root``, by step."""
    if not root.is_dir():
        return {}
    return {s: p for p in root.iterdir() if p.is_dir() and (s := step_of(p)) is not None}


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary directories ignored)."""
    return [p for _, p in sorted(checkpoints_by_step(Path(root)).items())]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` if it is a checkpoint, else the newest checkpoint of the run directory
    ``path``."""
    path = Path(path)
    if (path / "trainer.json").is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with one")
    return latest


def unusable(path: Path, file: str, problem: str) -> CheckpointError:
    """The error for ``file`` of checkpoint ``path``, naming the checkpoint before it."""
    mine, steps = step_of(path), checkpoints_by_step(path.parent)
    earlier = [steps[s] for s in sorted(steps) if mine is not None and s < mine]
    if earlier:
        fallback = f"the previous checkpoint is {earlier[-1]}"
    else:
        fallback = "there is no earlier checkpoint to fall back to"
    return CheckpointError(f"{path / file}: {problem}; {fallback}")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``trainer.json`` of checkpoint ``path``: a JSON object (its fields are the writer's
    to check)."""
    path = Path(path)
    file = path / "trainer.json"
    if not file.is_file():
        raise CheckpointError(f"{path} is not a fastlm checkpoint (no trainer.json)")
    try:
        meta = json.loads(file.read_text())
    except ValueError as e:  # not UTF-8, or not JSON
        raise unusable(path, file.name, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise unusable(path, file.name, f"expected a JSON object, got {type(meta).__name__}")
    return meta


def _check_sharded(path: Path, where: Path) -> None:
    """The DCP checkpoint in ``where`` (a subdirectory of checkpoint ``path``) is whole: its
    ``.metadata`` (written last) reads, and every file it points into is present and long
    enough."""
    from torch.distributed.checkpoint import FileSystemReader

    name = f"{where.name}/.metadata"
    if not (where / ".metadata").is_file():
        raise unusable(path, name, "missing (the save did not finish)")
    try:
        metadata = FileSystemReader(str(where)).read_metadata()
    except Exception as e:  # a truncated pickle raises any of several types
        raise unusable(path, name, f"unreadable ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for file, end in sorted(needed.items()):
        size = (where / file).stat().st_size if (where / file).is_file() else None
        if size is None or size < end:
            problem = "missing" if size is None else f"truncated ({size} of {end} bytes)"
            raise unusable(path, f"{where.name}/{file}", problem)


def check_weights(path: Path) -> None:
    """Every weight file of checkpoint ``path`` (``model.safetensors``, or a distributed
    run's DCP files in a subdirectory) is present and whole: a safetensors header parses
    and covers the file exactly; DCP's metadata reads and its files hold what it points
    to."""
    sharded = sorted({f.parent for part in ("*/*.distcp", "*/.metadata") for f in path.glob(part)})
    for where in sharded:
        _check_sharded(path, where)
    if sharded:
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise unusable(path, "model.safetensors", "missing")
    for file in files:
        try:
            with safetensors.safe_open(str(file), "pt"):
                pass
        except Exception as e:  # safetensors' SafetensorError derives from Exception only
            raise unusable(path, file.name, f"truncated or not a safetensors file ({e})") from None


def mismatch(error: RuntimeError) -> str:
    """torch's ``load_state_dict`` error (one line per problem, every key listed) as one
    short line."""
    problems = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    first = problems[0] if problems else str(error)
    first = first if len(first) <= 200 else first[:200] + "..."
    return first + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def model_config_of(meta: dict[str, Any], path: Path) -> Any:
    """The model config trainer.json's ``model`` entry records, checked."""
    model = meta["model"]

    def bad(problem: str) -> CheckpointError:
        return unusable(path, "trainer.json", f"'model': {problem}")

    if not isinstance(model, dict) or not isinstance(model.get("fields"), dict):
        raise bad(f"expected an object with 'class' and 'fields', got {model!r}")
    if model.get("class") not in CONFIGS:
        raise bad(f"class must be one of {', '.join(CONFIGS)}, got {model.get('class')!r}")
    if "module" in model and model["module"] not in MODULES:
        raise bad(f"module must be one of {', '.join(MODULES)}, got {model['module']!r}")
    try:
        return CONFIGS[model["class"]](**model["fields"])
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None


def model_of(checkpoint: str | os.PathLike) -> nn.Module:
    """A freshly initialized model of the config (and model class) checkpoint directory
    ``checkpoint`` records (what inference needs of trainer.json; resuming checks all of
    it)."""
    path = Path(checkpoint)
    meta = read_meta(path)
    if meta.get("model") is None:
        raise CheckpointError(f"checkpoint {path} does not hold a fastlm model config")
    config = model_config_of(meta, path)
    # Older checkpoints do not record the module: the config's model is the preset's.
    module = MODULES.get(meta["model"].get("module"))
    return module(config) if module is not None else presets.create(config)


def load_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    load_weights: Callable[[nn.Module, Path], None],
) -> tuple[nn.Module, Tokenizer]:
    """The model and tokenizer of a checkpoint directory, or of a run directory (its newest
    checkpoint). Every file is checked before it is used (CheckpointError names the one
    that is not whole).

    ``load_weights(model, directory)`` fills the fresh model from the checkpoint's weight
    files, strictly: :func:`fastlm.parallel.checkpoint.load_sharded`, which also reassembles
    a tensor-parallel run's shards (the parallel layer sits above the models, so the caller
    hands it in)."""
    path = checkpoint_dir(path)
    model = model_of(path)
    check_weights(path)
    try:
        load_weights(model, path)
    except RuntimeError as e:  # shapes other than trainer.json's model config says
        raise CheckpointError(
            f"{path}: the weights do not fit the model its trainer.json describes: {mismatch(e)}"
        ) from None
    return model.to(device).eval(), Tokenizer.load(path / "tokenizer.json")
