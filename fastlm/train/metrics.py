"""What the trainer reports: model FLOPs and MFU, peak memory, the metrics JSONL,
TensorBoard (when installed) and the loss-curve plot."""

from __future__ import annotations

import json
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastlm.models.layers import Attention

# Dense bf16/fp16 tensor-core peaks (NVIDIA datasheets, SXM parts), FLOP/s.
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense half-precision peak, if known and the run uses half precision
    (MFU is then measured against it, as PaLM's and Megatron's MFU figures are)."""
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, PaLM's estimate: 6 per weight of every linear layer (the
    LM head included; embedding lookups are free) plus 12 * heads * head_dim * seq_len per
    attention layer for the score and value products. Recomputation by activation
    checkpointing is not counted: MFU measures useful work."""
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    attention = sum(
        12 * m.num_heads * m.head_dim * seq_len for m in model.modules() if isinstance(m, Attention)
    )
    return 6.0 * sum(linear.values()) + attention


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory on a GPU; the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in kilobytes on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (and TensorBoard, when installed); a log not
    ``enabled`` (a distributed run's ranks but the first) only keeps them in memory.
    Nothing is written before the first record."""

    def __init__(self, out_dir: Path, tensorboard: bool = True, enabled: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self.writer = None
        self.enabled = enabled
        self._tensorboard = tensorboard and enabled

    def _open_tensorboard(self) -> None:
        self._tensorboard = False
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (written by a run that was killed after its last
        checkpoint), keeping the rest: a resumed run continues the same log. A last line
        cut short by the kill is dropped; any other unreadable line is an error."""
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text().splitlines()
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and isinstance(record.get("step"), int)):
                if number == len(lines):
                    break
                raise ValueError(f"{self.path}:{number}: not a metrics record: {line[:80]!r}")
            if record["step"] <= step:
                kept.append(record)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self.records = kept

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        if self._tensorboard:
            self._open_tensorboard()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(records: Iterable[dict[str, Any]], path: Path) -> bool:
    """The training and validation loss curves as a PNG; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = list(records)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
