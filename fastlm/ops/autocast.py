"""How fastlm's ops behave inside ``torch.autocast``.

Autocast rewrites the dtypes of PyTorch's own ops at the dispatcher, but fastlm's public
functions validate their arguments in Python before any op is dispatched, and their
kernels take one compute dtype. So each public function declares its policy here, as
torch's autocast op lists do:

- GEMM-like ops (fused MLPs, linear cross-entropy, attention) run in the autocast dtype:
  floating-point tensor arguments are cast to it, as autocast casts ``F.linear`` and
  ``F.scaled_dot_product_attention``. The casts are differentiable, so fp32 master weights
  receive fp32 gradients.
- Every other op (norms, rotary, bias + activation, cross-entropy) already accepts mixed
  dtypes and keeps its input's dtype, with fp32 statistics; it runs on its arguments as
  given.

Either way the op's body runs with autocast disabled, so its torch backend (plain PyTorch
ops on the CPU) computes exactly what the Triton kernels do instead of being re-cast op by
op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])


def _device_type(args: tuple, kwargs: dict) -> str | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            return a.device.type
    return None


def _cast(a: Any, dtype: torch.dtype) -> Any:
    if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64:
        return a.to(dtype)
    return a


def autocast_policy(lower_precision: bool) -> Callable[[F], F]:
    """Decorate a public op: under an active autocast, cast its floating-point tensor
    arguments to the autocast dtype (``lower_precision=True``; float64 is left alone, as
    autocast does) or leave them as they are, then run it with autocast disabled."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            # One query answers the common case (no autocast anywhere) for a tenth of what
            # finding the device and asking about it costs.
            if not torch._C._is_any_autocast_enabled():
                return fn(*args, **kwargs)
            device_type = _device_type(args, kwargs)
            # Devices autocast does not know (meta) cannot be under it, and asking whether it
            # is enabled there raises. Dynamo in torch 2.11 cannot trace the availability
            # query; the devices it compiles for all have autocast.
            if (
                device_type is None
                or not (
                    torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)
                )
                or not torch.is_autocast_enabled(device_type)
            ):
                return fn(*args, **kwargs)
            if lower_precision:
                dtype = torch.get_autocast_dtype(device_type)
                args = tuple(_cast(a, dtype) for a in args)
                kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
