"""Per-call backend choice: ``cuda`` (the C++ extension), ``triton``, ``torch``.

Rules (DESIGN.md, "Backends"):

* CUDA tensors get the first backend in :data:`GPU_ORDER` for the op that supports the
  arguments. CUDA C++ kernels join that order only once they have passed their GPU tests on
  real hardware (recorded in ``bench/results/``, listed in :data:`GPU_VERIFIED_CUDA`); until
  then ``cuda`` is opt-in and Triton is the default on GPUs.
* CPU tensors get ``torch``.
* Meta tensors (shapes only) get ``torch``, forced or not: no backend computes anything on
  them, and PyTorch's own meta kernels give every output's shape and dtype.
* ``FASTLM_BACKEND=<name>`` or ``with use_backend(<name>):`` forces a backend. A forced
  backend that cannot serve a call raises :class:`BackendUnavailable` saying why. Forcing
  ``triton`` on CPU tensors runs the kernels under Triton's interpreter.

The choice is on every op's path, so it costs as little as possible: ``FASTLM_BACKEND`` is
read when this module is imported (as PyTorch reads its own variables; a process that
changes it later calls :func:`read_environment`), and an unforced call on CPU tensors is
answered before any per-backend check is built.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping

import torch

BACKENDS = ("cuda", "triton", "torch")

# Ops whose CUDA C++ implementation has passed its GPU tests on real hardware (see
# bench/results/). Empty until a GPU run records a pass.
GPU_VERIFIED_CUDA: frozenset[str] = frozenset()

# op name -> backends that implement it, filled in by each fastlm.ops module at import.
_IMPLEMENTED: dict[str, tuple[str, ...]] = {}

# The backend forced by use_backend(): process-wide, like torch.backends' flags. A plain
# module global, so torch.compile guards on it and recompiles when it changes.
_forced: str | None = None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve this call; the message says why."""


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _parse_environment() -> str | None:
    env = os.environ.get("FASTLM_BACKEND", "").strip()
    if env in ("", "auto"):
        return None
    return _check_name(env, "FASTLM_BACKEND")


# The backend FASTLM_BACKEND forces; a module global read per call (an environment lookup
# costs most of a microsecond), which torch.compile guards on like _forced.
_env_forced: str | None = _parse_environment()


def read_environment() -> str | None:
    """Read ``FASTLM_BACKEND`` again (it is read once, at import) and return what it forces.

    A bad value raises ``ValueError`` and leaves the previous setting in place."""
    global _env_forced
    _env_forced = _parse_environment()
    return _env_forced


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or ``FASTLM_BACKEND``."""
    return _forced if _forced is not None else _env_forced


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` for every fastlm op called inside the block (``None``: back to
    ``FASTLM_BACKEND``, or the automatic choice).

    The setting is process-wide while the block runs (as ``torch.backends`` flags are), and
    the backward of an op runs on the backend its forward used.
    """
    global _forced
    if name is not None:
        _check_name(name, "use_backend(name)")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def _probe_cuda_extension() -> str | None:
    try:
        import fastlm._C  # noqa: F401  (registers the torch.ops.fastlm_C ops)
    except ImportError as exc:
        return f"the CUDA extension fastlm._C is not built or does not load ({exc})"
    return None


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


# Probed once, at import: torch.compile then reads constants instead of tracing imports.
_CUDA_EXTENSION_ERROR = _probe_cuda_extension()
_TRITON_ERROR = _probe_triton()


def cuda_extension_error() -> str | None:
    """Why ``fastlm._C`` cannot be used here, or ``None`` when it loaded."""
    return _CUDA_EXTENSION_ERROR


def triton_error() -> str | None:
    """Why Triton cannot be used here, or ``None`` when it is installed."""
    return _TRITON_ERROR


def backend_error(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all (argument checks come later)."""
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return cuda_extension_error()
    if name == "triton":
        if device.type not in ("cuda", "cpu"):
            return f"triton runs on CUDA tensors (or CPU under the interpreter), got {device.type}"
        return triton_error()
    return None


def register_op(op: str, backends: tuple[str, ...]) -> None:
    for name in backends:
        _check_name(name, f"a backend of {op}")
    _IMPLEMENTED[op] = backends


def registered_ops() -> dict[str, tuple[str, ...]]:
    """Every fastlm op and the backends it has (for ``fastlm info``)."""
    return dict(_IMPLEMENTED)


_GPU_ORDER = ("triton", "torch")
_GPU_ORDER_VERIFIED = ("cuda", "triton", "torch")


def gpu_order(op: str) -> tuple[str, ...]:
    """Automatic order on CUDA tensors for ``op``."""
    return _GPU_ORDER_VERIFIED if op in GPU_VERIFIED_CUDA else _GPU_ORDER


Supports = Mapping[str, Callable[[], str | None]]


def select(
    op: str, where: torch.Tensor | torch.device, supports: Supports | Callable[[], Supports]
) -> str:
    """Pick the backend for one call of ``op`` on the device of ``where`` (a tensor argument
    of the call, or a device).

    ``supports`` (or what it returns, when it is a function: then it is built only when a
    choice needs it) maps each backend to a check: ``supports[name]()`` returns ``None`` when
    backend ``name`` can serve these arguments, else the reason it cannot. Backends missing
    from it do not implement the op.
    """
    forced = _forced if _forced is not None else _env_forced
    # The tensor's flags, not device.type: reading that costs more than the rest of a choice.
    if isinstance(where, torch.Tensor):
        if where.is_meta or (forced is None and not where.is_cuda):
            return "torch"
        on_cuda, on_cpu = where.is_cuda, where.is_cpu
    else:
        if where.type == "meta" or (forced is None and where.type != "cuda"):
            return "torch"
        on_cuda, on_cpu = where.type == "cuda", where.type == "cpu"
    if callable(supports):
        supports = supports()

    def reason(name: str) -> str | None:
        if name not in supports:
            return f"{op} has no {name} implementation"
        # The usual cases from the flags; any other device worded by backend_error.
        if name == "cuda" and on_cuda:
            static = _CUDA_EXTENSION_ERROR
        elif name == "triton" and (on_cuda or on_cpu):
            static = _TRITON_ERROR
        elif name in ("cuda", "triton"):
            static = backend_error(name, where.device if isinstance(where, torch.Tensor) else where)
        else:
            static = None
        return static or supports[name]()

    if forced is not None:
        why = reason(forced)
        if why is not None:
            raise BackendUnavailable(f"fastlm.{op}: forced backend {forced!r} cannot run: {why}")
        return forced
    for name in _GPU_ORDER_VERIFIED if op in GPU_VERIFIED_CUDA else _GPU_ORDER:
        if reason(name) is None:
            return name
    return "torch"
