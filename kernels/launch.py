"""What every kernel family shares: interpreter dispatch and static-compile specs."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

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
def _interpretable(kernel_globals: dict[str, Any]) -> Iterator[None]:
    """Swap jit functions for interpreted twins: triton.language's own (tl.sum, tl.max, ...)
    and those the kernel's module defines (its @triton.jit helpers).

    With TRITON_INTERPRET=1 set before import, ``@triton.jit`` builds interpreted functions
    throughout; without it, they are compiled-only JITFunctions that raise when the
    interpreter calls them. Swapping them for the duration of one interpreted launch lets
    one process run kernels both compiled (CUDA tensors) and interpreted (CPU tensors).
    """
    namespaces = [
        vars(module)
        for name, module in list(sys.modules.items())
        if module is not None and name.startswith("triton.language")
    ]
    namespaces.append(kernel_globals)
    with _stdlib_lock:
        swapped = []
        for namespace in namespaces:
            for attr, value in list(namespace.items()):
                if isinstance(value, JITFunction):
                    swapped.append((namespace, attr, value))
                    namespace[attr] = _twin(value)
        try:
            yield
        finally:
            for namespace, attr, value in swapped:
                namespace[attr] = value


_interpreter_convert_float = interpreter._convert_float


def _convert_float(data, src, dst, rounding_mode):
    """fp32 -> bf16 rounded to nearest even, as ``cvt.rn.bf16.f32`` does on the GPU.

    Triton's interpreter truncates instead (and its own round-to-nearest mode neither breaks
    ties to even nor carries into the exponent), so bf16 results would differ from the GPU's
    by an ulp. Other conversions are left to the interpreter.
    """
    rtz = rounding_mode == interpreter._ir.ROUNDING_MODE.RTZ
    if src != tl.float32 or dst != tl.bfloat16 or rtz:
        return _interpreter_convert_float(data, src, dst, rounding_mode)
    bits = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = np.where(is_nan, (bits >> 16) | 0x40, rounded)  # keep NaN a (quiet) NaN
    return rounded.astype(np.uint16).reshape(data.shape)


_interpreter_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope) -> None:
    # Triton 3.6's interpreter reads a loop bound with int() of a one-element array, which
    # NumPy 2.4 rejects; later Triton squeezes it first, as here.
    _interpreter_patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))


_interpreter_create_dot = interpreter.InterpreterBuilder.create_dot


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    # The interpreter keeps bf16 as raw uint16 bits and would multiply those as integers;
    # widen to fp32 (exact) as the tensor cores do before accumulating in fp32.
    def widen(t):
        if t.dtype.scalar != tl.bfloat16:
            return t
        bits = t.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    return _interpreter_create_dot(
        self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc
    )


_interpreter_device_call = InterpretedFunction.__call__


def _device_call(self, *args, **kwargs):
    # A @triton.jit helper called from an interpreted kernel: the interpreter patches
    # triton.language for it and never undoes that (Triton 3.6), which breaks every later
    # real compile in the process. Patch within a scope and restore it.
    scope = interpreter._patch_lang(self.fn)
    try:
        return self.rewrite()(*args, **kwargs)
    finally:
        scope.restore()


@contextlib.contextmanager
def _interpreter_fixes() -> Iterator[None]:
    """GPU-faithful bf16 rounding and dots, NumPy-2-safe loop bounds, and device-function
    calls that clean up after themselves, for one interpreted launch."""
    builder = interpreter.InterpreterBuilder
    with _stdlib_lock:
        interpreter._convert_float = _convert_float
        interpreter._patch_lang_tensor = _patch_lang_tensor
        builder.create_dot = _create_dot
        InterpretedFunction.__call__ = _device_call
        try:
            yield
        finally:
            interpreter._convert_float = _interpreter_convert_float
            interpreter._patch_lang_tensor = _interpreter_patch_lang_tensor
            builder.create_dot = _interpreter_create_dot
            InterpretedFunction.__call__ = _interpreter_device_call


def _jitted(kernel: KernelInterface) -> JITFunction | InterpretedFunction:
    """The @triton.jit function inside ``triton.autotune`` / ``triton.heuristics`` wrappers."""
    while not isinstance(kernel, (JITFunction, InterpretedFunction)):
        kernel = kernel.fn
    return kernel


class _InterpretedKernel:
    """``kernel`` launched on Triton's interpreter with :func:`_interpreter_fixes`.

    A JITFunction runs as its interpreted twin. With TRITON_INTERPRET=1 set before import,
    ``@triton.jit`` already built an InterpretedFunction (maybe under an autotuner), which
    would otherwise run on the stock interpreter (bf16 dots on raw bits: garbage), so it
    is launched as it is, within the same fixes.
    """

    def __init__(self, kernel: KernelInterface) -> None:
        self._fn = _twin(kernel) if isinstance(kernel, JITFunction) else kernel
        self._globals = _jitted(kernel).fn.__globals__

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _interpretable(self._globals), _interpreter_fixes():
                return self._fn[grid](*args, **kwargs)

        return launch


_interpreted: dict[int, _InterpretedKernel] = {}


def on_device(kernel: KernelInterface, device: torch.device):
    """The launchable form of ``kernel`` (a @triton.jit function, or an autotuner over one)
    for tensors on ``device``.

    CUDA tensors get the compiled kernel; CPU tensors get Triton's interpreter, which is how
    every kernel is verified on machines without a GPU (DESIGN.md). Under TRITON_INTERPRET=1
    tensors on any device get the interpreter, with the same fixes as without it.
    """
    if device.type == "cuda" and isinstance(_jitted(kernel), JITFunction):
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
    # Matmul kernels that must use tensor cores: mma on sm_80, warpgroup MMA (wgmma) on sm_90.
    needs_wgmma: bool = False
    # The GPU generations this configuration ships for (a tile sized for sm_90's shared memory
    # is never launched on sm_80).
    capabilities: tuple[int, ...] = (80, 90)
