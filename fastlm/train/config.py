"""``TrainConfig``: every setting of a training run, typed, with its validation, and its
loading from a YAML/JSON file and from ``fastlm train`` flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run. The defaults train a small GPT on the built-in corpus in a
    few minutes on a 2-core CPU (``fastlm train`` with no arguments)."""

    # Model: a family ("gpt", "bert", "t5": small CPU-sized defaults, see fastlm.train.run)
    # or any preset name of fastlm.models.presets, with config fields overridden on top.
    model: str = "gpt"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Data: text (.txt) / JSONL files or directories; empty: the built-in corpus (docstrings
    # of Python's standard library, no download).
    data: list[str] = dataclasses.field(default_factory=list)
    text_field: str = "text"  # the JSONL field holding a document's text
    tokenizer: str | None = None  # a tokenizer.json; None: train a byte-level BPE on the data
    vocab_size: int = 4096  # of the BPE trained when no tokenizer is given
    val_fraction: float = 0.02  # documents held out for validation
    # Cleaning before the split (fastlm.data.pipeline, as `fastlm data clean`): clean_data
    # normalizes (Unicode, whitespace), drops exact duplicates and reports validation
    # documents that duplicate training ones; the other three switch steps within it. The
    # Gopher-style quality filters are off by default: tuned for web text, they would drop
    # 7 % of the built-in corpus, mostly docstrings full of doctests.
    clean_data: bool = True
    scrub_pii: bool = True
    near_dedup: bool = True
    filter_data: bool = False
    seq_len: int = 128
    # Optimization.
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: str = "cosine"
    weight_decay: float = 0.1  # not applied to norms, biases and embeddings
    betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # Parallelism, under torchrun (fastlm.parallel): tensor-parallel ranks per model replica,
    # data-parallel replicas (0: the rest of the world), sequence parallelism in the tensor-
    # parallel groups, and the timeout of every collective (a hung rank fails, not hangs).
    tp: int = 1
    dp: int = 0
    sequence_parallel: bool = False
    dist_timeout: int = 600  # seconds
    # Precision and memory. auto: bf16 autocast on GPUs that support it, else fp32.
    precision: str = "auto"
    checkpointing: int = 0  # activation checkpointing: 0 none, 1 every block, n every n-th
    # Evaluation, logging, checkpoints.
    eval_every: int = 100  # steps between validation passes (and one at the end)
    eval_batches: int = 16  # batches per validation pass (fewer if the split is smaller)
    log_every: int = 10
    save_every: int = 100  # steps between checkpoints (and one at the end)
    keep_last: int = 2  # checkpoints kept
    out_dir: str = "runs/fastlm"
    # "" starts afresh; "latest" continues from out_dir's newest checkpoint; or a path.
    resume: str = ""
    # A new run refuses an out_dir holding another run; overwrite deletes that run first.
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu; or cpu, cuda, cuda:N
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "seq_len",
            "batch_size",
            "grad_accum",
            "max_steps",
            "eval_every",
            "eval_batches",
            "log_every",
            "save_every",
            "keep_last",
            "tp",
            "dist_timeout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "checkpointing", "seed", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in ("clean_data", "scrub_pii", "near_dedup", "filter_data", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for key, value in self.model_overrides.items():  # what the model config may not check
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"model_overrides[{key!r}] must be finite, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        # The closed ranges above exclude NaN and infinity; these open ones must refuse them.
        for name in ("lr", "adam_eps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.device != "auto":
            try:
                kind = torch.device(self.device).type
            except (RuntimeError, TypeError):
                kind = None
            # The trainer saves and restores the RNG states of these two.
            if kind not in ("cpu", "cuda"):
                raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from plain values (a parsed YAML/JSON file); unknown keys and values of
        the wrong type are rejected, naming the key."""
        if not isinstance(values, dict):
            raise ValueError(f"a training config must be a mapping, got {type(values).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; valid "
                f"keys: {', '.join(valid)}"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{k: _check_type(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Load ``.yaml`` / ``.yml`` / ``.json``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
        try:
            values = _parse(path)
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"config file {path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _parse(path: Path) -> Any:
    text = path.read_text()  # UnicodeDecodeError is a ValueError
    if path.suffix == ".json":
        return json.loads(text)  # JSONDecodeError is one too, and says where
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.MarkedYAMLError as e:  # a syntax error: the library's message spans lines
        mark = e.problem_mark
        raise ValueError(
            f"not valid YAML (line {mark.line + 1}, column {mark.column + 1}: {e.problem})"
        ) from None


def _check_type(key: str, value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    ok = {
        bool: lambda: isinstance(value, bool),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: lambda: isinstance(value, str),
        list: lambda: isinstance(value, list) and all(isinstance(v, str) for v in value),
        dict: lambda: isinstance(value, dict),
        tuple: lambda: (
            isinstance(value, (list, tuple))
            and len(value) == len(args)
            and all(isinstance(v, (int, float)) for v in value)
        ),
    }[origin or hint]
    if not ok():
        raise ValueError(f"config key {key!r} must be {_type_name(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--max-steps``, ``--no-progress``, ...), plus ``--config``."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of settings; flags given override it"
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = argparse.SUPPRESS  # only flags actually given override the file
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "model_overrides":
            parser.add_argument(
                flag,
                type=json.loads,
                default=default,
                metavar="JSON",
                help="model config fields, e.g. '{\"num_layers\": 6}'",
            )
        elif f.name == "data":
            parser.add_argument(flag, nargs="+", default=default, metavar="PATH")
        elif f.name == "betas":
            parser.add_argument(flag, nargs=2, type=float, default=default, metavar="B")
        else:
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            parser.add_argument(flag, type=base[0], default=default)
