"""LayerNorm and RMSNorm: references, custom ops with autograd, backend dispatch.

Both norms share one pair of ``torch.library`` custom ops, ``fastlm::norm_fwd`` and
``fastlm::norm_bwd``, so ``torch.compile(fullgraph=True)`` sees one opaque node per call
(fake implementations give it shapes) and autograd runs fastlm's own backward kernels.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    EagerOp,
    SupportCheck,
    _dispatch_modes,
    _dispatcher_needed,
    _functorch_active,
    _grad_enabled,
    _is_compiling,
    absent,
    any_autocast,
    as_rows,
    dtype_error,
    supports,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import FLOAT_DTYPES, check_float, check_real

# ---------------------------------------------------------------------------------------------
# References: the plainest formulas, run by the tests in float64 as the oracle.


def layer_norm_ref(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    s = x if residual is None else x + residual
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    mean = s.mean(dim=dims, keepdim=True)
    var = ((s - mean) ** 2).mean(dim=dims, keepdim=True)
    y = (s - mean) / torch.sqrt(var + eps)
    y = y if weight is None else y * weight
    y = y if bias is None else y + bias
    return y if residual is None else (y, s)


def rms_norm_ref(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    residual: Tensor | None = None,
    offset: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    s = x if residual is None else x + residual
    eps = default_rms_eps(s.dtype) if eps is None else eps
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    y = s / torch.sqrt((s * s).mean(dim=dims, keepdim=True) + eps)
    y = y if weight is None else y * (offset + weight)
    return y if residual is None else (y, s)


# ---------------------------------------------------------------------------------------------
# Public API.


def layer_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the trailing ``normalized_shape`` dims of ``x``, optionally fused with a
    residual add.

    Args:
        x: (..., *normalized_shape), float32/float16/bfloat16 (float64 on the torch backend).
            Any strides; the last dim is made contiguous if it is not.
        normalized_shape: trailing shape to normalize over (product 1..65536 on the kernels).
        weight, bias: ``normalized_shape``-shaped, any float dtype, or ``None``.
        eps: added to the variance (biased, as ``torch.nn.functional.layer_norm``).
        residual: ``None``, or a tensor shaped like ``x``. Then ``s = x + residual``, rounded
            to the promoted dtype of the two, is normalized and ``(y, s)`` is returned: the
            pre-norm transformer step ``h = h + f(h); y = norm(h)`` in one pass, with
            gradients flowing to both ``x`` and ``residual``.
        out_dtype: dtype of ``y``; defaults to the dtype of ``x`` (of ``s`` with a residual).

    Statistics are computed in float32 whatever the input dtype.
    """
    # The autocast policy's own wrapper costs a call layer; one query answers the usual case.
    if any_autocast():
        return _norm_under_autocast(
            x, normalized_shape, weight, bias, eps, residual, out_dtype, False
        )
    return _norm(x, normalized_shape, weight, bias, eps, residual, out_dtype, False)


_NO_OFFSET = 0.0


def rms_norm(
    x: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
    residual: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    offset: float = _NO_OFFSET,
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm, ``y = x / sqrt(mean(x^2) + eps) * weight``, as ``torch.nn.functional.rms_norm``
    (``eps=None``: see :func:`default_rms_eps`). Other arguments as :func:`layer_norm`.

    ``offset`` (needs a ``weight``): ``y = x / sqrt(mean(x^2) + eps) * (offset + weight)``
    with Gemma's casting (``offset=1``: transformers' ``GemmaRMSNorm``/``Gemma2RMSNorm``):
    ``offset + weight`` is formed in float32 (float64 for float64 inputs), the product is
    taken in float32 and rounded once to the output dtype. Every backend multiplies a float32
    weight into the float32 normalized rows before that one rounding, so the offset is added
    here, before the backend is chosen, and the backends see ``offset + weight`` as a float32
    weight: exactly Gemma's numbers on each, and ``dweight`` is the usual
    ``sum(dy * x_normed)``, reaching ``weight`` through that addition.
    """
    # The default first (by identity): check_real's call costs a visible share of a small op.
    if offset is not _NO_OFFSET and check_real("offset", offset) != 0.0:
        if weight is None:
            raise ValueError("offset needs a weight: y = x_normed * (offset + weight)")
        check_float("weight", weight)
        check_float("x", x)
        widest = x.dtype
        if isinstance(residual, Tensor) and residual.is_floating_point():
            widest = torch.promote_types(x.dtype, residual.dtype)
        wide = torch.promote_types(widest, torch.float32)
        weight = (weight if weight.dtype is wide else weight.to(wide)) + offset
    if any_autocast():
        return _norm_under_autocast(
            x, normalized_shape, weight, None, eps, residual, out_dtype, True
        )
    return _norm(x, normalized_shape, weight, None, eps, residual, out_dtype, True)


def default_rms_eps(dtype: torch.dtype) -> float:
    """The eps PyTorch's RMSNorm uses when given none: the machine epsilon of the dtype it
    computes in, which is float32 for float16/bfloat16 inputs (not the input's own)."""
    return _DEFAULT_RMS_EPS.get(dtype) or torch.finfo(torch.promote_types(dtype, torch.float32)).eps


# Looked up per call (torch.finfo costs a microsecond).
_DEFAULT_RMS_EPS = {
    dtype: torch.finfo(torch.promote_types(dtype, torch.float32)).eps for dtype in FLOAT_DTYPES
}


def _as_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if _is_int(normalized_shape):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _is_int(d: object) -> bool:
    # SymInts are sizes under torch.compile's dynamic shapes.
    return isinstance(d, (numbers.Integral, torch.SymInt)) and not isinstance(d, bool)


def _check_shape(normalized_shape: object) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of positive ints (an int, or a sequence of them, as
    ``torch.nn.functional.layer_norm`` takes)."""
    if _is_int(normalized_shape) or isinstance(normalized_shape, (list, tuple)):
        shape = _as_shape(normalized_shape)
        if all(_is_int(d) for d in shape):
            if not shape or any(d < 1 for d in shape):
                raise ValueError(
                    f"normalized_shape must be one or more positive ints, got {normalized_shape!r}"
                )
            return shape
    raise TypeError(
        f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
    )


def _check_like(name: str, t: Tensor | None, shape: tuple[int, ...], x: Tensor) -> None:
    if t is None:
        return
    check_float(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not (t.is_cpu and x.is_cpu) and t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _norm(x, normalized_shape, weight, bias, eps, residual, out_dtype, rms):
    """The contract both norms share (every backend accepts and refuses the same inputs),
    then the backend. The usual case of each check comes first and inline, the helpers that
    word the errors only when it fails: on a small tensor each Python call here is a
    visible share of the whole op."""
    if not isinstance(x, Tensor) or (s_dtype := x.dtype) not in FLOAT_DTYPES:
        check_float("x", x)
    n = normalized_shape
    if type(n) is not int:
        # A module's normalized_shape: a tuple (or a parameter's torch.Size) of one int.
        if (type(n) is tuple or type(n) is torch.Size) and len(n) == 1 and type(n[0]) is int:
            n = n[0]
        else:
            n = 0
    x_shape = x.shape
    if n > 0:
        shape = (n,)
        mismatch = not x_shape or x_shape[-1] != n
    else:
        shape = _check_shape(normalized_shape)
        mismatch = x_shape[-len(shape) :] != shape or len(x_shape) < len(shape)
    if mismatch:
        raise ValueError(
            f"normalized_shape {shape} must match the trailing dims of x, got x shape "
            f"{tuple(x_shape)}"
        )
    x_cpu = x.is_cpu
    # (Each dtype read once: the torch path below compares them again.)
    if weight is not None and (
        not isinstance(weight, Tensor)
        or (w_dtype := weight.dtype) not in FLOAT_DTYPES
        or weight.shape != shape
        or not (x_cpu and weight.is_cpu)
    ):
        _check_like("weight", weight, shape, x)
    if bias is not None and (
        not isinstance(bias, Tensor)
        or (b_dtype := bias.dtype) not in FLOAT_DTYPES
        or bias.shape != shape
        or not (x_cpu and bias.is_cpu)
    ):
        _check_like("bias", bias, shape, x)
    if residual is not None:
        if (
            not isinstance(residual, Tensor)
            or (r_dtype := residual.dtype) not in FLOAT_DTYPES
            or residual.shape != x_shape
            or not (x_cpu and residual.is_cpu)
        ):
            _check_like("residual", residual, x_shape, x)
            r_dtype = residual.dtype
        if r_dtype is not s_dtype:
            s_dtype = torch.promote_types(s_dtype, r_dtype)
    if eps is None:
        eps = _DEFAULT_RMS_EPS[s_dtype]  # default_rms_eps(), for the contract's dtypes
    # A literal bound, not math.inf: no global to read (nor for torch.compile to guard on); a
    # larger eps, inf or NaN takes check_real's exact test.
    elif type(eps) is not float or not 0.0 <= eps < 1e300:
        eps = check_real("eps", eps)
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
    if out_dtype is None:
        out_dtype = s_dtype
    elif not isinstance(out_dtype, torch.dtype) or out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    # What select() answers, without its call: the torch backend serves every call that passed
    # the contract, forced or chosen (the automatic choice on CPU tensors).
    forced = backend.forced_backend()
    if forced is None and x_cpu or forced == "torch":
        if (
            out_dtype is s_dtype
            and (weight is None or w_dtype is s_dtype)
            and (bias is None or b_dtype is s_dtype)
            and (not rms or x.numel() < _FUNCTION_MIN_NUMEL)
        ):
            # _torch_norm's plain case (nothing to cast; s in s_dtype, the sum's promoted
            # dtype) without its call and re-reads: the same ops.
            s = x if residual is None else x + residual
            if rms:
                y = _small_rms_norm(s, shape, weight, eps)
            else:
                y = torch.layer_norm(s, shape, weight, bias, eps)
            return y if residual is None else (y, s)
        return _torch_norm(x, shape, weight, bias, eps, residual, out_dtype, rms)
    name = backend.select(
        "rms_norm" if rms else "layer_norm",
        x,
        lambda: _support(x, weight, bias, residual, out_dtype, math.prod(shape)),
    )
    if name == "torch":
        return _torch_norm(x, shape, weight, bias, eps, residual, out_dtype, rms)
    y, s, _, _ = norm_fwd(x, weight, bias, residual, list(shape), eps, rms, out_dtype, name)
    return y if residual is None else (y, s)


_norm_under_autocast = autocast_policy(lower_precision=False)(_norm)


def _torch_weight(w: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # PyTorch's native norms take parameters in the input's dtype, or float32 beside a
    # reduced-precision input; anything else is cast (exactly, when it widens).
    if w is None or w.dtype == dtype or (w.dtype == torch.float32 and dtype.itemsize < 4):
        return w
    return w.to(dtype)


def _torch_norm(x, shape, weight, bias, eps, residual, out_dtype, rms):
    """The ``torch`` backend: PyTorch's own native ops (bit for bit), so CPU users pay
    nothing over plain PyTorch and ``torch.compile`` can fuse around it."""
    s = x if residual is None else x + residual
    # Compute in the wider of the input and output dtypes, so a float32 output of a bf16
    # input is not rounded to bf16 on the way.
    dtype = s.dtype
    if out_dtype is dtype:
        xs = s
    else:
        dtype = torch.promote_types(dtype, out_dtype)
        xs = s if dtype is s.dtype else s.to(dtype)
    w = weight if weight is None or weight.dtype is dtype else _torch_weight(weight, dtype)
    if not rms:
        y = torch.layer_norm(
            xs,
            shape,
            w,
            bias if bias is None or bias.dtype is dtype else _torch_weight(bias, dtype),
            eps,
        )
    elif xs.numel() < _FUNCTION_MIN_NUMEL:
        y = _small_rms_norm(xs, shape, w, eps)
    elif not _composable(xs, w):
        y = torch.rms_norm(xs, shape, w, eps)
    elif torch.is_grad_enabled() and (xs.requires_grad or (w is not None and w.requires_grad)):
        y = _RMSNormFunction.apply(xs, w, _reduced_dims(xs, shape), eps, shape)
    elif xs.numel() < _COMPOSED_MIN_NUMEL:
        y = torch.rms_norm(xs, shape, w, eps)
    else:
        y = _rms_norm_composed(xs, w, _reduced_dims(xs, shape), eps)[0]
    if out_dtype is not dtype:  # the native norms answer in their input's dtype
        y = y.to(out_dtype)
    return y if residual is None else (y, s)


# ---------------------------------------------------------------------------------------------
# RMSNorm on CPU tensors in fewer buffers. PyTorch's CPU RMSNorm is composed of elementwise
# ops (no fused kernel): upcast half inputs to float32, pow(2), mean, add eps, rsqrt, then
# x * rstd and * weight, each into a new full-size tensor. At a few hundred KB each new
# tensor is fresh pages from the OS, and their page faults cost more than the arithmetic
# (1024 x 4096 float32: 17.9 ms against LayerNorm's fused 2.1 ms). The same ops in the same
# order, written into one buffer, give the same bits from one allocation instead of three.

# Below these sizes the buffers come from the allocator's cache and the composed path's extra
# Python calls cost more than they save (measured crossovers on a 2-core EPYC: the forward
# alone at about 16K float32 elements, forward and backward at about 8K).
_COMPOSED_MIN_NUMEL = 32768
_FUNCTION_MIN_NUMEL = 8192
_OPMATH = (torch.float32, torch.float64)  # the dtypes PyTorch's RMSNorm computes in as given


# What torch.rms_norm calls after its own checks (which fastlm's contract has made) when the
# weight's dtype matches the input's; on CPU its kernel is the composition above.
_fused_rms_norm = getattr(torch, "_fused_rms_norm", None)


# Whether _fused_rms_norm reaches autograd on CPU through its decomposition (no autograd kernel
# of its own; so in torch 2.11 to 2.14): then under autograd it records the ops torch.rms_norm
# records, and calls that need grad can take it too (same graph, same bits, double backward).
_FUSED_DECOMPOSES = (
    _fused_rms_norm is not None
    and torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::_fused_rms_norm", "CompositeImplicitAutograd"
    )
    and not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm", "AutogradCPU")
)


def _small_rms_norm(xs, shape, w, eps):
    """``torch.rms_norm(xs, shape, w, eps)``: on a small tensor its repeated checks cost a
    microsecond, so plain eager CPU calls that it would send to ``_fused_rms_norm``, or that
    record the same ops through it under autograd, go there directly (same op, same bits)."""
    if (
        not _is_compiling()  # first: while tracing, the globals below are not read (guarded)
        and _fused_rms_norm is not None
        and type(xs) is Tensor
        and xs.is_cpu
        and (w is None or w.dtype is xs.dtype)
        and xs.is_contiguous()  # (a channels-last input takes another path)
        and not _dispatch_modes()
        and not _functorch_active()
        and (
            _FUSED_DECOMPOSES
            or not (_grad_enabled() and (xs.requires_grad or (w is not None and w.requires_grad)))
        )
    ):
        return _fused_rms_norm(xs, shape, w, eps)[0]
    return torch.rms_norm(xs, shape, w, eps)


def _composable(xs: Tensor, w: Tensor | None) -> bool:
    # Plain eager CPU tensors laid out as PyTorch's own ops would lay out their results (a
    # strided input could reduce in another order); compile, subclasses and modes get the
    # native op.
    return xs.is_cpu and xs.is_contiguous() and not _dispatcher_needed((xs, w))


def _reduced_dims(xs: Tensor, shape: Sequence[int]) -> int | tuple[int, ...]:
    # The dims in PyTorch's order, last first (an int for one: a tuple costs a microsecond
    # more to parse).
    if len(shape) == 1:
        return -1
    return tuple(range(xs.dim() - 1, xs.dim() - 1 - len(shape), -1))


def _rms_norm_composed(xs, w, dims, eps):
    """``(torch.rms_norm(xs, shape, w, eps), rstd)``, bit for bit: PyTorch's CPU ops in its
    order, the square and the result sharing one buffer (a float32 one beside the upcast
    for half inputs). ``dims``: see :func:`_reduced_dims`."""
    xf = xs if xs.dtype in _OPMATH else xs.float()
    buf = torch.mul(xf, xf)  # PyTorch's pow(x, 2) is this multiply (its kernel's special case)
    rstd = buf.mean(dims, keepdim=True).add_(eps).rsqrt_()
    torch.mul(xf, rstd, out=buf)
    if w is not None:
        buf.mul_(w)
    return (buf if buf.dtype is xs.dtype else buf.to(xs.dtype)), rstd


class _RMSNormFunction(torch.autograd.Function):
    """The composed forward under autograd, with a backward in two full-size buffers (PyTorch
    differentiates its composition op by op, about ten of them).

    With ``rstd`` saved, ``xhat = x * rstd``, ``g = dy * weight`` and
    ``c = mean(g * xhat)`` over the normalized dims: ``dx = (g - xhat * c) * rstd`` and
    ``dweight = sum(dy * xhat)`` over the others."""

    @staticmethod
    def forward(ctx, xs, w, dims, eps, shape):
        y, rstd = _rms_norm_composed(xs, w, dims, eps)
        ctx.save_for_backward(xs, w)
        ctx.rstd, ctx.eps, ctx.shape = rstd, eps, shape
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, w = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate PyTorch's own composition again, so that the
            # gradient is itself differentiable.
            return (*_native_rms_grads(dy, xs, w, ctx), None, None, None)
        dx, dw = _rms_norm_backward(dy, xs, w, ctx.rstd, ctx.needs_input_grad)
        return dx, dw, None, None, None


def _native_rms_grads(dy, xs, w, ctx):
    wants = [t for t, need in zip((xs, w), ctx.needs_input_grad[:2], strict=True) if need]
    with torch.enable_grad():
        y = torch.rms_norm(xs, ctx.shape, w, ctx.eps)
    grads = iter(torch.autograd.grad(y, wants, dy, create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2])


def _rms_norm_backward(dy, xs, w, rstd, needs_input_grad):
    xf = xs if xs.dtype in _OPMATH else xs.float()
    rows = rstd.numel()
    n = xf.numel() // rows
    xhat = torch.mul(xf, rstd)  # contiguous, as xs
    # dy * xhat, dweight's summands, laid out as xhat whatever dy's strides (an expanded dy).
    prod = torch.mul(dy, xhat, out=torch.empty_like(xhat)).view(rows, n)
    dw = None
    if w is None:
        c = prod.sum(1)
        g = dy
    else:
        wf = w.reshape(n)
        wf = wf if wf.dtype is xf.dtype else wf.to(xf.dtype)
        if needs_input_grad[1]:
            dw = prod.sum(0).view(w.shape)
            dw = dw if dw.dtype is w.dtype else dw.to(w.dtype)
        if not needs_input_grad[0]:
            return None, dw
        c = torch.mv(prod, wf)  # sum(dy * w * xhat) per row, without a third buffer
        g = torch.mul(dy, wf.view(w.shape), out=prod.view(xf.shape))
    if not needs_input_grad[0]:
        return None, dw
    dx = xhat.mul_(c.div_(n).view(rstd.shape))
    torch.sub(g, dx, out=dx)
    dx.mul_(rstd)
    return (dx if dx.dtype is xs.dtype else dx.to(xs.dtype)), dw


# ---------------------------------------------------------------------------------------------
# Custom ops. Inside, tensors are viewed as (M, N) rows; outputs are reshaped back.


def _vector(t: Tensor | None) -> Tensor | None:
    if t is None or (t.dim() == 1 and t.stride(0) == 1):  # as given: no new view to build
        return t
    return t.reshape(-1).contiguous()


def _rows(t: Tensor, n: int, one_dim: bool) -> Tensor:
    # as_rows(), skipped for what already is (M, N) rows with unit column stride (then every
    # output is already shaped like the input, and is returned without a view).
    if one_dim and t.dim() == 2 and t.stride(1) == 1:
        return t
    return as_rows(t, n)


def _like(t: Tensor, x: Tensor, x2: Tensor) -> Tensor:
    return t if x2 is x else t.view(x.shape)


def _norm_fwd(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    normalized_shape: list[int],
    eps: float,
    rms: bool,
    out_dtype: torch.dtype,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, residual_out, mean, rstd)``; absent outputs are empty tensors."""
    one_dim = len(normalized_shape) == 1
    n = normalized_shape[0] if one_dim else math.prod(normalized_shape)
    x2 = _rows(x, n, one_dim)
    r2 = None
    if residual is not None:
        if residual.dtype is not x.dtype:
            residual = residual.to(torch.promote_types(x.dtype, residual.dtype))
        r2 = _rows(residual, n, one_dim)
    y, s, mean, rstd = FORWARD[backend_name](
        x2, _vector(weight), _vector(bias), r2, eps, rms, out_dtype
    )
    return (
        _like(y, x, x2),
        absent(x, torch.float32) if s is None else _like(s, x, x2),
        absent(x, torch.float32) if mean is None else mean,
        rstd,
    )


_norm_fwd_op = torch.library.custom_op("fastlm::norm_fwd", _norm_fwd, mutates_args=())


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, normalized_shape, eps, rms, out_dtype, backend_name):
    m = x.numel() // math.prod(normalized_shape)
    s_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        absent(x, torch.float32) if residual is None else x.new_empty(x.shape, dtype=s_dtype),
        x.new_empty(0 if rms else m, dtype=torch.float32),
        x.new_empty(m, dtype=torch.float32),
    )


def _norm_bwd(
    dy: Tensor,
    xs: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dresidual_out: Tensor | None,
    normalized_shape: list[int],
    rms: bool,
    has_bias: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(dx, dweight, dbias)``: dx in ``xs.dtype``, the others float32 (N,) or
    empty. ``xs`` is the tensor that was normalized; ``dresidual_out`` is added to dx."""
    one_dim = len(normalized_shape) == 1
    n = normalized_shape[0] if one_dim else math.prod(normalized_shape)
    ds2 = None
    if dresidual_out is not None:
        ds2 = _rows(_as_dtype(dresidual_out, xs.dtype), n, one_dim)
    xs2 = _rows(xs, n, one_dim)
    dx, dw, db = BACKWARD[backend_name](
        _rows(dy, n, one_dim),
        xs2,
        _vector(weight),
        None if rms else mean,
        rstd,
        ds2,
        rms,
        has_bias,
    )
    return (
        _like(dx, xs, xs2),
        absent(xs, torch.float32) if dw is None else dw,
        absent(xs, torch.float32) if db is None else db,
    )


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    # t.to(dtype) without its cost (a microsecond) when t already has it; the same tensor.
    return t if t.dtype is dtype else t.to(dtype)


_norm_bwd_op = torch.library.custom_op("fastlm::norm_bwd", _norm_bwd, mutates_args=())
norm_bwd = EagerOp(_norm_bwd_op, _norm_bwd)


@_norm_bwd_op.register_fake
def _(dy, xs, weight, mean, rstd, dresidual_out, normalized_shape, rms, has_bias, backend_name):
    n = math.prod(normalized_shape)
    return (
        xs.new_empty(xs.shape),
        xs.new_empty(0 if weight is None else n, dtype=torch.float32),
        xs.new_empty(n if has_bias else 0, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, normalized_shape, _, rms, _, backend_name = inputs
    _, s, mean, rstd = output
    xs = x if residual is None else s
    ctx.save_for_backward(xs, weight, mean, rstd)
    ctx.normalized_shape = normalized_shape
    ctx.rms = rms
    # The backward runs where the forward did: a forced backend reaches it even when autograd
    # runs it after the use_backend() block has exited.
    ctx.backend_name = backend_name
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.x_dtype = x.dtype
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dy, ds, _dmean, _drstd):
    xs, weight, mean, rstd = ctx.saved_tensors
    has_residual = ctx.residual_dtype is not None
    if dy is None:  # only the residual output was used downstream
        dy = torch.zeros_like(xs)
    dx, dw, db = norm_bwd(
        dy,
        xs,
        weight,
        mean,
        rstd,
        ds if has_residual else None,
        ctx.normalized_shape,
        ctx.rms,
        ctx.has_bias,
        ctx.backend_name,
    )
    one_dim = len(ctx.normalized_shape) == 1  # dweight and dbias come shaped (N,)
    dweight = dbias = dres = None
    if weight is not None:
        dweight = _as_dtype(dw if one_dim else dw.view(weight.shape), weight.dtype)
    if ctx.has_bias:
        dbias = _as_dtype(db if one_dim else db.view(ctx.normalized_shape), ctx.bias_dtype)
    if has_residual:
        dres = _as_dtype(dx, ctx.residual_dtype)
    return _as_dtype(dx, ctx.x_dtype), dweight, dbias, dres, None, None, None, None, None


norm_fwd = EagerOp(_norm_fwd_op, _norm_fwd, _setup_context, _backward)


# ---------------------------------------------------------------------------------------------
# Compiled backends. Each takes (M, N) rows with unit column stride and follows the kernel
# contract of ``kernels/norm.py``.


def _first_error(*errors: str | None) -> str | None:
    return next((e for e in errors if e is not None), None)


def _support(x, weight, bias, residual, out_dtype, n) -> dict[str, SupportCheck]:
    """Per backend, a check returning why it cannot serve these arguments (or None)."""

    def triton_error():
        if (
            x.dtype in FLOAT32_AND_HALF_DTYPES
            and (weight is None or weight.dtype in FLOAT32_AND_HALF_DTYPES)
            and (bias is None or bias.dtype in FLOAT32_AND_HALF_DTYPES)
            and (residual is None or residual.dtype in FLOAT32_AND_HALF_DTYPES)
            and out_dtype in FLOAT32_AND_HALF_DTYPES
        ):
            return None  # the usual answer, without wording every argument's
        return _first_error(
            *(
                dtype_error(k, t, FLOAT32_AND_HALF_DTYPES)
                for k, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual))
            ),
            None
            if out_dtype in FLOAT32_AND_HALF_DTYPES
            else f"out_dtype {out_dtype} is not supported",
        )

    def cuda_error():
        return _first_error(
            triton_error(), _cuda_layout_error(x, weight, bias, residual, out_dtype, n)
        )

    return supports(triton_error, cuda_error)


def _cuda_layout_error(x2, w, b, r2, out_dtype, n) -> str | None:
    # The C++ kernels are instantiated for weight and output dtypes equal to the input's or
    # float32, and a residual of the input's dtype (csrc/norm.cu).
    if n > 65536:
        return f"hidden size {n} exceeds the CUDA kernels' 65536"
    if w is not None and w.dtype not in (x2.dtype, torch.float32):
        return f"weight dtype {w.dtype} must equal the input's ({x2.dtype}) or be float32"
    if w is not None and b is not None and b.dtype != w.dtype:
        return f"bias dtype {b.dtype} must equal weight dtype {w.dtype}"
    if r2 is not None and r2.dtype != x2.dtype:
        return f"residual dtype {r2.dtype} must equal the input's ({x2.dtype})"
    if out_dtype not in (x2.dtype, torch.float32):
        return f"output dtype {out_dtype} must equal the input's ({x2.dtype}) or be float32"
    return None


def _triton_fwd(x2, w, b, r2, eps, rms, out_dtype):
    from fastlm.kernels import norm as kernels

    return kernels.norm_fwd(x2, w, b, r2, eps, rms, out_dtype)


def _triton_bwd(dy2, xs2, w, mean, rstd, ds2, rms, has_bias):
    from fastlm.kernels import norm as kernels

    return kernels.norm_bwd(dy2, xs2, w, mean, rstd, ds2, rms, has_bias, xs2.dtype)


def _cuda_fwd(x2, w, b, r2, eps, rms, out_dtype):
    y, s, mean, rstd = torch.ops.fastlm_C.norm_fwd(x2, w, b, r2, eps, rms, out_dtype)
    return y, None if r2 is None else s, None if rms else mean, rstd


def _cuda_bwd(dy2, xs2, w, mean, rstd, ds2, rms, has_bias):
    stats = absent(rstd, torch.float32) if mean is None else mean
    dx, dw, db = torch.ops.fastlm_C.norm_bwd(
        dy2, xs2, w, stats, rstd, ds2, rms, has_bias, xs2.dtype
    )
    return dx, dw if w is not None else None, db if has_bias else None


# The kernel contract of kernels/norm.py, per backend (the kernel tests call these directly).
FORWARD = {"cuda": _cuda_fwd, "triton": _triton_fwd}
BACKWARD = {"cuda": _cuda_bwd, "triton": _triton_bwd}
backend.register_op("layer_norm", ("cuda", "triton", "torch"))
backend.register_op("rms_norm", ("cuda", "triton", "torch"))
