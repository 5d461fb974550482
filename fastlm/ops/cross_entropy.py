"""Cross-entropy on (N, V) logits, and the fused linear projection + cross-entropy.

``cross_entropy`` is ``torch.nn.functional.cross_entropy`` for class-index targets, plus an
optional z-loss (``z_loss * logsumexp(logits)**2`` per non-ignored row, as in PaLM). The
Triton path is a pair of ``torch.library`` custom ops (``fastlm::cross_entropy_fwd`` /
``_bwd``) returning per-row fp32 losses; the reduction is plain PyTorch on top, so autograd
hands every reduction's gradient ("none" included) to the backward kernel as per-row
weights.

``linear_cross_entropy`` computes ``cross_entropy(hidden @ weight.T + bias, target)`` in
token chunks so that the (N, V) logits never exist at once (Liger's fused linear
cross-entropy). For "mean"/"sum", the forward also computes d_hidden, d_weight and d_bias
chunk by chunk (the logits chunk is overwritten by its own gradient) and keeps them for the
backward, which only scales them by the incoming gradient. For "none", the per-row
gradient is only known in the backward, so the backward recomputes the chunks.

Both ops take Gemma-2-style final-logit soft-capping (``softcap``: the loss is of
``softcap * tanh(logits / softcap)``), class weights (``weight=`` / ``ce_weight=``, as
``F.cross_entropy``'s ``weight``), and can return, beside the loss, the z-loss term alone
(``return_z_loss``, for logging) and the token accuracy (``return_token_accuracy``): then
the result is a :class:`CrossEntropyOutput` (fields not asked for are None); without either
flag it is the loss tensor, as before.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    SupportCheck,
    absent,
    dtype_error,
    last_dim_contiguous,
    supports,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_float, check_real, values_readable

_REDUCTIONS = ("mean", "sum", "none")
_INT32 = (-(2**31), 2**31 - 1)


# ---------------------------------------------------------------------------------------------
# Reference: the plainest formula, run by the tests in float64 as the oracle.


class CrossEntropyOutput(NamedTuple):
    """What :func:`cross_entropy` and :func:`linear_cross_entropy` return when asked for
    more than the loss. ``z_loss``: the z-loss term alone (``z_loss * lse**2`` per row,
    weighted and reduced as the loss, which already includes it; zeros when ``z_loss=0``),
    detached, in the loss's dtype; ``token_accuracy``: float32, detached, the fraction of
    non-ignored rows whose (soft-capped) logits' first maximum is at the target (NaN when
    every row is ignored), or, with ``reduction="none"``, 1.0/0.0 per row (0 for ignored
    rows). A field not asked for is None."""

    loss: Tensor
    z_loss: Tensor | None = None
    token_accuracy: Tensor | None = None


def cross_entropy_ref(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    weight: Tensor | None = None,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> Tensor | CrossEntropyOutput:
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = logits.log_softmax(-1)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    w = torch.ones(logits.shape[-1], dtype=logits.dtype) if weight is None else weight
    w = w.to(logits)
    row_w = w[t] * valid
    nll = -logp.gather(1, t[:, None]).squeeze(1) * row_w
    smooth = -(logp * w).sum(-1) / logits.shape[-1] * valid
    lse = torch.logsumexp(logits, -1)
    z_rows = z_loss * lse**2 * row_w
    rows = (1 - label_smoothing) * nll + label_smoothing * smooth + z_rows

    def reduce(r):
        if reduction == "none":
            return r
        return r.sum() if reduction == "sum" else r.sum() / row_w.sum()

    loss = reduce(rows)
    if not (return_z_loss or return_token_accuracy):
        return loss
    correct = ((logits.argmax(-1) == target) & valid).float()
    accuracy = correct if reduction == "none" else correct.sum() / valid.sum()
    return CrossEntropyOutput(
        loss,
        reduce(z_rows).detach() if return_z_loss else None,
        accuracy if return_token_accuracy else None,
    )


# ---------------------------------------------------------------------------------------------
# Public API.


@autocast_policy(lower_precision=False)
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    weight: Tensor | None = None,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Cross-entropy of ``logits`` against class indices, as ``F.cross_entropy``.

    Args:
        logits: (N, V) float32/float16/bfloat16 (float64 on the torch backend); any row
            stride. The math is float32 on the kernels whatever the dtype.
        target: (N,) integer class indices in ``[0, V)``, or ``ignore_index``.
        ignore_index: rows with this target contribute no loss and get zero gradient;
            "mean" divides by the number of the other rows (NaN when there are none, as
            torch).
        label_smoothing: in [0, 1], as ``F.cross_entropy``.
        reduction: "mean", "sum" or "none" (then the (N,) per-row losses).
        z_loss: adds ``z_loss * logsumexp(logits_i)**2`` per non-ignored row (times the
            row's class weight).
        weight: (V,) float class weights, as ``F.cross_entropy``: a row's loss is scaled by
            its target's weight (the smoothing term by each class's), and "mean" divides by
            the sum of the non-ignored rows' target weights. Not differentiated (one that
            requires grad is refused, as ``F.cross_entropy`` refuses it).
        softcap: None or 0: off; else > 0, and the loss is of
            ``softcap * tanh(logits / softcap)`` (Gemma 2's final-logit soft-capping).
        return_z_loss, return_token_accuracy: return a :class:`CrossEntropyOutput` with the
            z-loss term and/or the token accuracy beside the loss.

    Returns the loss in the dtype of ``logits`` (or a :class:`CrossEntropyOutput`). The
    input is never modified.
    """
    _check_common(logits, target, "logits", ignore_index, label_smoothing, reduction, z_loss)
    weight = _check_class_weight("weight", weight, logits.shape[1], logits.device)
    softcap = _check_softcap(softcap)
    _check_flags(return_z_loss, return_token_accuracy)
    name = backend.select("cross_entropy", logits.device, _support(logits, ignore_index))
    if name == "torch":
        loss, lse, argmax = _torch_cross_entropy(
            logits,
            target,
            ignore_index,
            label_smoothing,
            reduction,
            z_loss,
            weight,
            softcap,
            return_z_loss,
            return_token_accuracy,
        )
    else:
        rows, lse, argmax = torch.ops.fastlm.cross_entropy_fwd(
            logits,
            target,
            weight,
            ignore_index,
            float(label_smoothing),
            float(z_loss),
            softcap,
            return_token_accuracy,
            name,
        )
        row_w = _row_weights(target, ignore_index, weight, rows.dtype)
        loss = _reduce(rows, row_w, reduction).to(logits.dtype)
    if not (return_z_loss or return_token_accuracy):
        return loss
    argmax = argmax if return_token_accuracy else None  # the custom ops return it empty
    return _output(
        loss, lse, argmax, target, ignore_index, weight, reduction, z_loss, return_z_loss
    )


@autocast_policy(lower_precision=True)
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
    ce_weight: Tensor | None = None,
    softcap: float | None = None,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> Tensor | CrossEntropyOutput:
    """``cross_entropy(F.linear(hidden, weight, bias), target, ...)`` without ever holding
    the (N, V) logits: tokens are processed ``chunk_size`` rows at a time.

    Args:
        hidden: (N, H) float tensor; ``weight`` (V, H) and ``bias`` (V,) of the same dtype
            and device.
        target, ignore_index, label_smoothing, reduction, z_loss, softcap, return_z_loss,
            return_token_accuracy: as :func:`cross_entropy`; the soft cap applies to each
            logits chunk, and the token accuracy's argmax is taken chunk by chunk too.
        chunk_size: rows per chunk. Default: a power of two near ``N * H / V``, so a logits
            chunk is about the size of ``hidden``.
        out_dtype: the returned loss's dtype. Default: ``hidden``'s, as ``F.cross_entropy``
            on its logits; ``torch.float32`` keeps the fp32 sum unrounded (a bf16 loss moves
            in steps of ~0.02 around 4, too coarse to log), as Hugging Face's model losses.
        ce_weight: (V,) class weights, as :func:`cross_entropy`'s ``weight`` (named as
            Liger's: ``weight`` here is the projection's).

    Peak extra memory is one (chunk, V) logits chunk plus d_hidden (N, H) and a float32
    d_weight (V, H), instead of several (N, V) tensors. Gradients reach ``hidden``,
    ``weight`` and ``bias``; for "mean"/"sum" they are computed during the forward (see the
    module docstring).
    """
    check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden.shape)}")
    check_float("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] < 1:
        raise ValueError(
            f"weight must be (V, {hidden.shape[1]}) with V >= 1, got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_float("bias", bias)
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{arg} must have hidden's dtype {hidden.dtype}, got {t.dtype}")
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{arg} is on {t.device} but hidden is on {hidden.device}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must have shape ({v},), got {tuple(bias.shape)}")
    _check_target(target, hidden.shape[0], v, hidden.device, ignore_index)
    _check_options(ignore_index, label_smoothing, reduction, z_loss)
    if out_dtype is not None and not (
        isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point
    ):
        raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype!r}")
    ce_weight = _check_class_weight("ce_weight", ce_weight, v, hidden.device)
    softcap = _check_softcap(softcap)
    _check_flags(return_z_loss, return_token_accuracy)
    n, h = hidden.shape
    if chunk_size is None:
        chunk_size = default_chunk_size(n, h, v)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    name = backend.select(
        "linear_cross_entropy", hidden.device, _linear_support(hidden, ignore_index)
    )
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    loss, lse, argmax, _, _, _ = torch.ops.fastlm.linear_cross_entropy_fwd(
        hidden,
        weight,
        bias,
        target,
        ce_weight,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        softcap,
        reduction,
        chunk_size,
        needs_grad and reduction != "none",
        return_token_accuracy,
        name,
    )
    if reduction == "mean":
        loss = loss / _row_weights(target, ignore_index, ce_weight, loss.dtype).sum()
    loss = loss.to(hidden.dtype if out_dtype is None else out_dtype)
    if not (return_z_loss or return_token_accuracy):
        return loss
    argmax = argmax if return_token_accuracy else None  # the custom ops return it empty
    return _output(
        loss, lse, argmax, target, ignore_index, ce_weight, reduction, z_loss, return_z_loss
    )


# Fewer rows make the chunk's GEMMs matrix-vector-like: at hidden 128 and a 50k vocabulary,
# Liger's rule alone gives 2-row chunks and a 4x slower training step (bench_models, CPU).
MIN_CHUNK_ROWS = 128


def default_chunk_size(n: int, h: int, v: int) -> int:
    """Rows per chunk: the power of two nearest ``N / ceil(V / H)`` (Liger's choice), so
    a (chunk, V) logits chunk holds about as many elements as ``hidden`` (N, H), and at
    least :data:`MIN_CHUNK_ROWS`."""
    return max(MIN_CHUNK_ROWS, _next_power_of_2(math.ceil(n / math.ceil(v / h))))


def _next_power_of_2(x: int) -> int:
    # triton.next_power_of_2's rule, without importing Triton (the torch backend needs none).
    return 1 << max(0, x - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Validation.


def _check_target(target: Tensor, n: int, v: int, device: torch.device, ignore_index) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != (n,):
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits are on {device}")
    # One device-to-host copy on GPUs, where an out-of-range class would be a device-side
    # assert on the torch backend and NaN on the kernels; skipped where values cannot be read.
    if n and values_readable(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= v))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, {v})")


def _check_options(ignore_index, label_smoothing, reduction, z_loss) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not 0.0 <= check_real("label_smoothing", label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if check_real("z_loss", z_loss) < 0.0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


def _check_common(logits, target, name, ignore_index, label_smoothing, reduction, z_loss):
    check_float(name, logits)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (N, V) with V >= 1, got {tuple(logits.shape)}")
    _check_target(target, logits.shape[0], logits.shape[1], logits.device, ignore_index)
    _check_options(ignore_index, label_smoothing, reduction, z_loss)


def _check_class_weight(name: str, w, v: int, device: torch.device) -> Tensor | None:
    if w is None:
        return None
    check_float(name, w)
    if tuple(w.shape) != (v,) or w.device != device:
        raise ValueError(
            f"{name} must be a ({v},) tensor on {device}, got shape {tuple(w.shape)} on {w.device}"
        )
    if w.requires_grad and torch.is_grad_enabled():
        # As F.cross_entropy, which refuses to differentiate class weights.
        raise ValueError(f"{name} must not require grad: class weights are not differentiated")
    return w


def _check_softcap(softcap) -> float:
    """The cap as a float, 0.0 meaning none."""
    if softcap is None:
        return 0.0
    if check_real("softcap", softcap) < 0.0:
        raise ValueError(f"softcap must be None, 0 (off) or a positive number, got {softcap}")
    return float(softcap)


def _check_flags(return_z_loss, return_token_accuracy) -> None:
    for name, flag in (
        ("return_z_loss", return_z_loss),
        ("return_token_accuracy", return_token_accuracy),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")


def _kernel_error(name: str, t: Tensor, ignore_index: int) -> str | None:
    if error := dtype_error(name, t, FLOAT32_AND_HALF_DTYPES):
        return error
    if not _INT32[0] <= ignore_index <= _INT32[1]:
        return f"ignore_index {ignore_index} does not fit the kernels' int32"
    return None


def _support(logits, ignore_index) -> dict[str, SupportCheck]:
    return supports(lambda: _kernel_error("logits", logits, ignore_index))


def _linear_support(hidden, ignore_index) -> dict[str, SupportCheck]:
    return supports(lambda: _kernel_error("hidden", hidden, ignore_index))


def _row_weights(target: Tensor, ignore_index: int, weight: Tensor | None, dtype) -> Tensor:
    """Each row's share of a "mean": its target's class weight (1 without weights), 0 for
    ignored rows."""
    valid = target != ignore_index
    if weight is None:
        return valid.to(dtype)
    return weight.to(dtype)[torch.where(valid, target, 0).long()] * valid


def _reduce(rows: Tensor, row_w: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / row_w.sum()


def _output(loss, lse, argmax, target, ignore_index, weight, reduction, z_loss, want_z):
    """The :class:`CrossEntropyOutput` of a call: the z-loss term from the per-row fp32
    ``lse`` (reduced as the loss), the accuracy from the per-row ``argmax`` (None: not
    asked)."""
    z_term = None
    if want_z:
        row_w = _row_weights(target, ignore_index, weight, lse.dtype)
        z_rows = z_loss * lse.detach() ** 2 * row_w
        z_term = _reduce(z_rows, row_w, reduction).to(loss.dtype)
    accuracy = None
    if argmax is not None:
        valid = target != ignore_index
        correct = ((argmax.long() == target.long()) & valid).float()
        accuracy = correct if reduction == "none" else correct.sum() / valid.sum()
    return CrossEntropyOutput(loss, z_term, accuracy)


# ---------------------------------------------------------------------------------------------
# The torch backend of cross_entropy: PyTorch's own native op (what CPU users run).


def _torch_cross_entropy(
    logits, target, ignore_index, smoothing, reduction, z_loss, weight, softcap, want_z, want_acc
):
    """``(loss, lse, argmax)``: the loss in ``logits``' dtype; the per-row log-sum-exp
    (when a z-loss is added or returned) and argmax (when the accuracy is asked), else
    None."""
    target = target.long()
    x = logits
    if softcap:
        # In float32 at least, as the kernels: a bf16 tanh would round every logit.
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        x = softcap * torch.tanh(wide / softcap)
    if weight is not None and weight.dtype != x.dtype:
        # F.cross_entropy takes weights in the logits' dtype: widen the logits rather than
        # round the weights.
        x = x.to(torch.promote_types(x.dtype, weight.dtype))
    w = None if weight is None else weight.to(x.dtype)
    loss = F.cross_entropy(
        x, target, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing
    )
    lse = argmax = None
    if z_loss != 0.0 or want_z:
        lse = torch.logsumexp(x.to(torch.promote_types(x.dtype, torch.float32)), -1)
    if want_acc:
        argmax = x.detach().argmax(-1)
    if z_loss != 0.0:
        row_w = _row_weights(target, ignore_index, w, lse.dtype)
        z_total = _reduce(z_loss * lse * lse * row_w, row_w, reduction)
        loss = loss + z_total.to(loss.dtype)
    return loss.to(logits.dtype), lse, argmax


# ---------------------------------------------------------------------------------------------
# Per-row loss and gradient of one (rows, V) block, per backend: the kernel contract of
# kernels/cross_entropy.py. ``grad=True`` overwrites ``logits`` with the gradient of each
# row's loss times ``row_scale`` (1 when None; 0 for ignored rows).


class RowOptions(NamedTuple):
    """The per-row loss's settings, as the kernels take them (``softcap`` 0: none;
    ``weight``: (V,) class weights or None; ``argmax``: also return each row's argmax)."""

    ignore_index: int
    smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float = 0.0
    weight: Tensor | None = None
    argmax: bool = False


def _torch_rows(logits, target, o: RowOptions, grad, row_scale=None):
    """``(loss, lse, argmax or None)`` per row, float32 (float64 for float64 logits)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    v = x.shape[1]
    t_cap = None
    if o.softcap:
        t_cap = torch.tanh(x / o.softcap)
        x = o.softcap * t_cap
    lse = torch.logsumexp(x, -1)
    valid = target != o.ignore_index
    t = torch.where(valid, target, 0).long()
    w = None if o.weight is None else o.weight.to(x.dtype)
    w_t = 1.0 if w is None else w[t]
    loss = (lse - x.gather(1, t[:, None]).squeeze(1)) * w_t
    if o.smoothing:
        smooth = lse - x.mean(-1) if w is None else (lse * w.sum() - x @ w) / v
        loss = (1.0 - o.smoothing) * loss + o.smoothing * smooth
    if o.z_loss:
        loss = loss + o.z_loss * lse * lse * w_t
    loss = torch.where(valid, loss, 0.0)
    argmax = x.argmax(-1) if o.argmax else None
    if grad:
        # In place on the float32 logits (a copy for narrower dtypes), then back into logits.
        g = x.sub_(lse[:, None]).exp_()
        # p_coef * softmax - target_coef * [j == t] - smoothing / V * w_j, per row.
        if w is None:
            if o.z_loss:
                g.mul_((1.0 + 2.0 * o.z_loss * lse)[:, None])
        else:
            p_coef = (1.0 - o.smoothing) * w_t + 2.0 * o.z_loss * lse * w_t
            g.mul_((p_coef + o.smoothing / v * w.sum())[:, None])
        if o.smoothing:
            g.sub_(o.smoothing / v if w is None else o.smoothing / v * w)
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, t] -= (1.0 - o.smoothing) * w_t
        if t_cap is not None:
            g.mul_(1.0 - t_cap * t_cap)
        scale = valid.to(g.dtype) if row_scale is None else row_scale.float() * valid
        g.mul_(scale[:, None])
        if g.data_ptr() != logits.data_ptr():
            logits.copy_(g)
    return loss, lse, argmax


def _triton_rows(logits, target, o: RowOptions, grad, row_scale=None):
    from fastlm.kernels import cross_entropy as kernels

    n = logits.shape[0]
    argmax = logits.new_empty(n, dtype=torch.int32) if o.argmax else None
    kw = dict(weight=o.weight, softcap=o.softcap)
    if not grad or row_scale is None:
        loss, lse = kernels.cross_entropy_fwd(
            logits,
            target,
            o.ignore_index,
            o.smoothing,
            o.z_loss,
            logits if grad else None,
            argmax=argmax,
            **kw,
        )
        return loss, lse, argmax
    loss, lse = kernels.cross_entropy_fwd(
        logits, target, o.ignore_index, o.smoothing, o.z_loss, argmax=argmax, **kw
    )
    kernels.cross_entropy_bwd(
        row_scale, logits, target, lse, o.ignore_index, o.smoothing, o.z_loss, out=logits, **kw
    )
    return loss, lse, argmax


def _triton_bwd(dloss, logits, target, lse, o: RowOptions):
    from fastlm.kernels import cross_entropy as kernels

    return kernels.cross_entropy_bwd(
        dloss,
        logits,
        target,
        lse,
        o.ignore_index,
        o.smoothing,
        o.z_loss,
        weight=o.weight,
        softcap=o.softcap,
    )


ROWS = {"torch": _torch_rows, "triton": _triton_rows}
FORWARD = {"triton": lambda *a: _triton_rows(*a, grad=False)}
BACKWARD = {"triton": _triton_bwd}


# ---------------------------------------------------------------------------------------------
# cross_entropy custom ops (the Triton path).


@torch.library.custom_op("fastlm::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    compute_argmax: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, argmax)``: float32 (N,), and int32 (N,) (empty unless
    ``compute_argmax``)."""
    opts = RowOptions(ignore_index, label_smoothing, z_loss, softcap, weight, compute_argmax)
    loss, lse, argmax = FORWARD[backend_name](
        last_dim_contiguous(logits), target.long().contiguous(), opts
    )
    return loss, lse, logits.new_empty(0, dtype=torch.int32) if argmax is None else argmax


@_cross_entropy_fwd_op.register_fake
def _(logits, target, weight, ignore_index, smoothing, z_loss, softcap, argmax, backend_name):
    n = logits.shape[0]
    f32 = torch.float32
    return (
        logits.new_empty(n, dtype=f32),
        logits.new_empty(n, dtype=f32),
        logits.new_empty(n if argmax else 0, dtype=torch.int32),
    )


@torch.library.custom_op("fastlm::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(
    dloss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend_name: str,
) -> Tensor:
    """``dlogits`` (N, V) in the dtype of ``logits`` from the per-row gradient ``dloss``."""
    return BACKWARD[backend_name](
        dloss,
        last_dim_contiguous(logits),
        target.long().contiguous(),
        lse,
        RowOptions(ignore_index, label_smoothing, z_loss, softcap, weight),
    )


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, target, weight, lse, ignore_index, smoothing, z_loss, softcap, backend_name):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, smoothing, z_loss, softcap, _, backend_name = inputs
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.args = (ignore_index, smoothing, z_loss, softcap, backend_name)


def _ce_backward(ctx, dloss, _dlse, _dargmax):
    logits, target, weight, lse = ctx.saved_tensors
    none = (None,) * 8
    if dloss is None:
        return None, *none
    dlogits = torch.ops.fastlm.cross_entropy_bwd(dloss, logits, target, weight, lse, *ctx.args)
    return dlogits, *none


torch.library.register_autograd(
    "fastlm::cross_entropy_fwd", _ce_backward, setup_context=_ce_setup_context
)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy custom ops (both backends: the chunked algorithm is the same).


def _chunked(
    hidden, weight, bias, target, opts: RowOptions, chunk_size, backend_name, grad, row_scale=None
):
    """Loop over token chunks: logits chunk, per-row loss, and (``grad``) the chunk's
    d_hidden rows and its d_weight/d_bias contributions. Returns ``(loss_rows, lse, argmax,
    dhidden, dweight, dbias)``; the gradients are of ``sum_i row_scale_i * loss_i`` (scale 1
    when ``row_scale`` is None), dweight/dbias float32; argmax None unless ``opts.argmax``."""
    rows_fn = ROWS[backend_name]
    n, h = hidden.shape
    v = weight.shape[0]
    target = target.long()
    loss = hidden.new_empty(n, dtype=_loss_dtype(hidden.dtype))
    lse = hidden.new_empty(n, dtype=_loss_dtype(hidden.dtype))
    argmax = hidden.new_empty(n, dtype=torch.int64) if opts.argmax else None
    dh = torch.empty_like(hidden) if grad else None
    dw = weight.new_zeros((v, h), dtype=torch.float32) if grad else None
    db = weight.new_zeros(v, dtype=torch.float32) if grad and bias is not None else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        hc = hidden[start:end]
        logits = F.linear(hc, weight, bias)  # (chunk, V): the only vocabulary-sized buffer
        scale = None if row_scale is None else row_scale[start:end]
        loss[start:end], lse[start:end], chunk_argmax = rows_fn(
            logits, target[start:end], opts, grad, scale
        )
        if argmax is not None:
            argmax[start:end] = chunk_argmax
        if not grad:
            continue
        # logits now holds dloss/dlogits for this chunk.
        torch.mm(logits, weight, out=dh[start:end])
        if logits.dtype == torch.float32:
            dw.addmm_(logits.t(), hc)
        else:
            dw += torch.mm(logits.t(), hc).float()
        if db is not None:
            db += logits.sum(0, dtype=torch.float32)
    return loss, lse, argmax, dh, dw, db


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float64 stays float64 (gradcheck)


@torch.library.custom_op("fastlm::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ce_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    reduction: str,
    chunk_size: int,
    compute_grad: bool,
    compute_argmax: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, argmax, dhidden, dweight, dbias)``: float32 (float64 for float64) loss
    rows (reduction "none") or their sum (0-dim; "mean" divides outside), the per-row
    log-sum-exp, the per-row argmax (int64; empty unless ``compute_argmax``), and, with
    ``compute_grad``, the gradients of that sum (dweight/dbias float32; empty tensors
    otherwise)."""
    opts = RowOptions(ignore_index, label_smoothing, z_loss, softcap, ce_weight, compute_argmax)
    loss, lse, argmax, dh, dw, db = _chunked(
        hidden.contiguous(),
        weight.contiguous(),
        bias,
        target,
        opts,
        chunk_size,
        backend_name,
        compute_grad,
    )
    if reduction != "none":
        loss = loss.sum()
    f32 = torch.float32
    return (
        loss,
        lse,
        hidden.new_empty(0, dtype=torch.int64) if argmax is None else argmax,
        absent(hidden, f32) if dh is None else dh,
        absent(hidden, f32) if dw is None else dw,
        absent(hidden, f32) if db is None else db,
    )


@_linear_ce_fwd_op.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    ce_weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    reduction,
    chunk_size,
    compute_grad,
    compute_argmax,
    backend_name,
):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = torch.float32
    loss_dtype = _loss_dtype(hidden.dtype)
    return (
        hidden.new_empty(n if reduction == "none" else (), dtype=loss_dtype),
        hidden.new_empty(n, dtype=loss_dtype),
        hidden.new_empty(n if compute_argmax else 0, dtype=torch.int64),
        hidden.new_empty(hidden.shape) if compute_grad else hidden.new_empty(0, dtype=f32),
        hidden.new_empty((v, h) if compute_grad else 0, dtype=f32),
        hidden.new_empty(v if compute_grad and bias is not None else 0, dtype=f32),
    )


@torch.library.custom_op("fastlm::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(
    dloss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    ce_weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes the chunks for reduction "none": gradients of ``sum_i dloss_i * loss_i``."""
    opts = RowOptions(ignore_index, label_smoothing, z_loss, softcap, ce_weight)
    _, _, _, dh, dw, db = _chunked(
        hidden.contiguous(),
        weight.contiguous(),
        bias,
        target,
        opts,
        chunk_size,
        backend_name,
        True,
        dloss.float(),
    )
    return dh, dw, absent(hidden, torch.float32) if db is None else db


@_linear_ce_bwd_op.register_fake
def _(
    dloss,
    hidden,
    weight,
    bias,
    target,
    ce_weight,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    chunk_size,
    backend_name,
):
    v = weight.shape[0]
    return (
        hidden.new_empty(hidden.shape),
        hidden.new_empty(tuple(weight.shape), dtype=torch.float32),
        hidden.new_empty(v if bias is not None else 0, dtype=torch.float32),
    )


def _linear_setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        target,
        ce_weight,
        ignore_index,
        smoothing,
        z_loss,
        softcap,
        reduction,
        chunk_size,
        _,
        _,
        backend_name,
    ) = inputs
    _, _, _, dh, dw, db = output
    ctx.reduction = reduction
    ctx.has_bias = bias is not None
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.args = (ignore_index, smoothing, z_loss, softcap, chunk_size, backend_name)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, ce_weight)
    else:
        ctx.save_for_backward(dh, dw, db)


def _linear_backward(ctx, dloss, _dlse, _dargmax, _ddh, _ddw, _ddb):
    none = (None,) * 11
    if dloss is None:
        return None, None, None, *none
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    if ctx.reduction == "none":
        hidden, weight, bias, target, ce_weight = ctx.saved_tensors
        dh, dw, db = torch.ops.fastlm.linear_cross_entropy_bwd(
            dloss, hidden, weight, bias, target, ce_weight, *ctx.args
        )
        return dh, dw.to(w_dtype), db.to(b_dtype) if ctx.has_bias else None, *none
    dh, dw, db = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError(
            "linear_cross_entropy: backward reached a forward that computed no gradients "
            "(it ran with grad disabled or with no input requiring grad)"
        )
    g = dloss.float()
    return (
        (dh * g).to(h_dtype),
        (dw * g).to(w_dtype),
        (db * g).to(b_dtype) if ctx.has_bias else None,
        *none,
    )


torch.library.register_autograd(
    "fastlm::linear_cross_entropy_fwd", _linear_backward, setup_context=_linear_setup_context
)

backend.register_op("cross_entropy", ("triton", "torch"))
backend.register_op("linear_cross_entropy", ("triton", "torch"))
