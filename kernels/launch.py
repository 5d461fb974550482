"""What every kernel family shares: interpreter dispatch and static-compile specs."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

# Keyed by id(): hashing a JITFunction computes its cache key, which walks its dependencies.
with contextlib.suppress(ImportError):
    # The interpreter imports gluon lazily while converting arguments; gluon asserts at import
    # that triton.language holds JITFunctions, which is false while the twins are swapped in.
    import triton.experimental.gluon  # noqa: F401

_twins: dict[int, InterpretedFunction] = {}
_stdlib_lock = threading.RLock()


def _twin(fn: JITFunction) -> InterpretedFunction:
    if id(fn) not in _twins:
        _twins[id(fn)] = InterpretedFunction(fn.fn)
    return _twins[id(fn)]


@contextlib.contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    """Swap triton.language's own jit functions (tl.sum, tl.max, ...) for interpreted twins.

    With TRITON_INTERPRET=1 set before import, ``@triton.jit`` builds interpreted functions
    throughout; without it, the standard library holds compiled-only JITFunctions that raise
    when the interpreter calls them. Swapping them for the duration of one interpreted launch
    lets one process run kernels both compiled (CUDA tensors) and interpreted (CPU tensors).
    """
    with _stdlib_lock:
        swapped = []
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith("triton.language"):
                continue
            for attr, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    swapped.append((module, attr, value))
                    setattr(module, attr, _twin(value))
        try:
            yield
        finally:
            for module, attr, value in swapped:
                setattr(module, attr, value)


class _InterpretedKernel:
    def __init__(self, kernel: JITFunction) -> None:
        self._fn = _twin(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _interpretable_stdlib():
                return self._fn[grid](*args, **kwargs)

        return launch


_interpreted: dict[int, _InterpretedKernel] = {}


def on_device(kernel: JITFunction | InterpretedFunction, device: torch.device):
    """The launchable form of ``kernel`` for tensors on ``device``.

    CUDA tensors get the compiled kernel; CPU tensors get Triton's interpreter, which is how
    every kernel is verified on machines without a GPU (DESIGN.md).
    """
    if device.type == "cuda" or isinstance(kernel, InterpretedFunction):
        return kernel
    if id(kernel) not in _interpreted:
        _interpreted[id(kernel)] = _InterpretedKernel(kernel)
    return _interpreted[id(kernel)]


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One configuration a launcher ships, for the static compile check.

    ``signature`` maps every non-constexpr argument to its Triton type (``"*bf16"``,
    ``"i32"``, ``"fp32"``...). ``aligned`` names the pointer, stride and size arguments that
    the JIT would see divisible by 16 for typical inputs, so the check compiles the same
    specialization (and load widths) that runs.
    """

    label: str
    kernel: JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 1
    aligned: tuple[str, ...] = ()
    # Hot global loads that must be 128-bit wide in this specialization.
    needs_wide_loads: bool = True
