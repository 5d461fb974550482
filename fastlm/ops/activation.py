"""Fused bias + activation (+ dropout): reference, custom op with autograd, dispatch.

For MLPs whose GEMMs stay in cuBLAS: ``dropout(act(x + bias))`` in one pass instead of three
elementwise kernels, and a backward that recomputes the activation's derivative from the
saved input.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.backend import forced_backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    EagerOp,
    absent,
    any_autocast,
    as_rows,
    dtype_error,
    is_dynamo_compiling,
    remember,
    signature_memo,
    supports,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_int, check_real, describe

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_TORCH_ACT = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}
# The torch backend's activations: the C bindings F.* wraps (the same kernels), out of place,
# and in place for a fresh temporary autograd does not record (one allocation fewer; the
# in-place kernels give the same bits).
_ACT = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "gelu": torch._C._nn.gelu,
    "gelu_tanh": lambda x: torch._C._nn.gelu(x, approximate="tanh"),
    "silu": torch._C._nn.silu,
}
_ACT_INPLACE = {
    "identity": lambda x: x,
    "relu": torch.relu_,
    "gelu": torch._C._nn.gelu_,
    "gelu_tanh": lambda x: torch._C._nn.gelu_(x, approximate="tanh"),
    "silu": torch._C._nn.silu_,
}


def bias_act_ref(x: Tensor, bias: Tensor | None = None, activation: str = "gelu") -> Tensor:
    """``act(x + bias)``, the plain way (no dropout)."""
    return _TORCH_ACT[activation](x if bias is None else x + bias)


def bias_act(
    x: Tensor,
    bias: Tensor | None = None,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``dropout(act(x + bias))`` over the last dim of ``x`` (any leading dims), in x's dtype.

    activation: one of ``identity, relu, gelu`` (erf), ``gelu_tanh``, ``silu``. ``bias``:
    (N,) matching the last dim. ``dropout_p`` drops with a mask fixed by ``seed`` (None: drawn
    from torch's generator); the backward reuses the same mask. Math in fp32.
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _bias_act_under_autocast(x, bias, activation, dropout_p, seed)
    return _bias_act_call(x, bias, activation, dropout_p, seed)


def _bias_act_call(x, bias, activation, dropout_p, seed):
    try:
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                bias is None or (type(bias), bias.shape, bias.dtype, bias.is_cpu or bias.device),
                activation,
            )
        )
        known = key is not None and key in _BIAS_ACT_PASSED
    except Exception:  # not a tensor, a 0-d x, an unhashable activation: the check words it
        key, known = None, False
    if not known:
        _check_bias_act(x, bias, activation)
        if key is not None:
            remember(_BIAS_ACT_PASSED, key)
        x_cpu = x.is_cpu
    if type(dropout_p) is not float or dropout_p != 0.0 or seed is not None:
        seed = check_dropout(dropout_p, seed)
    else:
        seed = 0
    if (x_cpu and forced_backend() is None) or backend.select(
        "bias_act", x, lambda: _support(x, bias)
    ) == "torch":
        # x is the caller's: never in place. A wider bias promotes the sum: computed at that
        # precision, returned in x's dtype.
        if bias is None:
            y = _ACT[activation](x)
        else:
            y = x + bias
            y = _ACT[activation](y) if y.requires_grad else _ACT_INPLACE[activation](y)
        if y.dtype is not x.dtype:
            y = y.to(x.dtype)
        return seeded_dropout(y, dropout_p, seed) if dropout_p else y
    return bias_act_op(x, bias, activation, float(dropout_p), seed)


_bias_act_under_autocast = autocast_policy(lower_precision=False)(_bias_act_call)


def _check_bias_act(x: object, bias: object, activation: object) -> None:
    """The metadata part of :func:`bias_act`'s contract (dropout and seed are checked per
    call)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {describe(x)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (features last)")
    check_activation(activation)
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {describe(bias)}")
        if bias.shape != (x.shape[-1],):
            raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
        if not (bias.is_cpu and x.is_cpu) and bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


_BIAS_ACT_PASSED = signature_memo()


_KERNEL_MODULES: dict[str, object] = {}


def kernels(name: str):
    """``fastlm.kernels.<name>``, imported on the first Triton call (CPU-only use never loads
    Triton) and kept: an import statement per call costs about a microsecond."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = importlib.import_module(f"fastlm.kernels.{name}")
    return module


def matrix_rows(x: Tensor) -> Tensor:
    """``x`` as (M, K) rows with a unit column stride (:func:`as_rows`); a matrix that
    already is one passes as it is."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    return as_rows(x)


def check_activation(activation: str) -> None:
    """Raise ValueError unless ``activation`` is one of :data:`ACTIVATIONS`."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_dropout(dropout_p: float, seed: int | None) -> int:
    """Validate ``dropout_p`` and return the seed to use (drawn from torch's generator when
    None and dropout is on, so ``torch.manual_seed`` makes runs repeatable)."""
    if seed is None and (type(dropout_p) is float or type(dropout_p) is int) and dropout_p == 0:
        return 0  # no dropout, the common case: nothing to check further
    if not 0.0 <= check_real("dropout_p", dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if seed is not None:
        check_int("seed", seed, 0)
    if dropout_p > 0 and seed is None:
        return int(torch.randint(0, 2**31 - 1, ()).item())
    return seed or 0


def seeded_dropout(y: Tensor, dropout_p: float, seed: int) -> Tensor:
    """``F.dropout(y, dropout_p)`` with its mask fixed by ``seed`` (the torch backend's
    dropout: torch's generator, not the kernels' Philox stream, so masks differ by backend)."""
    if dropout_p == 0:
        return y
    with torch.random.fork_rng(devices=[y.device] if y.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return F.dropout(y, dropout_p)


def _support(x, bias):
    def triton_error():
        return dtype_error("x", x, FLOAT32_AND_HALF_DTYPES) or dtype_error(
            "bias", bias, FLOAT32_AND_HALF_DTYPES
        )

    return supports(triton_error)


def _bias_act(
    x: Tensor, bias: Tensor | None, activation: str, dropout_p: float, seed: int
) -> Tensor:
    bias_ = None if bias is None else bias.contiguous()
    y = kernels("activation").bias_act_fwd(matrix_rows(x), bias_, activation, dropout_p, seed)
    return y if x.dim() == 2 else y.view(x.shape)


_bias_act_op = torch.library.custom_op("fastlm::bias_act", _bias_act, mutates_args=())


@_bias_act_op.register_fake
def _(x, bias, activation, dropout_p, seed):
    return torch.empty_like(x)


def _bias_act_bwd(
    grad: Tensor,
    x: Tensor,
    bias: Tensor | None,
    activation: str,
    dropout_p: float,
    seed: int,
    recompute: bool,
    dbias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dbias, y)``: dbias fp32 (empty unless there is a bias, or ``dbias`` says x
    already includes one), y the forward's output computed again (empty unless
    ``recompute``)."""
    from fastlm.kernels.activation import bias_act_bwd

    bias_ = None if bias is None else bias.contiguous()
    dx, db, y = bias_act_bwd(
        as_rows(grad),
        as_rows(x),
        bias_,
        activation,
        dropout_p,
        seed,
        recompute,
        dbias or bias is not None,
    )
    return (
        dx.view(x.shape),
        absent(x, torch.float32) if db is None else db,
        absent(x) if y is None else y.view(x.shape),
    )


_bias_act_bwd_op = torch.library.custom_op("fastlm::bias_act_bwd", _bias_act_bwd, mutates_args=())
bias_act_bwd = EagerOp(_bias_act_bwd_op, _bias_act_bwd)


@_bias_act_bwd_op.register_fake
def _(grad, x, bias, activation, dropout_p, seed, recompute, dbias):
    n = x.shape[-1] if dbias or bias is not None else 0
    y = torch.empty_like(x) if recompute else x.new_empty(0)
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32), y


def _gated_act_bwd(
    grad: Tensor,
    gate: Tensor,
    up: Tensor,
    bias_gate: Tensor | None,
    bias_up: Tensor | None,
    activation: str,
    recompute: bool,
    dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of ``y = act(gate + bias_gate) * (up + bias_up)`` on (M, N) rows: ``(dgate,
    dup, dbias_gate, dbias_up, y)``, dbias fp32 (empty unless there are biases or ``dbias``
    says gate and up include them), y empty unless ``recompute``."""
    from fastlm.kernels.activation import gated_act_bwd

    biases = [None if b is None else b.contiguous() for b in (bias_gate, bias_up)]
    dg, du, dbg, dbu, y = gated_act_bwd(
        as_rows(grad),
        as_rows(gate),
        as_rows(up),
        *biases,
        activation,
        recompute,
        dbias or bias_gate is not None,
    )

    def fp32_or_absent(db):
        return absent(gate, torch.float32) if db is None else db

    return (dg, du, fp32_or_absent(dbg), fp32_or_absent(dbu), absent(gate) if y is None else y)


_gated_act_bwd_op = torch.library.custom_op(
    "fastlm::gated_act_bwd", _gated_act_bwd, mutates_args=()
)
gated_act_bwd = EagerOp(_gated_act_bwd_op, _gated_act_bwd)


@_gated_act_bwd_op.register_fake
def _(grad, gate, up, bias_gate, bias_up, activation, recompute, dbias):
    n = gate.shape[-1] if dbias or bias_gate is not None else 0
    y = torch.empty_like(gate) if recompute else gate.new_empty(0)
    db = gate.new_empty(n, dtype=torch.float32)
    return torch.empty_like(gate), torch.empty_like(up), db, db.clone(), y


def _setup_context(ctx, inputs, output):
    x, bias, activation, dropout_p, seed = inputs
    ctx.save_for_backward(x, bias)
    ctx.options = (activation, dropout_p, seed)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    dx, db, _ = bias_act_bwd(grad, x, bias, *ctx.options, False, False)
    return dx, None if bias is None else db.to(bias.dtype), None, None, None


# The Triton backend's entrance (the custom op under torch.compile, subclasses and modes).
bias_act_op = EagerOp(_bias_act_op, _bias_act, _setup_context, _backward)
backend.register_op("bias_act", ("triton", "torch"))
