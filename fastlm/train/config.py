"""``TrainConfig``: every setting of a training run, typed, with its validation, and its
loading from a YAML/JSON file and from ``fastlm train`` flags; ``FinetuneConfig``, the
settings of ``fastlm finetune``. Torch-free: the commands parse and answer ``--help``
before torch loads."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# How the processes of a run divide the work: not part of the run's identity, so a resumed
# run takes them from its own flags (a run begun on 8 ranks continues on 4, or on one).
LAYOUT = (
    "tp",
    "dp",
    "sequence_parallel",
    "fsdp",
    "dp_replicate",
    "reshard_after_forward",
    "cpu_offload",
    "async_save",
    "dist_timeout",
)
SCHEDULES = ("cosine", "linear", "constant")
# Devices whose RNG states the trainer saves and restores.
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def setting(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its documentation (and allowed values) beside it: the one source
    of ``fastlm train --help``."""
    metadata = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run. The defaults train a small GPT on the built-in corpus in a
    few minutes on a 2-core CPU (``fastlm train`` with no arguments)."""

    # Model.
    model: str = setting(
        "gpt",
        "a family (gpt, bert, t5: small CPU-sized models) or any preset (gpt2, llama-tiny, "
        "t5-small, bert-base, ...)",
    )
    model_overrides: dict[str, Any] = setting(
        {}, "model config fields set on top of --model, e.g. '{\"num_layers\": 6}'"
    )
    # Data.
    data: list[str] = setting(
        [],
        "text (.txt) or JSONL files or directories; none: the built-in corpus (docstrings of "
        "Python's standard library, no download)",
    )
    text_field: str = setting("text", "the JSONL field holding a document's text")
    tokenizer: str | None = setting(
        None, "a tokenizer.json; none: train a byte-level BPE of --vocab-size on the data"
    )
    vocab_size: int = setting(4096, "vocabulary of the BPE trained when no --tokenizer is given")
    val_fraction: float = setting(0.02, "fraction of documents held out for validation")
    # The Gopher-style quality filters are off by default: tuned for web text, they would drop
    # 7 % of the built-in corpus, mostly docstrings full of doctests.
    clean_data: bool = setting(
        True,
        "clean the corpus before the split: Unicode and whitespace normalization, exact "
        "dedup, a report of validation documents that duplicate training ones",
    )
    scrub_pii: bool = setting(
        True, "replace e-mails, phones, IPs and card numbers by placeholders (with cleaning)"
    )
    near_dedup: bool = setting(True, "drop near-duplicate documents, MinHash (with cleaning)")
    filter_data: bool = setting(
        False, "apply the quality filters (length, letters, repetition; with cleaning)"
    )
    seq_len: int = setting(128, "tokens per training sequence")
    # Optimization.
    batch_size: int = setting(16, "sequences per micro-batch")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(300, "optimizer steps")
    lr: float = setting(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = setting(0.1, "the schedule decays to lr * min_lr_ratio")
    warmup_steps: int = setting(20, "linear warmup steps from 0 to lr")
    schedule: str = setting("cosine", "decay after warmup", SCHEDULES)
    weight_decay: float = setting(0.1, "AdamW weight decay (never on norms, biases and embeddings)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")
    # Parallelism, under torchrun (fastlm.parallel).
    tp: int = setting(1, "tensor-parallel ranks per model replica (torchrun)")
    dp: int = setting(0, "data-parallel replicas; 0: the rest of the world (torchrun)")
    sequence_parallel: bool = setting(
        False, "sequence parallelism within the tensor-parallel groups"
    )
    fsdp: bool = setting(
        False,
        "fully shard parameters, gradients and AdamW state over the data-parallel ranks "
        "(FSDP2) instead of replicating them (DDP)",
    )
    dp_replicate: int = setting(
        1, "with --fsdp: replicate over this many groups of ranks, shard within each (HSDP)"
    )
    reshard_after_forward: bool = setting(
        True, "with --fsdp: free each block's gathered parameters after its forward"
    )
    cpu_offload: bool = setting(
        False, "with --fsdp on GPUs: keep the sharded parameters and AdamW state in host memory"
    )
    async_save: bool = setting(
        False, "distributed runs: write checkpoints in the background while training goes on"
    )
    dist_timeout: int = setting(
        600, "seconds before a collective times out (a hung rank fails, not hangs)"
    )
    # Precision and memory.
    precision: str = setting(
        "auto", "auto: bf16 autocast on GPUs that support it, else fp32", PRECISIONS
    )
    checkpointing: int = setting(
        0, "activation checkpointing: 0 none, 1 every block, n every n-th block"
    )
    # Evaluation, logging, checkpoints.
    eval_every: int = setting(100, "steps between validation passes (and one at the end)")
    eval_batches: int = setting(16, "batches per validation pass (fewer if the split is smaller)")
    log_every: int = setting(10, "steps between log lines")
    save_every: int = setting(100, "steps between checkpoints (and one at the end)")
    keep_last: int = setting(2, "checkpoints kept")
    out_dir: str = setting("runs/fastlm", "the run directory: checkpoints, metrics, loss plot")
    resume: str = setting(
        "", "latest: continue from --out-dir's newest checkpoint; or a checkpoint path"
    )
    overwrite: bool = setting(
        False, "delete the run --out-dir holds first (else a directory with a run is refused)"
    )
    seed: int = setting(0, "seed of initialization, data order and dropout")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    progress: bool = setting(True, "show a tqdm progress bar")

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
            "dp_replicate",
            "dist_timeout",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "checkpointing", "seed", "dp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        for name in (
            "clean_data",
            "scrub_pii",
            "near_dedup",
            "filter_data",
            "overwrite",
            "fsdp",
            "reshard_after_forward",
            "cpu_offload",
            "async_save",
        ):
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
        if not isinstance(self.device, str) or not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.fsdp:
            shaping = {"dp_replicate": 1, "cpu_offload": False, "reshard_after_forward": True}
            for name, default in shaping.items():
                if getattr(self, name) != default:
                    raise ValueError(f"{name} shapes fully sharded data parallelism: add --fsdp")
        elif self.precision == "fp16":
            raise ValueError(
                "precision 'fp16' with fsdp: FSDP's loss scaling is not supported; use bf16 "
                "(parameters gathered in bf16, gradients reduced in fp32)"
            )

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


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning run (``fastlm finetune`` flags). Exactly one of ``init`` (a
    pretrained encoder, :func:`pretrained_encoder`) and ``model`` (a BERT preset or
    ``bert``, trained from scratch: tests and demos) is given."""

    train: str
    validation: str
    init: str | None = None
    model: str | None = None
    text_fields: tuple[str, ...] = ("sentence",)
    label_field: str = "label"
    header: bool = True  # TSV files open with a header row naming the columns
    regression: bool = False  # one real-valued output (STS-B), scored by correlation
    positive_label: str | None = None  # F1's class for two labels; None: the second id
    max_length: int = 128
    epochs: int = 3
    # None: 2e-5 from a pretrained encoder (BERT's fine-tuning range is 2e-5..5e-5); 1e-3
    # from scratch, where nothing learned is there to preserve.
    lr: float | None = None
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 0  # steps between validations; 0: once per epoch
    vocab_size: int = 4096  # of the BPE trained for a model from scratch
    precision: str = "auto"
    device: str = "auto"
    out_dir: str = "runs/finetune"
    overwrite: bool = False  # delete the run out_dir holds (else it is refused)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.init is None) == (self.model is None):
            raise ValueError(
                "give exactly one of init (a pretrained encoder) and model (a "
                "preset trained from scratch)"
            )
        self.text_fields = tuple(self.text_fields)
        if len(self.text_fields) not in (1, 2) or not all(self.text_fields):
            raise ValueError(
                f"text_fields must name one or two fields, got {list(self.text_fields)}"
            )
        for name in ("max_length", "epochs", "batch_size", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.regression and self.positive_label is not None:
            raise ValueError("positive_label is for classification, not regression")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.init is not None else 1e-3


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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field (``--max-steps``, ``--no-progress``, ...), each with its
    documentation, default and allowed values; plus ``--config``."""
    parser.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of settings; flags given override it"
    )
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['doc']} (default: {_shown_default(f.name, default)})"
        # SUPPRESS: only flags actually given override the config file and the resumed run.
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "model_overrides":
            kwargs.update(type=json.loads, metavar="JSON")
        elif f.name == "data":
            kwargs.update(nargs="+", metavar="PATH")
        elif f.name == "betas":
            kwargs.update(nargs=2, type=float, metavar="B")
        else:
            base = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kwargs.update(type=base[0], choices=f.metadata["choices"])
        parser.add_argument(flag, **kwargs)


def _shown_default(name: str, value: Any) -> str:
    if isinstance(value, bool):
        flag = name.replace("_", "-")
        return f"--{flag}" if value else f"--no-{flag}"
    if isinstance(value, (dict, list)):
        return json.dumps(value) if value else "none"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value in (None, "") else str(value)


def argument_parser() -> argparse.ArgumentParser:
    """``fastlm train``'s parser (torch-free: ``--help`` and flag errors answer at once)."""
    parser = argparse.ArgumentParser(
        prog="fastlm train",
        description="Train a GPT, BERT or T5 model. Settings come from the defaults, then the "
        "resumed run's own, then --config, then the flags given.",
    )
    _add_arguments(parser)
    return parser
