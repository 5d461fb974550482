"""Fused MLP ops: GEMMs with bias/activation epilogues, gated GEMMs, and whole MLPs.

- ``linear_act``: ``dropout(act(x @ W.T + b))``, one kernel.
- ``gated_linear``: ``act(x @ Wg.T + bg) * (x @ Wu.T + bu)`` (SwiGLU, GeGLU), one kernel
  reading x once for both products.
- ``fused_mlp`` (fc1, activation, fc2, as ``timm``'s ``Mlp``) and ``gated_mlp`` (gate, up,
  down, as Llama's MLP): the hidden activation is not kept for the backward; only the
  pre-activations are, and the backward recomputes the activation in its fused elementwise
  kernel. Against eager PyTorch that keeps one (M, hidden) tensor instead of two
  (``fused_mlp``) and two instead of four (``gated_mlp``).

The backward's GEMMs go to cuBLAS (``torch.matmul``); its elementwise part (activation
derivative, dropout mask, gate product, bias gradients) is one fused kernel. The Triton GEMM
takes fp16/bf16; fp32 inputs run the torch backend (cuBLAS), as do CPU tensors unless
Triton is forced (the interpreter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.backend import forced_backend
from fastlm.ops._common import (
    HALF_DTYPES,
    EagerOp,
    absent,
    any_autocast,
    as_rows,
    is_dynamo_compiling,
    remember,
    signature_memo,
    supports,
)
from fastlm.ops.activation import (
    _ACT,
    _ACT_INPLACE,
    ACTIVATIONS,
    bias_act_bwd,
    bias_act_op,
    bias_act_ref,
    check_activation,
    check_dropout,
    gated_act_bwd,
    kernels,
    matrix_rows,
    seeded_dropout,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import describe

_ACTIVATION_SET = frozenset(ACTIVATIONS)
# Philox streams of the two dropouts in fused_mlp: hidden (seed) and output (seed + 1).
_OUTPUT_DROPOUT_STREAM = 1


def linear_act_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str = "gelu"
) -> Tensor:
    """``act(x @ weight.T + bias)``, the plain way."""
    return bias_act_ref(F.linear(x, weight, bias), None, activation)


def gated_linear_ref(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    activation: str = "silu",
    bias_gate: Tensor | None = None,
    bias_up: Tensor | None = None,
) -> Tensor:
    """``act(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)``, the plain way."""
    return linear_act_ref(x, w_gate, bias_gate, activation) * F.linear(x, w_up, bias_up)


def linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``dropout(act(x @ weight.T + bias))`` with bias, activation and dropout applied in the
    GEMM's epilogue.

    x: (..., K); weight: (N, K) as ``nn.Linear`` stores it; bias: (N,) or None; result
    (..., N) in x's dtype. activation: ``identity, relu, gelu`` (erf), ``gelu_tanh``,
    ``silu``. fp32 accumulation. ``dropout_p`` drops with a mask fixed by ``seed`` (None:
    drawn from torch's generator), reused by the backward.
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _linear_act_under_autocast(x, weight, bias, activation, dropout_p, seed)
    return _linear_act_call(x, weight, bias, activation, dropout_p, seed)


def _linear_act_call(x, weight, bias, activation, dropout_p, seed):
    try:  # the signature (see fastlm.ops._common.remember)
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                type(weight),
                weight.shape,
                weight.dtype,
                weight.is_cpu or weight.device,
                bias is None or (type(bias), bias.shape, bias.dtype, bias.is_cpu or bias.device),
                activation,
            )
        )
        known = key is not None and key in _LINEAR_ACT_PASSED
    except Exception:  # not a tensor, a 0-d x, an unhashable activation: the check words it
        key, known = None, False
    if not known:
        _check(x, activation, weight=weight, bias=bias)
        if key is not None:
            remember(_LINEAR_ACT_PASSED, key)
        x_cpu = x.is_cpu
    if type(dropout_p) is not float or dropout_p != 0.0 or seed is not None:
        seed = check_dropout(dropout_p, seed)
    else:
        seed = 0
    if (x_cpu and forced_backend() is None) or backend.select(
        "linear_act", x, lambda: _gemm_support(x)
    ) == "torch":
        y = _linear(x, weight, bias)
        y = _ACT[activation](y) if y.requires_grad else _ACT_INPLACE[activation](y)
        return seeded_dropout(y, dropout_p, seed) if dropout_p else y
    save = _saves(x, weight, bias)
    return linear_act_op(x, weight, bias, activation, float(dropout_p), seed, save)[0]


def gated_linear(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    activation: str = "silu",
    bias_gate: Tensor | None = None,
    bias_up: Tensor | None = None,
) -> Tensor:
    """``act(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)`` in one kernel: SwiGLU with
    ``silu``, GeGLU with ``gelu`` / ``gelu_tanh``.

    x: (..., K); w_gate, w_up: (N, K); biases (N,), both or neither; result (..., N).
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _gated_linear_under_autocast(x, w_gate, w_up, activation, bias_gate, bias_up)
    return _gated_linear_call(x, w_gate, w_up, activation, bias_gate, bias_up)


def _gated_linear_call(x, w_gate, w_up, activation, bias_gate, bias_up):
    try:  # the signature (see fastlm.ops._common.remember)
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                type(w_gate),
                w_gate.shape,
                w_gate.dtype,
                w_gate.is_cpu or w_gate.device,
                type(w_up),
                w_up.shape,
                w_up.dtype,
                w_up.is_cpu or w_up.device,
                activation,
                bias_gate is None
                or (
                    type(bias_gate),
                    bias_gate.shape,
                    bias_gate.dtype,
                    bias_gate.is_cpu or bias_gate.device,
                ),
                bias_up is None
                or (type(bias_up), bias_up.shape, bias_up.dtype, bias_up.is_cpu or bias_up.device),
            )
        )
        known = key is not None and key in _GATED_LINEAR_PASSED
    except Exception:  # not a tensor, a 0-d x, an unhashable activation: the check words it
        key, known = None, False
    if not known:
        _check(x, activation, w_gate=w_gate, w_up=w_up, bias_gate=bias_gate, bias_up=bias_up)
        _check_pair("bias_gate", bias_gate, "bias_up", bias_up)
        if key is not None:
            remember(_GATED_LINEAR_PASSED, key)
        x_cpu = x.is_cpu
    if (x_cpu and forced_backend() is None) or backend.select(
        "gated_linear", x, lambda: _gemm_support(x)
    ) == "torch":
        return _torch_gated(x, w_gate, w_up, activation, bias_gate, bias_up)
    save = _saves(x, w_gate, w_up, bias_gate, bias_up)
    return gated_linear_op(x, w_gate, w_up, bias_gate, bias_up, activation, save)[0]


def fused_mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str = "gelu",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """``dropout(fc2(dropout(act(fc1(x)))))``, as ``timm``'s ``Mlp`` (one rate for both
    dropouts), keeping only x and fc1's pre-activation for the backward.

    x: (..., in); fc1_weight: (hidden, in); fc2_weight: (out, hidden); biases or None.
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _fused_mlp_under_autocast(
            x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p, seed
        )
    return _fused_mlp_call(
        x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p, seed
    )


def _fused_mlp_call(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p, seed):
    try:  # the signature (see fastlm.ops._common.remember)
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                type(fc1_weight),
                fc1_weight.shape,
                fc1_weight.dtype,
                fc1_weight.is_cpu or fc1_weight.device,
                type(fc2_weight),
                fc2_weight.shape,
                fc2_weight.dtype,
                fc2_weight.is_cpu or fc2_weight.device,
                activation,
                fc1_bias is None
                or (
                    type(fc1_bias),
                    fc1_bias.shape,
                    fc1_bias.dtype,
                    fc1_bias.is_cpu or fc1_bias.device,
                ),
                fc2_bias is None
                or (
                    type(fc2_bias),
                    fc2_bias.shape,
                    fc2_bias.dtype,
                    fc2_bias.is_cpu or fc2_bias.device,
                ),
            )
        )
        known = key is not None and key in _FUSED_MLP_PASSED
    except Exception:  # not a tensor, a 0-d x, an unhashable activation: the check words it
        key, known = None, False
    if not known:
        _check(x, activation, fc1_weight=fc1_weight, fc1_bias=fc1_bias)
        _check_chain(fc1_weight, fc2_weight, fc2_bias, "fc1_weight", "fc2")
        if key is not None:
            remember(_FUSED_MLP_PASSED, key)
        x_cpu = x.is_cpu
    if type(dropout_p) is not float or dropout_p != 0.0 or seed is not None:
        seed = check_dropout(dropout_p, seed)
    else:
        seed = 0
    if (x_cpu and forced_backend() is None) or backend.select(
        "fused_mlp", x, lambda: _gemm_support(x)
    ) == "torch":
        h = _linear(x, fc1_weight, fc1_bias)
        h = _ACT[activation](h) if h.requires_grad else _ACT_INPLACE[activation](h)
        if not dropout_p:
            return _linear(h, fc2_weight, fc2_bias)
        h = seeded_dropout(h, dropout_p, seed)
        return seeded_dropout(
            _linear(h, fc2_weight, fc2_bias),
            dropout_p,
            seed + _OUTPUT_DROPOUT_STREAM,
        )
    save = _saves(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return fused_mlp_op(x, *params, activation, float(dropout_p), seed, save)[0]


def gated_mlp(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    activation: str = "silu",
    gate_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """``down(act(gate(x)) * up(x))``, as Llama's MLP, keeping only x and the gate and up
    pre-activations for the backward.

    x: (..., hidden); gate/up weights: (intermediate, hidden); down: (hidden', intermediate).
    """
    # The autocast policy's wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _gated_mlp_under_autocast(
            x, gate_weight, up_weight, down_weight, activation, gate_bias, up_bias, down_bias
        )
    return _gated_mlp_call(
        x, gate_weight, up_weight, down_weight, activation, gate_bias, up_bias, down_bias
    )


def _gated_mlp_call(
    x, gate_weight, up_weight, down_weight, activation, gate_bias, up_bias, down_bias
):
    try:  # the signature (see fastlm.ops._common.remember)
        key = (
            None
            if is_dynamo_compiling()
            else (
                type(x),
                x.shape[-1],
                x.dtype,
                (x_cpu := x.is_cpu) or x.device,
                type(gate_weight),
                gate_weight.shape,
                gate_weight.dtype,
                gate_weight.is_cpu or gate_weight.device,
                type(up_weight),
                up_weight.shape,
                up_weight.dtype,
                up_weight.is_cpu or up_weight.device,
                type(down_weight),
                down_weight.shape,
                down_weight.dtype,
                down_weight.is_cpu or down_weight.device,
                activation,
                gate_bias is None
                or (
                    type(gate_bias),
                    gate_bias.shape,
                    gate_bias.dtype,
                    gate_bias.is_cpu or gate_bias.device,
                ),
                up_bias is None
                or (type(up_bias), up_bias.shape, up_bias.dtype, up_bias.is_cpu or up_bias.device),
                down_bias is None
                or (
                    type(down_bias),
                    down_bias.shape,
                    down_bias.dtype,
                    down_bias.is_cpu or down_bias.device,
                ),
            )
        )
        known = key is not None and key in _GATED_MLP_PASSED
    except Exception:  # not a tensor, a 0-d x, an unhashable activation: the check words it
        key, known = None, False
    if not known:
        _check(
            x,
            activation,
            gate_weight=gate_weight,
            up_weight=up_weight,
            gate_bias=gate_bias,
            up_bias=up_bias,
        )
        _check_pair("gate_bias", gate_bias, "up_bias", up_bias)
        _check_chain(gate_weight, down_weight, down_bias, "gate_weight", "down")
        if key is not None:
            remember(_GATED_MLP_PASSED, key)
        x_cpu = x.is_cpu
    if (x_cpu and forced_backend() is None) or backend.select(
        "gated_mlp", x, lambda: _gemm_support(x)
    ) == "torch":
        # _torch_gated, inline (a call layer is a visible share of a small MLP).
        gate = _linear(x, gate_weight, gate_bias)
        up = _linear(x, up_weight, up_bias)
        if gate.requires_grad or up.requires_grad:
            h = _ACT[activation](gate) * up
        else:
            h = _ACT_INPLACE[activation](gate).mul_(up)
        return _linear(h, down_weight, down_bias)
    params = (gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias)
    return gated_mlp_op(x, *params, activation, _saves(x, *params))[0]


_linear_act_under_autocast = autocast_policy(lower_precision=True)(_linear_act_call)
_gated_linear_under_autocast = autocast_policy(lower_precision=True)(_gated_linear_call)
_fused_mlp_under_autocast = autocast_policy(lower_precision=True)(_fused_mlp_call)
_gated_mlp_under_autocast = autocast_policy(lower_precision=True)(_gated_mlp_call)
_LINEAR_ACT_PASSED = signature_memo()
_GATED_LINEAR_PASSED = signature_memo()
_FUSED_MLP_PASSED = signature_memo()
_GATED_MLP_PASSED = signature_memo()
_linear = torch._C._nn.linear  # bound once: each attribute walk costs on every call


def _torch_gated(x, w_gate, w_up, activation, bias_gate, bias_up):
    """The torch backend of the gated product: :func:`gated_linear_ref`'s ops in its order,
    the activation and the product in place on the fresh GEMM outputs when autograd does not
    record them."""
    gate = _linear(x, w_gate, bias_gate)
    up = _linear(x, w_up, bias_up)
    if gate.requires_grad or up.requires_grad:
        return _ACT[activation](gate) * up
    return _ACT_INPLACE[activation](gate).mul_(up)


# ---------------------------------------------------------------------------------------------
# Validation and dispatch


def _check(x: Tensor, activation: str, **params: Tensor | None) -> None:
    """x, the activation, and weights (``*weight`` / ``w_*``, (N, K)) each followed by its
    optional bias ((N,)), named as the caller's arguments."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {describe(x)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (features last)")
    if type(activation) is not str or activation not in _ACTIVATION_SET:
        check_activation(activation)
    # Read once: each attribute read of a tensor costs a C call.
    x_cpu, dtype, k = x.is_cpu, x.dtype, x.shape[-1]
    out_features = None
    for name, t in params.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
        # x's dtype is a float one: the same dtype needs no further type check.
        if t.dtype is not dtype:
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
            if t.device != x.device:  # the device is checked first, as for matching dtypes
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
            raise TypeError(f"{name} dtype {t.dtype} differs from x's {x.dtype}")
        if not (x_cpu and t.is_cpu) and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        shape = t.shape
        if "bias" in name:
            if shape != (out_features,):
                raise ValueError(f"{name} must have shape ({out_features},), got {tuple(shape)}")
            continue
        if len(shape) != 2 or shape[1] != k:
            raise ValueError(
                f"{name} must be (out_features, {k}) for x with {k} features, got {tuple(shape)}"
            )
        if out_features is not None and shape[0] != out_features:
            raise ValueError(f"{name} has {shape[0]} rows, the other weight {out_features}")
        out_features = shape[0]


def _check_pair(name: str, t: Tensor | None, other_name: str, other: Tensor | None) -> None:
    if (t is None) != (other is None):
        raise ValueError(f"{name} and {other_name} must be given together or not at all")


def _check_chain(
    first: Tensor, weight: Tensor, bias: Tensor | None, first_name: str, layer: str
) -> None:
    """The second layer of an MLP: its weight reads the first's outputs."""
    hidden = first.shape[0]
    first_cpu, dtype = first.is_cpu, first.dtype
    for name, t in ((f"{layer}_weight", weight), (f"{layer}_bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
        # first's dtype is a float one: the same dtype needs no further type check.
        if t.dtype is not dtype:
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
            raise TypeError(f"{name} dtype {t.dtype} differs from {first_name}'s {first.dtype}")
        if not (first_cpu and t.is_cpu) and t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    shape = weight.shape
    if len(shape) != 2 or shape[1] != hidden:
        raise ValueError(
            f"{layer}_weight must be (out_features, {hidden}) to follow "
            f"{first_name}, got {tuple(shape)}"
        )
    if bias is not None and bias.shape != (shape[0],):
        raise ValueError(f"{layer}_bias must have shape ({shape[0]},), got {tuple(bias.shape)}")


def _triton_gemm_error(x: Tensor) -> str | None:
    if x.dtype not in HALF_DTYPES:
        return f"the Triton GEMM takes fp16/bf16 inputs, got {x.dtype}"
    return None


def _gemm_support(x: Tensor):
    """The ``supports`` of :func:`fastlm.backend.select` for the GEMM ops (built only when a
    choice needs it: unforced CPU calls are answered before)."""
    return supports(lambda: _triton_gemm_error(x))


def _saves(*tensors: Tensor | None) -> bool:
    """Whether a custom op keeps its pre-activations for the backward (``save``): only when
    a gradient will be asked for."""
    if torch.is_grad_enabled():
        for t in tensors:  # a loop torch.compile traces (it cannot trace _any_requires_grad)
            if t is not None and t.requires_grad:
                return True
    return False


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _out_shape(x: Tensor, n: int) -> tuple[int, ...]:
    return (*x.shape[:-1], n)


def _outputs(x: Tensor, y: Tensor, *saved: Tensor | None) -> tuple[Tensor, ...]:
    """A custom op's outputs: the kernel's (M, N) result in x's leading shape, then the
    pre-activations it saved (absent when it saved none)."""
    if x.dim() != 2:
        y = y.view(_out_shape(x, y.shape[-1]))
    return (y, *[absent(x) if t is None else t for t in saved])


def _fake_outputs(x: Tensor, out_features: int, hidden: int, save: bool, n_saved: int):
    """A fake impl's outputs: y (..., out_features) and ``n_saved`` pre-activations (M,
    hidden), empty unless ``save``."""
    saved = (math.prod(x.shape[:-1]), hidden) if save else 0
    return (x.new_empty(_out_shape(x, out_features)), *(x.new_empty(saved) for _ in range(n_saved)))


# ---------------------------------------------------------------------------------------------
# Custom ops. Each returns its output and the pre-activations the backward needs (biases
# included; empty when ``save`` is off: inference keeps nothing). A backward that finds them
# empty recomputes them, so an op traced without ``save`` is still differentiable.


def _linear_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    activation: str,
    dropout_p: float,
    seed: int,
    save: bool,
) -> tuple[Tensor, Tensor]:
    y, pre = kernels("mlp").linear_act_fwd(
        matrix_rows(x), weight.contiguous(), _opt(bias), activation, dropout_p, seed, save
    )
    return _outputs(x, y, pre)


_linear_act_op = torch.library.custom_op("fastlm::linear_act", _linear_act, mutates_args=())


@_linear_act_op.register_fake
def _(x, weight, bias, activation, dropout_p, seed, save):
    return _fake_outputs(x, weight.shape[0], weight.shape[0], save, 1)


def _linear_act_setup(ctx, inputs, output):
    x, weight, bias, activation, dropout_p, seed, _ = inputs
    ctx.save_for_backward(x, weight, bias, output[1])
    ctx.options = (activation, dropout_p, seed)


def _linear_act_backward(ctx, grad, _grad_pre):
    x, weight, bias, pre = ctx.saved_tensors
    x2 = as_rows(x)
    pre = pre if pre.numel() or not x2.numel() else F.linear(x2, weight, bias)
    dpre, db, _ = _bias_act_grad(as_rows(grad), pre, bias, *ctx.options, recompute=False)
    dx = (dpre @ weight).view(x.shape)
    return dx, dpre.T @ x2, _cast(db, bias), None, None, None, None


linear_act_op = EagerOp(_linear_act_op, _linear_act, _linear_act_setup, _linear_act_backward)


def _gated_linear(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    bias_gate: Tensor | None,
    bias_up: Tensor | None,
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    y, gate, up = kernels("mlp").gated_linear_fwd(
        matrix_rows(x),
        w_gate.contiguous(),
        w_up.contiguous(),
        _opt(bias_gate),
        _opt(bias_up),
        activation,
        save,
    )
    return _outputs(x, y, gate, up)


_gated_linear_op = torch.library.custom_op("fastlm::gated_linear", _gated_linear, mutates_args=())


@_gated_linear_op.register_fake
def _(x, w_gate, w_up, bias_gate, bias_up, activation, save):
    return _fake_outputs(x, w_gate.shape[0], w_gate.shape[0], save, 2)


def _gated_linear_setup(ctx, inputs, output):
    x, w_gate, w_up, bias_gate, bias_up, activation, _ = inputs
    ctx.save_for_backward(x, w_gate, w_up, bias_gate, bias_up, output[1], output[2])
    ctx.activation = activation


def _gated_linear_backward(ctx, grad, _grad_gate, _grad_up):
    x, w_gate, w_up, bias_gate, bias_up, gate, up = ctx.saved_tensors
    x2 = as_rows(x)
    gate, up = _gated_pre(x2, w_gate, w_up, bias_gate, bias_up, gate, up)
    dgate, dup, dbg, dbu, _ = gated_act_bwd(
        as_rows(grad), gate, up, None, None, ctx.activation, False, bias_gate is not None
    )
    dx = torch.addmm(dgate @ w_gate, dup, w_up).view(x.shape)
    return (dx, dgate.T @ x2, dup.T @ x2, _cast(dbg, bias_gate), _cast(dbu, bias_up), None, None)


gated_linear_op = EagerOp(
    _gated_linear_op, _gated_linear, _gated_linear_setup, _gated_linear_backward
)


def _fused_mlp(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    activation: str,
    dropout_p: float,
    seed: int,
    save: bool,
) -> tuple[Tensor, Tensor]:
    kernels_ = kernels("mlp")
    h, pre = kernels_.linear_act_fwd(
        matrix_rows(x), fc1_weight.contiguous(), _opt(fc1_bias), activation, dropout_p, seed, save
    )
    y, _ = kernels_.linear_act_fwd(
        h,
        fc2_weight.contiguous(),
        _opt(fc2_bias),
        "identity",
        dropout_p,
        seed + _OUTPUT_DROPOUT_STREAM,
    )
    return _outputs(x, y, pre)


_fused_mlp_op = torch.library.custom_op("fastlm::fused_mlp", _fused_mlp, mutates_args=())


@_fused_mlp_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p, seed, save):
    return _fake_outputs(x, fc2_weight.shape[0], fc1_weight.shape[0], save, 1)


def _fused_mlp_setup(ctx, inputs, output):
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, dropout_p, seed, _ = inputs
    ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, output[1])
    ctx.fc2_bias_dtype = None if fc2_bias is None else fc2_bias.dtype
    ctx.options = (activation, dropout_p, seed)


def _fused_mlp_backward(ctx, grad, _grad_pre):
    x, fc1_weight, fc1_bias, fc2_weight, pre = ctx.saved_tensors
    activation, dropout_p, seed = ctx.options
    x2, dy = as_rows(x), as_rows(grad)
    if dropout_p > 0:  # the output dropout's backward is the same mask applied to dy
        dy = bias_act_op(dy, None, "identity", dropout_p, seed + _OUTPUT_DROPOUT_STREAM)
    pre = pre if pre.numel() or not x2.numel() else F.linear(x2, fc1_weight, fc1_bias)
    dpre, db1, h = _bias_act_grad(dy @ fc2_weight, pre, fc1_bias, *ctx.options, recompute=True)
    db2 = _bias_grad(dy, ctx.fc2_bias_dtype)
    dx = (dpre @ fc1_weight).view(x.shape)
    return (dx, dpre.T @ x2, _cast(db1, fc1_bias), dy.T @ h, db2, None, None, None, None)


fused_mlp_op = EagerOp(_fused_mlp_op, _fused_mlp, _fused_mlp_setup, _fused_mlp_backward)


def _gated_mlp(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    down_weight: Tensor,
    gate_bias: Tensor | None,
    up_bias: Tensor | None,
    down_bias: Tensor | None,
    activation: str,
    save: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    kernels_ = kernels("mlp")
    h, gate, up = kernels_.gated_linear_fwd(
        matrix_rows(x),
        gate_weight.contiguous(),
        up_weight.contiguous(),
        _opt(gate_bias),
        _opt(up_bias),
        activation,
        save,
    )
    y, _ = kernels_.linear_act_fwd(h, down_weight.contiguous(), _opt(down_bias), "identity")
    return _outputs(x, y, gate, up)


_gated_mlp_op = torch.library.custom_op("fastlm::gated_mlp", _gated_mlp, mutates_args=())


@_gated_mlp_op.register_fake
def _(x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, activation, save):
    return _fake_outputs(x, down_weight.shape[0], gate_weight.shape[0], save, 2)


def _gated_mlp_setup(ctx, inputs, output):
    x, gate_weight, up_weight, down_weight, gate_bias, up_bias, down_bias, activation, _ = inputs
    ctx.save_for_backward(
        x, gate_weight, up_weight, down_weight, gate_bias, up_bias, output[1], output[2]
    )
    ctx.down_bias_dtype = None if down_bias is None else down_bias.dtype
    ctx.activation = activation


def _gated_mlp_backward(ctx, grad, _grad_gate, _grad_up):
    x, gate_weight, up_weight, down_weight, gate_bias, up_bias, gate, up = ctx.saved_tensors
    x2, dy = as_rows(x), as_rows(grad)
    gate, up = _gated_pre(x2, gate_weight, up_weight, gate_bias, up_bias, gate, up)
    dgate, dup, dbg, dbu, h = gated_act_bwd(
        dy @ down_weight, gate, up, None, None, ctx.activation, True, gate_bias is not None
    )
    db_down = _bias_grad(dy, ctx.down_bias_dtype)
    dx = torch.addmm(dgate @ gate_weight, dup, up_weight).view(x.shape)
    return (
        dx,
        dgate.T @ x2,
        dup.T @ x2,
        dy.T @ h,
        _cast(dbg, gate_bias),
        _cast(dbu, up_bias),
        db_down,
        None,
        None,
    )


gated_mlp_op = EagerOp(_gated_mlp_op, _gated_mlp, _gated_mlp_setup, _gated_mlp_backward)


def _bias_act_grad(dy, pre, bias, activation, dropout_p, seed, recompute):
    """``(dpre, dbias, y)`` of ``y = dropout(act(pre))``, pre including ``bias``; identity
    without dropout needs no kernel (dpre is dy)."""
    if activation == "identity" and dropout_p == 0 and not recompute:
        db = dy.sum(0, dtype=torch.float32) if bias is not None else None
        return dy, db, None
    dpre, db, y = bias_act_bwd(
        dy, pre, None, activation, dropout_p, seed, recompute, bias is not None
    )
    return dpre, db, y


def _gated_pre(x2, w_gate, w_up, bias_gate, bias_up, gate, up):
    if gate.numel() or not x2.numel():
        return gate, up
    return F.linear(x2, w_gate, bias_gate), F.linear(x2, w_up, bias_up)


def _bias_grad(dy: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    return None if dtype is None else dy.sum(0, dtype=torch.float32).to(dtype)


def _cast(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if like is None or grad is None else grad.to(like.dtype)


for _op in ("linear_act", "gated_linear", "fused_mlp", "gated_mlp"):
    backend.register_op(_op, ("triton", "torch"))
