"""A run directory belongs to one run, and a resumed run is the run its checkpoint saved.

The one place where a run's identity is checked, for ``fastlm train``, ``fastlm finetune``
and :class:`~fastlm.train.Trainer` alike:

- :func:`claim`: before a run writes anything, its ``out_dir`` must hold no other run
  (``--overwrite`` deletes the old run's files, and only those), or be the directory of
  the checkpoint it resumes; stale temporary directories of killed saves are removed;
- :func:`read_run_meta`: ``trainer.json`` is checked field by field (types, ranges, the
  training and model configs) before anything is taken from it;
- :func:`check_same_run`: the model config (every field) and the tokenizer (its
  fingerprint) of the resuming run equal the checkpoint's;
- :func:`from_arguments`: ``fastlm train``'s flags over a config file over the resumed
  run's own settings.

Each refusal is one line naming the file or the difference.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastlm.train.checkpoint as ckpt
import fastlm.train.distributed as distributed
from fastlm.data import Tokenizer
from fastlm.models import loading
from fastlm.train.config import LAYOUT, PRECISIONS, TrainConfig


def resume_path(out_dir: Path, where: str | os.PathLike) -> Path:
    """The checkpoint ``--resume`` names: ``"latest"`` (``out_dir``'s newest) or a path."""
    if where != "latest":
        return Path(where)
    latest = loading.latest_checkpoint(out_dir / "checkpoints")
    if latest is None:
        raise ValueError(f"--resume latest: {out_dir / 'checkpoints'} holds no checkpoint")
    return latest


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file; expected a directory")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out-dir {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out}: no permission to write into {existing}")


def _holds(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def claim(
    out_dir: str | os.PathLike,
    resume: str,
    overwrite: bool,
    run_files: Sequence[str],
    dry_run: bool = False,
    resumable: bool = True,
) -> Path | None:
    """Make ``out_dir`` this run's before it writes anything; returns the checkpoint to
    resume (``resume``: "" for none, "latest" or a path), or None for a new run.

    A new run (or one resumed from a checkpoint in another directory) starts in a
    directory holding none of ``run_files`` (the names a run writes there), unless
    ``overwrite``, which deletes those (and nothing else). A run resumed from one of
    ``out_dir``'s own checkpoints continues there. ``dry_run`` only checks: a job's early
    refusal, before its slow set-up. ``resumable``: the refusal suggests ``--resume``.
    """
    out = Path(out_dir)
    _check_writable(out)
    path = resume_path(out, resume) if resume else None
    continuing = path is not None and path.resolve().parent == (out / "checkpoints").resolve()
    if continuing and overwrite:
        raise ValueError(f"--overwrite would delete {path}, the checkpoint --resume continues")
    present = [] if continuing else [name for name in run_files if _holds(out / name)]
    if present and not overwrite:
        resume_it = "continue it with --resume latest, or " if resumable else ""
        raise ValueError(
            f"--out-dir {out} holds a run already ({', '.join(present)}): {resume_it}delete "
            f"it and start afresh with --overwrite"
        )
    if dry_run:
        return path
    distributed.barrier()  # every rank has looked before the first one deletes
    if distributed.is_main():
        for name in present:
            old = out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        ckpt.remove_stale(out / "checkpoints")
    distributed.barrier()
    return path


# -- what a checkpoint says ------------------------------------------------------------------


def init_fields(config: Any) -> dict[str, Any]:
    """A model config's constructor fields (the derived ones follow from them)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def read_run_meta(path: Path) -> dict[str, Any]:
    """``trainer.json`` of checkpoint ``path``, every field checked: ``step`` (the
    directory's) and ``tokens_seen`` ints >= 0, the sampler state an object, the precision
    a trained one, ``config`` a valid :class:`TrainConfig`, ``model`` a fastlm model config
    (or null)."""
    meta = loading.read_meta(path)

    def bad(problem: str) -> loading.CheckpointError:
        return loading.unusable(path, "trainer.json", problem)

    missing = [
        k
        for k in ("step", "tokens_seen", "sampler", "precision", "config", "model")
        if k not in meta
    ]
    if missing:
        raise bad(f"lacks {', '.join(map(repr, missing))}")
    for key in ("step", "tokens_seen"):
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{key!r} must be an int >= 0, got {value!r}")
    named = loading.step_of(path)
    if named is not None and named != meta["step"]:
        raise bad(f"'step' is {meta['step']}, but the directory is {path.name}")
    if not isinstance(meta["sampler"], dict):
        raise bad(f"'sampler' must be an object, got {meta['sampler']!r}")
    if meta["precision"] not in PRECISIONS or meta["precision"] == "auto":
        raise bad(f"'precision' must be fp32, bf16 or fp16, got {meta['precision']!r}")
    try:
        TrainConfig.from_dict(meta["config"])
    except ValueError as e:
        raise bad(f"'config': {e}") from None
    if meta["model"] is not None:
        loading.model_config_of(meta, path)
    if not isinstance(meta.get("parallel"), (dict, type(None))):
        raise bad(f"'parallel' must be an object, got {meta['parallel']!r}")
    return meta


def check_same_run(
    path: Path,
    meta: dict[str, Any],
    model_config: Any,
    module: str | None,
    tokenizer: Tokenizer | None,
) -> None:
    """Refuse to resume checkpoint ``path`` (``meta`` read by :func:`read_run_meta`) with a
    model config (unchecked when it is not a dataclass) or tokenizer other than the
    checkpoint's; ``module`` (the model's class name, if known) as well."""
    saved = meta["model"]
    if saved is not None and dataclasses.is_dataclass(model_config):
        mine = type(model_config).__name__
        if saved["class"] != mine:
            raise ValueError(
                f"--resume {path}: the checkpoint's model config is a "
                f"{saved['class']}, this run's a {mine}"
            )
        if module is not None and saved.get("module", module) != module:
            raise ValueError(
                f"--resume {path}: the checkpoint holds a {saved['module']}, "
                f"this run builds a {module}"
            )
        old = init_fields(loading.model_config_of(meta, path))
        new = init_fields(model_config)
        differ = [k for k in old if old[k] != new[k]]
        if differ:
            raise ValueError(
                f"--resume {path}: the checkpoint's model has "
                f"{', '.join(f'{k}={old[k]!r}' for k in differ)}, this run's config "
                f"{', '.join(f'{k}={new[k]!r}' for k in differ)}"
            )
    if tokenizer is not None:
        file = path / "tokenizer.json"
        if not file.is_file():
            raise loading.unusable(path, file.name, "missing (this run's tokenizer must equal it)")
        difference = tokenizer.difference(Tokenizer.load(file))
        if difference is not None:
            raise ValueError(
                f"--resume {path}: this run's tokenizer is not the checkpoint's ({difference})"
            )


# -- the flags of `fastlm train`: a resumed run continues with its own settings ----------------


def from_arguments(args: argparse.Namespace) -> TrainConfig:
    """Defaults < the resumed checkpoint's settings < the config file < the flags given: so
    ``fastlm train --out-dir X --resume latest`` continues run X with its own settings."""
    given = {k: v for k, v in vars(args).items() if k != "config"}
    base = TrainConfig.from_file(args.config).to_dict() if args.config else {}
    merged = {**base, **given}
    if merged.get("resume"):
        out_dir = Path(merged.get("out_dir", TrainConfig.out_dir))
        saved = read_run_meta(resume_path(out_dir, merged["resume"]))["config"]
        # A run saved before data cleaning existed continues on the data it began on.
        saved.setdefault("clean_data", False)
        saved.pop("overwrite", None)  # what began that run, not a setting of it
        for name in LAYOUT:  # this launch's, not the saved run's
            saved.pop(name, None)
        merged = {**saved, **merged}
    return TrainConfig.from_dict(merged)
