"""Cross-entropy on (N, V) logits, and the fused linear projection + cross-entropy.

``cross_entropy`` is ``torch.nn.functional.cross_entropy`` for class-index targets, plus an
optional z-loss (``z_loss * logsumexp(logits)**2`` per non-ignored row, as in PaLM). The
Triton path is a pair of ``torch.library`` custom ops (``fastlm::cross_entropy_fwd`` /
``_bwd``) returning per-row fp32 losses; the reduction is plain PyTorch on top, so autograd
hands every reduction's gradient ("none" included) to the backward kernel as per-row
weights.

``linear_cross_entropy`` computes ``cross_entropy(hidden @ weight.T + bias, target)`` in
token chunks so that the (N, V) logits never exist at once (Liger's fused linear
cross-entropy). For "mean"/"sum", the forward also computes the gradients of the inputs
that require grad, chunk by chunk (the logits chunk is overwritten by its own gradient), and
keeps them for the backward, which only scales them by the incoming gradient. For "none",
each row's upstream gradient weighs its share of d_weight and is only known in the
backward, so the backward recomputes the chunks. The torch backend (what CPU users run)
reuses one (chunk, V) buffer for every chunk and computes in place.

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
from torch.autograd.function import once_differentiable

from fastlm import backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    EagerOp,
    SupportCheck,
    absent,
    any_autocast,
    dtype_error,
    is_dynamo_compiling,
    last_dim_contiguous,
    remember,
    signature_memo,
    supports,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_float, check_real, check_softcap, values_readable

_REDUCTIONS = ("mean", "sum", "none")
# torch.nn.functional's codes for them (torch.nn._reduction.get_enum).
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}
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


# Looked up once: each attribute walk through torch costs on every call of a small loss.
_forced_backend = backend.forced_backend
# F.cross_entropy's native op and F.linear, without F.cross_entropy's Python wrapper.
_native_cross_entropy = torch._C._nn.cross_entropy_loss
_native_linear = torch._C._nn.linear

# The tensor signatures (types, shapes, dtypes, devices) that passed an op's checks of its
# tensors' metadata, each mapped to what those checks worked out (fastlm.ops._common's
# memo rules: passes only, bounded, not while Dynamo traces). The other arguments, the
# target's classes and the class weights are checked on every call.
_ce_plans = signature_memo()
_linear_plans = signature_memo()


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
    plan = None
    if any_autocast() or is_dynamo_compiling():
        key = None
        if any_autocast():
            return _cross_entropy_autocast(
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
        try:
            # is_cpu first: True hashes and compares for less than a device.
            key = (
                type(logits),
                type(target),
                logits.size(),  # as .shape, for less
                logits.dtype,
                logits.is_cpu or logits.device,
                target.size(),
                target.dtype,
                target.is_cpu or target.device,
            )
            plan = _ce_plans.get(key)
        except (AttributeError, TypeError):  # not tensors: the checks say which
            key = None
    if plan is None:
        plan = _ce_tensors(logits, target)
        if key is not None:
            remember(_ce_plans, key, plan)
    if (
        plan[1]
        and weight is None
        and softcap is None
        and return_z_loss is False
        and return_token_accuracy is False
    ):
        # The common call on the CPU, as _cross_entropy runs it, without its call: the rest
        # of the contract is the options, then F.cross_entropy's native op.
        _check_options(ignore_index, label_smoothing, reduction, z_loss)
        forced = _forced_backend()
        if not z_loss and (forced is None or forced == "torch"):
            try:
                return _native_cross_entropy(
                    logits,
                    target if plan[2] else target.long(),
                    None,
                    _REDUCTION_ENUM[reduction],
                    ignore_index,
                    label_smoothing,
                )
            except IndexError:
                _check_classes(target, plan[0], ignore_index)
                raise
    return _cross_entropy(
        plan,
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


@autocast_policy(lower_precision=False)
def _cross_entropy_autocast(logits, target, *args) -> Tensor | CrossEntropyOutput:
    """:func:`cross_entropy` under autocast (which the decorator turns off)."""
    return _cross_entropy(_ce_tensors(logits, target), logits, target, *args)


def _ce_tensors(logits, target) -> tuple:
    """The checks of ``logits`` and ``target`` but the target's values: what a call's
    tensor signature decides. Returns ``(V, logits on the CPU, target int64)``."""
    cpu = isinstance(logits, Tensor) and logits.is_cpu
    v, target_dtype = _check_logits("logits", logits, target, cpu)
    return v, cpu, target_dtype is torch.int64


def _cross_entropy(
    plan,
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
) -> Tensor | CrossEntropyOutput:
    """:func:`cross_entropy` once its tensors passed their checks (``plan``:
    :func:`_ce_tensors`'): the rest of the contract, in its order, then the loss."""
    v, cpu, target_long = plan
    _check_options(ignore_index, label_smoothing, reduction, z_loss)
    if weight is not None:
        weight = _check_class_weight("weight", weight, v, logits.device)
    softcap = 0.0 if softcap is None else check_softcap(softcap, allow_none=True)
    if type(return_z_loss) is not bool or type(return_token_accuracy) is not bool:
        _check_flags(return_z_loss, return_token_accuracy)
    # What select() answers, without its call: the torch backend serves every call that passed
    # the contract, forced or chosen (the automatic choice on CPU tensors).
    forced = _forced_backend()
    if forced is None and cpu or forced == "torch":
        name = "torch"
    else:
        name = backend.select("cross_entropy", logits, lambda: _support(logits, ignore_index))
    if name != "torch" or not cpu:
        _check_classes(target, v, ignore_index)
    elif not (z_loss or softcap or weight is not None or return_z_loss or return_token_accuracy):
        # F.cross_entropy's native op itself. On the CPU its own bounds check (an
        # IndexError) stands in for _check_classes, which then names the class.
        try:
            return _native_cross_entropy(
                logits,
                target if target_long else target.long(),
                None,
                _REDUCTION_ENUM[reduction],
                ignore_index,
                label_smoothing,
            )
        except IndexError:
            _check_classes(target, v, ignore_index)
            raise
    if name == "torch":
        try:
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
        except IndexError:
            _check_classes(target, v, ignore_index)
            raise
    else:
        rows, lse, argmax = cross_entropy_fwd(
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
        loss = rows
        if reduction != "none":
            loss = rows.sum()
            if reduction == "mean":
                loss = loss / _denominator(target, ignore_index, weight, rows.dtype)
        if loss.dtype is not logits.dtype:
            loss = loss.to(logits.dtype)
    if not (return_z_loss or return_token_accuracy):
        return loss
    argmax = argmax if return_token_accuracy else None  # the custom ops return it empty
    return _output(
        loss, lse, argmax, target, ignore_index, weight, reduction, z_loss, return_z_loss
    )


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
            chunk is about the size of ``hidden`` (:func:`default_chunk_size`); on the CPU,
            enough rows per thread for efficient GEMMs (:func:`cpu_chunk_size`).
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
    plan = None
    if any_autocast() or is_dynamo_compiling():
        key = None
        if any_autocast():
            return _linear_cross_entropy_autocast(
                hidden,
                weight,
                target,
                bias,
                ignore_index,
                label_smoothing,
                reduction,
                z_loss,
                chunk_size,
                out_dtype,
                ce_weight,
                softcap,
                return_z_loss,
                return_token_accuracy,
            )
    else:
        try:
            # As cross_entropy's.
            key = (
                type(hidden),
                type(weight),
                type(target),
                hidden.size(),
                hidden.dtype,
                hidden.is_cpu or hidden.device,
                weight.size(),
                weight.dtype,
                weight.is_cpu or weight.device,
                target.size(),
                target.dtype,
                target.is_cpu or target.device,
                None if bias is None else (type(bias), bias.size(), bias.dtype, bias.device),
            )
            plan = _linear_plans.get(key)
        except (AttributeError, TypeError):  # not tensors: the checks say which
            key = None
    if plan is None:
        plan = _linear_tensors(hidden, weight, bias, target)
        if key is not None:
            remember(_linear_plans, key, plan)
    if (
        plan[-1]
        and chunk_size is None
        and out_dtype is None
        and ce_weight is None
        and softcap is None
        and return_z_loss is False
        and return_token_accuracy is False
    ):
        # The common call on the CPU, as _linear_cross_entropy runs it, without its call: the
        # rest of the contract is the options, then F.linear and F.cross_entropy's native op.
        _check_options(ignore_index, label_smoothing, reduction, z_loss)
        forced = _forced_backend()
        if not z_loss and (forced is None or forced == "torch"):
            try:
                return _native_cross_entropy(
                    _native_linear(hidden, weight, bias),
                    target if plan[-2] else target.long(),
                    None,
                    _REDUCTION_ENUM[reduction],
                    ignore_index,
                    label_smoothing,
                )
            except IndexError:
                _check_classes(target, plan[2], ignore_index)
                raise
    return _linear_cross_entropy(
        plan,
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        label_smoothing,
        reduction,
        z_loss,
        chunk_size,
        out_dtype,
        ce_weight,
        softcap,
        return_z_loss,
        return_token_accuracy,
    )


@autocast_policy(lower_precision=True)
def _linear_cross_entropy_autocast(hidden, weight, target, bias, *args):
    """:func:`linear_cross_entropy` under autocast (the decorator casts the inputs)."""
    plan = _linear_tensors(hidden, weight, bias, target)
    return _linear_cross_entropy(plan, hidden, weight, target, bias, *args)


def _linear_tensors(hidden, weight, bias, target) -> tuple:
    """The checks of the tensors but the target's values: what a call's tensor signature
    decides. Returns ``(N, H, V, hidden on the CPU, hidden's dtype, the default chunk
    size off the CPU, target int64, whether the CPU's torch path may run the native pair by
    default: one chunk of fp32/fp64 rows)``."""
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
    cpu = hidden.is_cpu
    n, h = hidden.shape
    target_dtype = _check_target(target, n, hidden, "logits", cpu)
    dtype = hidden.dtype
    # The CPU's default chunk follows the thread count (read per call); one thread gives the
    # fewest rows, so rows that fit it fit one default chunk at any count.
    chunk = None if cpu else default_chunk_size(n, h, v)
    native = cpu and dtype in _FULL_PRECISION and n <= cpu_chunk_size(n, h, v, 1)
    return n, h, v, cpu, dtype, chunk, target_dtype is torch.int64, native


def _linear_cross_entropy(
    plan,
    hidden,
    weight,
    target,
    bias,
    ignore_index,
    label_smoothing,
    reduction,
    z_loss,
    chunk_size,
    out_dtype,
    ce_weight,
    softcap,
    return_z_loss,
    return_token_accuracy,
) -> Tensor | CrossEntropyOutput:
    """:func:`linear_cross_entropy` once its tensors passed their checks (``plan``:
    :func:`_linear_tensors`'): the rest of the contract, in its order, then the loss."""
    n, h, v, cpu, dtype, default_chunk, target_long, _ = plan
    _check_options(ignore_index, label_smoothing, reduction, z_loss)
    # The target's classes come next in the contract. The CPU's torch path may leave them
    # to the native op's bounds check (see below), so a later argument's error checks them
    # first.
    try:
        if out_dtype is not None and not (
            isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point
        ):
            raise TypeError(f"out_dtype must be a floating-point dtype, got {out_dtype!r}")
        if ce_weight is not None:
            ce_weight = _check_class_weight("ce_weight", ce_weight, v, hidden.device)
        softcap = 0.0 if softcap is None else check_softcap(softcap, allow_none=True)
        if type(return_z_loss) is not bool or type(return_token_accuracy) is not bool:
            _check_flags(return_z_loss, return_token_accuracy)
        unfused = False
        if chunk_size is None:
            chunk_size = default_chunk or cpu_chunk_size(n, h, v, _threads())
            # All rows fit one chunk: chunking saves no memory, and the unfused pair in
            # PyTorch's own ops (and autograd) costs a few microseconds where the fused
            # path's buffers and in-forward gradients cost a hundred on small calls.
            # Half-precision logits would round where the fused path does not, so those
            # stay on it.
            unfused = (
                n <= chunk_size
                and dtype in _FULL_PRECISION
                and (out_dtype is None or out_dtype == dtype)
            )
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        forced = _forced_backend()  # as in _cross_entropy
        if forced is None and cpu or forced == "torch":
            name = "torch"
        else:
            name = backend.select(
                "linear_cross_entropy", hidden, lambda: _linear_support(hidden, ignore_index)
            )
    except (TypeError, ValueError, backend.BackendUnavailable):
        _check_classes(target, v, ignore_index)
        raise
    if name == "torch" and unfused:
        if cpu and not (
            z_loss or softcap or ce_weight is not None or return_z_loss or return_token_accuracy
        ):
            # F.linear, then F.cross_entropy's native op; its bounds check (an IndexError)
            # stands in for _check_classes, which then names the class.
            try:
                return _native_cross_entropy(
                    _native_linear(hidden, weight, bias),
                    target if target_long else target.long(),
                    None,
                    _REDUCTION_ENUM[reduction],
                    ignore_index,
                    label_smoothing,
                )
            except IndexError:
                _check_classes(target, v, ignore_index)
                raise
        _check_classes(target, v, ignore_index)
        loss, lse, argmax = _torch_cross_entropy(
            _native_linear(hidden, weight, bias),
            target,
            ignore_index,
            label_smoothing,
            reduction,
            z_loss,
            ce_weight,
            softcap,
            return_z_loss,
            return_token_accuracy,
        )
        if not (return_z_loss or return_token_accuracy):
            return loss
        argmax = argmax if return_token_accuracy else None
        return _output(
            loss, lse, argmax, target, ignore_index, ce_weight, reduction, z_loss, return_z_loss
        )
    _check_classes(target, v, ignore_index)
    grad_mask = 0
    if torch.is_grad_enabled():
        grad_mask = (
            (_DH if hidden.requires_grad else 0)
            | (_DW if weight.requires_grad else 0)
            | (_DB if bias is not None and bias.requires_grad else 0)
        )
    compute_lse = z_loss != 0.0 or return_z_loss
    loss, lse, argmax, _, _, _ = linear_cross_entropy_fwd(
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
        # "none": the forward cannot form the gradients (see _linear_ce_bwd).
        grad_mask if reduction != "none" else 0,
        compute_lse,
        return_token_accuracy,
        name,
    )
    if reduction == "mean":
        loss = loss / _denominator(target, ignore_index, ce_weight, loss.dtype)
    out_dtype = dtype if out_dtype is None else out_dtype
    if loss.dtype is not out_dtype:
        loss = loss.to(out_dtype)
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


# Rows per thread below which the CPU GEMMs of a chunk lose speed: one thread, H=768,
# V=32000, fwd+bwd over 4096 rows took 8.8 s in 64-row chunks, 7.8 in 128, 7.1 in 256, 512
# and 1024 alike (2-core EPYC, torch 2.14, MKL).
CPU_ROWS_PER_THREAD = 256


_FULL_PRECISION = (torch.float32, torch.float64)


# Read when torch.compile traces a call (a graph holds its chunk size as a constant).
@torch.compiler.assume_constant_result
def _threads() -> int:
    return torch.get_num_threads()


def cpu_chunk_size(n: int, h: int, v: int, threads: int) -> int:
    """Rows per chunk on the CPU: :func:`default_chunk_size`, raised to
    :data:`CPU_ROWS_PER_THREAD` rows for each thread the GEMMs split the chunk's rows
    over, but never past a logits chunk as large as d_weight (``H`` rows of ``V``), which
    keeps the peak memory within a small multiple of the gradients'."""
    rows = max(default_chunk_size(n, h, v), CPU_ROWS_PER_THREAD * max(1, threads))
    return min(rows, max(h, CPU_ROWS_PER_THREAD))


def _next_power_of_2(x: int) -> int:
    # triton.next_power_of_2's rule, without importing Triton (the torch backend needs none).
    return 1 << max(0, x - 1).bit_length()


# ---------------------------------------------------------------------------------------------
# Validation.


_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def _check_target(target: Tensor, n: int, like: Tensor, what: str, cpu: bool) -> torch.dtype:
    """Type, dtype, shape and device of ``target`` (its values: :func:`_check_classes`);
    ``cpu``: whether ``like`` is on the CPU. Returns the target's dtype."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    dtype = target.dtype
    if dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must hold integer class indices, got dtype {dtype}")
    if target.shape != (n,):
        raise ValueError(f"target must have shape ({n},), got {tuple(target.shape)}")
    if not (cpu and target.is_cpu) and target.device != like.device:
        raise ValueError(f"target is on {target.device} but the {what} are on {like.device}")
    return dtype


def _check_classes(target: Tensor, v: int, ignore_index: int) -> None:
    """Refuse a target outside ``[0, V)`` that is not ``ignore_index``. One device-to-host
    copy on GPUs, where an out-of-range class would be a device-side assert on the torch
    backend and NaN on the kernels; skipped where values cannot be read."""
    if target.numel() and values_readable(target):
        bad = (target != ignore_index) & ((target < 0) | (target >= v))
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target[{i}] = {int(target[i])} is outside [0, {v})")


def _check_options(ignore_index, label_smoothing, reduction, z_loss) -> None:
    # The common values (an int, floats in range) pass the first test of each check.
    if type(ignore_index) is not int and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, int)
    ):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (type(label_smoothing) is float and 0.0 <= label_smoothing <= 1.0) and not (
        0.0 <= check_real("label_smoothing", label_smoothing) <= 1.0
    ):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if reduction not in _REDUCTION_ENUM:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if (
        not (type(z_loss) is float and 0.0 <= z_loss < math.inf)
        and check_real("z_loss", z_loss) < 0
    ):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")


def _check_logits(name, logits, target, cpu):
    """The checks of ``logits`` (named ``name``) and of ``target``'s type, dtype, shape and
    device; returns V and the target's dtype. ``cpu``: whether ``logits`` is on the CPU."""
    check_float(name, logits)
    shape = logits.shape  # read once: each read builds a torch.Size
    if len(shape) != 2 or shape[1] < 1:
        raise ValueError(f"{name} must be 2-D (N, V) with V >= 1, got {tuple(shape)}")
    return shape[1], _check_target(target, shape[0], logits, name, cpu)


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


def _denominator(target: Tensor, ignore_index: int, weight: Tensor | None, dtype) -> Tensor:
    """What a "mean" divides by: the non-ignored rows' count (an integer tensor, which
    the division promotes: one op fewer), or their target weights' sum."""
    if weight is None:
        return (target != ignore_index).sum()
    return _row_weights(target, ignore_index, weight, dtype).sum()


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
    lse: bool = True  # the chunked torch path skips it when nothing reads it


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


def _cross_entropy_fwd(
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


_cross_entropy_fwd_op = torch.library.custom_op(
    "fastlm::cross_entropy_fwd", _cross_entropy_fwd, mutates_args=()
)


@_cross_entropy_fwd_op.register_fake
def _(logits, target, weight, ignore_index, smoothing, z_loss, softcap, argmax, backend_name):
    n = logits.shape[0]
    f32 = torch.float32
    return (
        logits.new_empty(n, dtype=f32),
        logits.new_empty(n, dtype=f32),
        logits.new_empty(n if argmax else 0, dtype=torch.int32),
    )


def _cross_entropy_bwd(
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


_cross_entropy_bwd_op = torch.library.custom_op(
    "fastlm::cross_entropy_bwd", _cross_entropy_bwd, mutates_args=()
)
cross_entropy_bwd = EagerOp(_cross_entropy_bwd_op, _cross_entropy_bwd)


@_cross_entropy_bwd_op.register_fake
def _(dloss, logits, target, weight, lse, ignore_index, smoothing, z_loss, softcap, backend_name):
    return logits.new_empty(logits.shape)


def _ce_setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, smoothing, z_loss, softcap, _, backend_name = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, weight, output[1])
    ctx.args = (ignore_index, smoothing, z_loss, softcap, backend_name)


def _ce_backward(ctx, dloss, _dlse, _dargmax):
    logits, target, weight, lse = ctx.saved_tensors
    none = (None,) * 8
    if dloss is None:
        return None, *none
    dlogits = cross_entropy_bwd(dloss, logits, target, weight, lse, *ctx.args)
    return dlogits, *none


cross_entropy_fwd = EagerOp(
    _cross_entropy_fwd_op, _cross_entropy_fwd, _ce_setup_context, _ce_backward
)


# ---------------------------------------------------------------------------------------------
# linear_cross_entropy custom ops (both backends: the chunked algorithm is the same).


def _chunked(
    hidden,
    weight,
    bias,
    target,
    opts: RowOptions,
    chunk_size,
    backend_name,
    grad_mask,
    row_scale=None,
):
    """Loop over token chunks: logits chunk, per-row loss, and (``grad_mask``: bits
    :data:`_DH`, :data:`_DW`, :data:`_DB`) the chunk's d_hidden rows and its d_weight/d_bias
    contributions. Returns ``(loss_rows, lse, argmax, dhidden, dweight, dbias)``; the
    gradients are of ``sum_i row_scale_i * loss_i`` (scale 1 when ``row_scale`` is None),
    dweight/dbias float32 (float64 for float64 inputs), None where not asked; argmax None
    unless ``opts.argmax``."""
    if backend_name == "torch":
        return _torch_chunked(hidden, weight, bias, target, opts, chunk_size, grad_mask, row_scale)
    rows_fn = ROWS[backend_name]
    n, h = hidden.shape
    v = weight.shape[0]
    target = target.long()
    if row_scale is not None:
        row_scale = row_scale.float()
    grad = grad_mask != 0
    loss = hidden.new_empty(n, dtype=_loss_dtype(hidden.dtype))
    lse = hidden.new_empty(n, dtype=_loss_dtype(hidden.dtype))
    argmax = hidden.new_empty(n, dtype=torch.int64) if opts.argmax else None
    dh = torch.empty_like(hidden) if grad_mask & _DH else None
    dw = weight.new_zeros((v, h), dtype=torch.float32) if grad_mask & _DW else None
    db = weight.new_zeros(v, dtype=torch.float32) if grad_mask & _DB else None
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
        if dh is not None:
            torch.mm(logits, weight, out=dh[start:end])
        if dw is not None:
            if logits.dtype == torch.float32:
                dw.addmm_(logits.t(), hc)
            else:
                dw += torch.mm(logits.t(), hc).float()
        if db is not None:
            db += logits.sum(0, dtype=torch.float32)
    return loss, lse, argmax, dh, dw, db


def _torch_chunked(hidden, weight, bias, target, o: RowOptions, chunk_size, grad_mask, row_scale):
    """The torch backend of :func:`_chunked` (what CPU users run), built so the loop
    allocates nothing: one (chunk, V) logits buffer is written by the projection GEMM,
    turned into log-probabilities in place (row by row, so each row is still in cache), and,
    when ``grad_mask`` asks for gradients, into the gradient in place, which the GEMMs of
    d_hidden's rows and of d_weight read. Every per-row quantity that depends on the
    targets alone is computed once, for all rows, before the loop."""
    grad = grad_mask != 0
    n, h = hidden.shape
    v = weight.shape[0]
    dtype = hidden.dtype
    cdt = _loss_dtype(dtype)  # float32 math for half inputs, as the kernels
    t = target.long()
    valid = t != o.ignore_index
    ignored = ~valid
    ts = torch.where(valid, t, 0)  # a class to gather for ignored rows (their loss is 0)
    w = None if o.weight is None else o.weight.to(cdt)
    w_t = valid.to(cdt) if w is None else w[ts] * valid  # target weights, 0 when ignored
    eps = o.smoothing

    loss = hidden.new_empty(n, dtype=cdt)
    lse = hidden.new_empty(n if o.lse else 0, dtype=cdt)
    argmax = hidden.new_empty(n, dtype=torch.int64) if o.argmax else None
    dh = dw = db = None
    if grad:
        dh = torch.empty_like(hidden) if grad_mask & _DH else None
        # The first chunk's GEMMs write d_weight and d_bias (no zero fill), later ones add.
        new = weight.new_zeros if n == 0 else weight.new_empty
        dw = new((v, h), dtype=cdt) if grad_mask & _DW else None
        db = new(v, dtype=cdt) if grad_mask & _DB else None
        # d loss_i / d logits_i = a_i softmax_i - b_i onehot(t_i) - c_i u (u: the class
        # weights, or ones), times each row's scale (0 for ignored rows).
        rs = valid.to(cdt) if row_scale is None else row_scale.to(cdt) * valid
        w_tt = 1.0 if w is None else w[ts]
        b = rs * ((1.0 - eps) * w_tt) if eps else rs * w_tt
        c_coef = rs * (eps / v) if eps else None
        # Without a z-loss the softmax factor does not depend on the logits; with no class
        # weights, no row scales and no ignored rows it is 1 and the multiply is skipped.
        a = None
        if w is not None:
            a = rs * ((1.0 - eps) * w_tt + eps / v * w.sum())
        elif row_scale is not None or not bool(valid.all()):
            a = rs
        a_z = None if not o.z_loss else 2.0 * o.z_loss * rs * w_tt

    rows = max(1, min(chunk_size, n))
    buf = hidden.new_empty((rows, v))  # the projection's output, in the inputs' dtype
    x = buf if dtype is cdt else hidden.new_empty((rows, v), dtype=cdt)
    cap = hidden.new_empty((rows, v), dtype=cdt) if o.softcap else None
    hbuf = hidden.new_empty((rows, h), dtype=cdt) if dw is not None and dtype is not cdt else None
    ones = hidden.new_ones(rows, dtype=cdt) if db is not None else None
    wt = weight.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        m = end - start
        hc = hidden[start:end]
        lc = buf[:m]
        if bias is None:
            torch.mm(hc, wt, out=lc)
        else:
            torch.addmm(bias, hc, wt, out=lc)
        xc = lc if x is buf else x[:m].copy_(lc)
        if cap is not None:
            tc = cap[:m]
            torch.div(xc, o.softcap, out=tc)
            tc.tanh_()
            torch.mul(tc, o.softcap, out=xc)
        top = None
        if o.argmax or o.lse:
            # One pass for both; the first maximal index, as argmax.
            top = torch.max(xc, 1)
            if argmax is not None:
                argmax[start:end] = top.indices
        torch._log_softmax(xc, 1, False, out=xc)  # in place, bit for bit log_softmax
        lse_c = None
        if top is not None and o.lse:
            # A row's log-softmax at its maximum is exactly -log(sum(exp(x - max))).
            lse_c = top.values - xc.gather(1, top.indices[:, None]).squeeze(1)
            lse[start:end] = lse_c
        ts_c, w_c = ts[start:end], w_t[start:end]
        row = xc.gather(1, ts_c[:, None]).squeeze(1).neg_().mul_(w_c)
        if eps:
            smooth = (xc.sum(1) if w is None else xc @ w).mul_(-1.0 / v)
            row = torch.add(row.mul_(1.0 - eps), smooth, alpha=eps)
        if o.z_loss:
            row = row + o.z_loss * lse_c * lse_c * w_c
        loss[start:end] = row.masked_fill_(ignored[start:end], 0.0)
        if not grad:
            continue
        # The softmax, by the Vectorized exp of PyTorch's softmax kernel: exp_'s (MKL's) is
        # ten times slower where its results are subnormal, as most are at large V.
        torch._softmax(xc, 1, False, out=xc)
        a_c = None if a is None else a[start:end]
        if a_z is not None:
            z_c = a_z[start:end] * lse_c
            a_c = z_c.add_(rs[start:end] if a_c is None else a_c)
        if c_coef is not None and w is None:
            # a softmax - c in one pass.
            a_c = rs[start:end] if a_c is None else a_c
            torch.addcmul(-c_coef[start:end, None], xc, a_c[:, None], out=xc)
        else:
            if a_c is not None:
                xc.mul_(a_c[:, None])
            if c_coef is not None:
                xc.addr_(c_coef[start:end], w, alpha=-1.0)
        xc.scatter_add_(1, ts_c[:, None], b[start:end, None].neg())
        if cap is not None:
            # Through the cap: times 1 - tanh^2.
            tc.square_()
            xc.addcmul_(xc, tc, value=-1.0)
        # d_hidden from the gradient in the inputs' dtype (the projection's); d_weight and
        # d_bias accumulate in cdt.
        if dh is not None:
            torch.mm(xc if x is buf else lc.copy_(xc), weight, out=dh[start:end])
        if dw is not None:
            hcf = hc if hbuf is None else hbuf[:m].copy_(hc)
            if start == 0:
                torch.mm(xc.t(), hcf, out=dw)
            else:
                dw.addmm_(xc.t(), hcf)
        if db is not None:
            if start == 0:
                torch.mv(xc.t(), ones[:m], out=db)
            else:
                db.addmv_(xc.t(), ones[:m])
    return loss, lse, argmax, dh, dw, db


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float64 stays float64 (gradcheck)


# Which gradients a chunked pass computes: bits of its ``grad_mask``.
_DH, _DW, _DB = 1, 2, 4


def _linear_ce_fwd(
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
    grad_mask: int,
    compute_lse: bool,
    compute_argmax: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, lse, argmax, dhidden, dweight, dbias)``: float32 (float64 for float64) loss
    rows (reduction "none") or their sum (0-dim; "mean" divides outside), the per-row
    log-sum-exp (empty unless ``compute_lse``), the per-row argmax (int64; empty unless
    ``compute_argmax``), and the gradients of that sum that ``grad_mask`` asks for
    (dweight/dbias float32, float64 for float64; empty tensors for the others)."""
    opts = RowOptions(
        ignore_index, label_smoothing, z_loss, softcap, ce_weight, compute_argmax, compute_lse
    )
    loss, lse, argmax, dh, dw, db = _chunked(
        hidden.contiguous(),
        weight.contiguous(),
        bias,
        target,
        opts,
        chunk_size,
        backend_name,
        grad_mask,
    )
    if reduction != "none":
        loss = loss.sum()
    f32 = torch.float32
    return (
        loss,
        lse if compute_lse else absent(hidden, lse.dtype),
        hidden.new_empty(0, dtype=torch.int64) if argmax is None else argmax,
        absent(hidden, f32) if dh is None else dh,
        absent(hidden, f32) if dw is None else dw,
        absent(hidden, f32) if db is None else db,
    )


_linear_ce_fwd_op = torch.library.custom_op(
    "fastlm::linear_cross_entropy_fwd", _linear_ce_fwd, mutates_args=()
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
    grad_mask,
    compute_lse,
    compute_argmax,
    backend_name,
):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = torch.float32
    loss_dtype = _loss_dtype(hidden.dtype)
    return (
        hidden.new_empty(n if reduction == "none" else (), dtype=loss_dtype),
        hidden.new_empty(n if compute_lse else 0, dtype=loss_dtype),
        hidden.new_empty(n if compute_argmax else 0, dtype=torch.int64),
        hidden.new_empty(hidden.shape) if grad_mask & _DH else hidden.new_empty(0, dtype=f32),
        hidden.new_empty(
            (v, h) if grad_mask & _DW else 0, dtype=loss_dtype if grad_mask & _DW else f32
        ),
        hidden.new_empty(v if grad_mask & _DB else 0, dtype=loss_dtype if grad_mask & _DB else f32),
    )


def _linear_ce_bwd(
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
    grad_mask: int,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recomputes the chunks for reduction "none": gradients of ``sum_i dloss_i * loss_i``
    (those ``grad_mask`` asks for; empty tensors for the others). Each row's upstream
    gradient weighs its logits' gradient inside d_weight's sum over rows, so d_weight
    cannot be formed in the forward, before the upstream gradients exist."""
    opts = RowOptions(ignore_index, label_smoothing, z_loss, softcap, ce_weight, lse=bool(z_loss))
    _, _, _, dh, dw, db = _chunked(
        hidden.contiguous(),
        weight.contiguous(),
        bias,
        target,
        opts,
        chunk_size,
        backend_name,
        grad_mask,
        dloss,
    )
    f32 = torch.float32
    return (
        absent(hidden, f32) if dh is None else dh,
        absent(hidden, f32) if dw is None else dw,
        absent(hidden, f32) if db is None else db,
    )


_linear_ce_bwd_op = torch.library.custom_op(
    "fastlm::linear_cross_entropy_bwd", _linear_ce_bwd, mutates_args=()
)
linear_cross_entropy_bwd = EagerOp(_linear_ce_bwd_op, _linear_ce_bwd)


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
    grad_mask,
    backend_name,
):
    v, h = weight.shape
    f32 = torch.float32
    loss_dtype = _loss_dtype(hidden.dtype)
    return (
        hidden.new_empty(hidden.shape) if grad_mask & _DH else hidden.new_empty(0, dtype=f32),
        hidden.new_empty(
            (v, h) if grad_mask & _DW else 0, dtype=loss_dtype if grad_mask & _DW else f32
        ),
        hidden.new_empty(v if grad_mask & _DB else 0, dtype=loss_dtype if grad_mask & _DB else f32),
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
        grad_mask,
        _,
        _,
        backend_name,
    ) = inputs
    _, lse, argmax, dh, dw, db = output
    # The gradients are outputs only so that the forward can hand them to the backward; no
    # zero (V, H) gradient is made up for them (or for lse and argmax) either.
    ctx.mark_non_differentiable(lse, argmax, dh, dw, db)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.grad_mask = grad_mask
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.args = (ignore_index, smoothing, z_loss, softcap, chunk_size)
    ctx.backend_name = backend_name
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, bias, target, ce_weight)
    else:
        ctx.save_for_backward(dh, dw, db)


@once_differentiable
def _linear_backward(ctx, dloss, _dlse, _dargmax, _ddh, _ddw, _ddb):
    none = (None,) * 12
    if dloss is None:
        return None, None, None, *none
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    need = ctx.needs_input_grad
    mask = (_DH if need[0] else 0) | (_DW if need[1] else 0) | (_DB if need[2] else 0)
    if ctx.reduction == "none":
        hidden, weight, bias, target, ce_weight = ctx.saved_tensors
        dh, dw, db = linear_cross_entropy_bwd(
            dloss, hidden, weight, bias, target, ce_weight, *ctx.args, mask, ctx.backend_name
        )
    else:
        dh, dw, db = ctx.saved_tensors
        if mask & ~ctx.grad_mask:
            raise RuntimeError(
                "linear_cross_entropy: backward asks for a gradient its forward did not "
                "compute (the forward ran with grad disabled, or before that input required "
                "grad)"
            )
        # Out of place: the saved gradients stay as they are for a retain_graph backward.
        dh = dh * dloss if mask & _DH else dh
        dw = dw * dloss if mask & _DW else dw
        db = db * dloss if mask & _DB else db
    return (
        dh.to(h_dtype) if mask & _DH else None,
        dw.to(w_dtype) if mask & _DW else None,
        db.to(b_dtype) if mask & _DB else None,
        *none,
    )


linear_cross_entropy_fwd = EagerOp(
    _linear_ce_fwd_op, _linear_ce_fwd, _linear_setup_context, _linear_backward
)

backend.register_op("cross_entropy", ("triton", "torch"))
backend.register_op("linear_cross_entropy", ("triton", "torch"))
