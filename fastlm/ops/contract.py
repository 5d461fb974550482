"""Pieces of the op contracts (DESIGN.md, "Backends") that several op modules share.

Each op module checks its own arguments in one ``_check...`` function before it calls
:func:`fastlm.backend.select`; these helpers are the parts those checks have in common.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

# The floating-point dtypes every op's contract takes (the torch backend computes in all).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def values_readable(*tensors: Tensor | None) -> bool:
    """Whether a check may read these tensors' values (a device-to-host copy) now.

    Not while ``torch.compile`` traces (fake tensors hold no values), not on meta tensors
    (shapes only), and not while a CUDA graph is being captured (no copies allowed): a
    graphed or compiled caller must guarantee what such a check would have refused.
    """
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "meta":
            return False
        if t.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
    return True


def check_float(name: str, t: object) -> None:
    """Refuse anything but a tensor of one of :data:`FLOAT_DTYPES`, naming ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_real(name: str, value: object) -> float:
    """``value`` as a float, refusing anything that is not a finite real number (a bool, a
    tensor, NaN, inf), naming ``name``."""
    # float and int first: the abstract Real check costs more than the rest of a small op.
    if (
        type(value) is not float
        and type(value) is not int
        and (isinstance(value, bool) or not isinstance(value, numbers.Real))
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile a float seen with two values becomes
    # symbolic, and math.isfinite of a symbol breaks the graph (NaN fails both comparisons).
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_softcap(softcap: object, allow_none: bool = False) -> float:
    """A logit soft cap (``softcap * tanh(x / softcap)``) as a float: a finite number >= 0,
    0 meaning no cap; None too where ``allow_none`` (the losses' default, as Gemma 2's
    config). Each op keeps the wording its users have seen."""
    if type(softcap) is float and 0.0 <= softcap < math.inf:  # the common call, first
        return softcap
    if softcap is None and allow_none:
        return 0.0
    value = check_real("softcap", softcap)
    if value < 0:
        if allow_none:
            raise ValueError(f"softcap must be None, 0 (off) or a positive number, got {softcap}")
        raise ValueError(f"softcap must be >= 0 (0: no cap), got {value}")
    return value


def check_int(name: str, value: object, low: int) -> int:
    """``value`` as an int ``>= low`` (a bool is refused), naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def describe(value: object) -> str:
    """A tensor's dtype, or any other value's type: what an error says it got."""
    return str(value.dtype) if isinstance(value, Tensor) else type(value).__name__
