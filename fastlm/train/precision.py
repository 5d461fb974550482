"""Mixed precision: the autocast context and the loss scaler of each mode.

In every mode the parameters and the optimizer state stay fp32 (the master weights);
bf16/fp16 modes run the forward and backward under ``torch.autocast``. fp16 adds dynamic
loss scaling (``torch.amp.GradScaler``): a step whose gradients overflow is skipped and the
scale halves; bf16 has fp32's exponent range and needs none.
"""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on a GPU that supports it, else fp32; a mode the device cannot run
    is an error."""
    if precision == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if gpu_bf16 else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "precision 'bf16' needs a GPU with bfloat16 support (sm_80+); use 'fp16' or 'fp32'"
        )
    return precision


class Precision:
    """The autocast context and loss scaler of one mode (``fp32``, ``bf16``, ``fp16``)."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {mode!r}")
        self.mode, self.device, self.dtype = mode, device, DTYPES[mode]
        # Disabled in fp32/bf16: its methods then pass gradients through untouched.
        self.scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)
