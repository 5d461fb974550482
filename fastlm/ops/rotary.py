"""Rotary position embeddings: reference, custom op with autograd, backend dispatch.

The Triton path is one ``torch.library`` custom op, ``fastlm::rotary``, that rotates q and k
(plus ``fastlm::rotary_`` for in-place inference). Its backward is the same op on the
gradients with the angle negated, since a rotation's transpose is its inverse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    SupportCheck,
    dtype_error,
    last_dim_contiguous,
    supports,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_float, values_readable

_INT_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Reference: the plainest formula, run by the tests in float64 as the oracle.


def apply_rotary_ref(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    position_ids: Tensor | None = None,
    offset: int | Tensor = 0,
) -> Tensor:
    """Rotate ``x`` (B, S, H, D) by the (P, R/2) ``cos``/``sin`` tables; see
    :func:`apply_rotary`. Computes in the dtype of ``x`` (cos/sin cast to it)."""
    bsz, seqlen = x.shape[:2]
    r2 = cos.shape[-1]
    pos = _positions(bsz, seqlen, position_ids, offset, x.device)
    c = cos.to(x.dtype)[pos][:, :, None, :]  # (B, S, 1, R/2)
    s = sin.to(x.dtype)[pos][:, :, None, :]
    if interleaved:
        a, b = x[..., 0 : 2 * r2 : 2], x[..., 1 : 2 * r2 : 2]
        rotated = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = x[..., :r2], x[..., r2 : 2 * r2]
        rotated = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((rotated, x[..., 2 * r2 :]), dim=-1)


def _positions(bsz, seqlen, position_ids, offset, device) -> Tensor:
    """(B, S) int64 positions of every token."""
    if position_ids is not None:
        return position_ids.long().expand(bsz, seqlen)
    pos = torch.arange(seqlen, device=device)[None, :]
    if isinstance(offset, Tensor):
        return (pos + offset.long()[:, None]).expand(bsz, seqlen)
    return (pos + offset).expand(bsz, seqlen)


# ---------------------------------------------------------------------------------------------
# Public API.


@autocast_policy(lower_precision=False)
def apply_rotary(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
    position_ids: Tensor | None = None,
    offset: int | Tensor = 0,
    inplace: bool = False,
) -> tuple[Tensor, Tensor]:
    """Apply rotary position embeddings to queries and keys.

    Args:
        q: (B, S, Hq, D), float32/float16/bfloat16 (float64 on the torch backend). Any
            strides; the kernels need a unit stride on D (else a copy is made, and in place
            is refused).
        k: (B, S, Hk, D), same B, S, D and device as q (Hk may differ: grouped-query).
        cos, sin: (P, R/2) tables, any float dtype: ``cos[p, i] = cos(p * theta_i)`` for
            position p and frequency i, as flash-attn's ``apply_rotary_emb``. The first
            ``R = 2 * cos.shape[1] <= D`` features of each head are rotated; the rest pass
            through unchanged (partial rotary, GPT-NeoX / Phi).
        interleaved: ``False`` rotates pairs ``(i, i + R/2)`` (GPT-NeoX / Llama,
            ``rotate_half``); ``True`` rotates pairs ``(2i, 2i + 1)`` (GPT-J).
        position_ids: ``None``, or an int32/int64 tensor of positions broadcastable to
            (B, S) (e.g. (1, S)). Excludes a nonzero ``offset``.
        offset: position of token 0: an int, or an int32/int64 tensor (B,) of per-sequence
            offsets (KV-cache decoding). Token s of sequence b is at ``s + offset[b]``.
        inplace: write the result into q and k (and return them). Under autograd, this is
            an out-of-place rotation copied back.

    Every position must be in ``[0, P)``. Pair ``(a, b)`` becomes
    ``(a cos - b sin, b cos + a sin)``, computed in float32 (float64 for float64 inputs)
    and rounded to the input dtype. Gradients flow to q and k, not to cos/sin.

    Returns:
        ``(q_rot, k_rot)``, shaped and typed as q and k.
    """
    positions, offset = _validate(q, k, cos, sin, position_ids, offset)
    name = backend.select("apply_rotary", q.device, _support(q, k, cos, sin, inplace))
    if name == "torch":
        q_rot = _torch_rotary(q, cos, sin, interleaved, positions, offset)
        k_rot = _torch_rotary(k, cos, sin, interleaved, positions, offset)
        if inplace:
            return q.copy_(q_rot), k.copy_(k_rot)
        return q_rot, k_rot
    if inplace and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        torch.ops.fastlm.rotary_(q, k, cos, sin, positions, offset, interleaved, False, name)
        return q, k
    q_rot, k_rot = torch.ops.fastlm.rotary(
        last_dim_contiguous(q),
        last_dim_contiguous(k),
        cos,
        sin,
        positions,
        offset,
        interleaved,
        False,
        name,
    )
    if inplace:
        return q.copy_(q_rot), k.copy_(k_rot)
    return q_rot, k_rot


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got dtype {t.dtype}")


def _validate(q, k, cos, sin, position_ids, offset) -> tuple[Tensor | None, int]:
    """Check the arguments; return the kernel's ``positions`` (None, offsets (B,) or ids
    (B, S)) and scalar offset."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, S, H, D), got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"k must be (B, S, Hk, D) with q's B, S and D {tuple(q.shape[:2])}, {q.shape[3]}; "
            f"got shape {tuple(k.shape)}"
        )
    if cos.dim() != 2 or cos.shape[1] < 1:
        raise ValueError(f"cos must be (max_positions, rotary_dim / 2), got {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if 2 * cos.shape[1] > q.shape[3]:
        raise ValueError(
            f"rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]} exceeds the head dim {q.shape[3]}"
        )
    for name, t in (("k", k), ("cos", cos), ("sin", sin)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    bsz, seqlen = q.shape[:2]
    max_pos = cos.shape[0]
    if position_ids is not None:
        _check_tensor("position_ids", position_ids, _INT_DTYPES, "an int32/int64 tensor")
        if isinstance(offset, Tensor) or offset != 0:
            raise ValueError("offset must be 0 when position_ids is given")
        if position_ids.device != q.device:
            raise ValueError(f"position_ids is on {position_ids.device} but q is on {q.device}")
        try:
            positions = position_ids.expand(bsz, seqlen) if position_ids.dim() <= 2 else None
        except RuntimeError:
            positions = None
        if positions is None:
            raise ValueError(
                f"position_ids must broadcast to (B, S) = {(bsz, seqlen)}, got shape "
                f"{tuple(position_ids.shape)}"
            )
        _check_range("position_ids", positions, 0, max_pos)
        return positions, 0
    if isinstance(offset, Tensor):
        _check_tensor("offset", offset, _INT_DTYPES, "an int or an int32/int64 tensor")
        if offset.shape != (bsz,):
            raise ValueError(
                f"offset tensor must have shape (B,) = ({bsz},), got {tuple(offset.shape)}"
            )
        if offset.device != q.device:
            raise ValueError(f"offset is on {offset.device} but q is on {q.device}")
        _check_range("offset", offset, 0, max_pos - seqlen + 1)
        return offset, 0
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"offset must be an int or an int tensor, got {type(offset).__name__}")
    if offset < 0 or offset + seqlen > max_pos:
        raise ValueError(
            f"positions offset..offset+S-1 = {offset}..{offset + seqlen - 1} must lie in "
            f"[0, max_positions = cos.shape[0] = {max_pos})"
        )
    return None, offset


def _check_range(name: str, t: Tensor, low: int, high: int) -> None:
    # Reads the values back (a device sync), so it is skipped where they cannot be read.
    if t.numel() == 0 or not values_readable(t):
        return
    lo, hi = t.min().item(), t.max().item()
    if lo < low or hi >= high:
        raise ValueError(
            f"{name} values must lie in [{low}, {high}) so every position is in "
            f"[0, max_positions = cos.shape[0]); got min {lo}, max {hi}"
        )


def _torch_rotary(x, cos, sin, interleaved, positions, offset) -> Tensor:
    """The ``torch`` backend: the formula on PyTorch ops in float32 (as the kernels compute),
    differentiated by PyTorch's autograd."""
    compute = torch.promote_types(x.dtype, torch.float32)
    bsz, seqlen = x.shape[:2]
    if positions is None or positions.dim() == 1:
        pos = _positions(bsz, seqlen, None, offset if positions is None else positions, x.device)
    else:
        pos = positions
    return apply_rotary_ref(x.to(compute), cos.to(compute), sin.to(compute), interleaved, pos).to(
        x.dtype
    )


# ---------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("fastlm::rotary", mutates_args=())
def _rotary_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor | None,
    offset: int,
    interleaved: bool,
    conj: bool,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    """``(q_rot, k_rot)``, new contiguous tensors. ``conj`` rotates by the negated angle."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return tuple(
        FORWARD[backend_name](x, cos, sin, positions, offset, interleaved, conj, None)
        for x in (q, k)
    )


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, offset, interleaved, conj, backend_name):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


@torch.library.custom_op("fastlm::rotary_", mutates_args=("q", "k"))
def _rotary_inplace_op(
    q: Tensor,
    k: Tensor,
    cos: Tensor,
    sin: Tensor,
    positions: Tensor | None,
    offset: int,
    interleaved: bool,
    conj: bool,
    backend_name: str,
) -> None:
    cos, sin = cos.contiguous(), sin.contiguous()
    for x in (q, k):
        FORWARD[backend_name](x, cos, sin, positions, offset, interleaved, conj, x)


@_rotary_inplace_op.register_fake
def _(q, k, cos, sin, positions, offset, interleaved, conj, backend_name):
    return None


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, positions, offset, interleaved, conj, backend_name = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.offset, ctx.interleaved, ctx.conj = offset, interleaved, conj
    # The backward runs where the forward did, even after a use_backend() block has exited.
    ctx.backend_name = backend_name


def _backward(ctx, dq, dk):
    cos, sin, positions = ctx.saved_tensors
    dq = torch.zeros_like(dq) if dq is None else last_dim_contiguous(dq)
    dk = torch.zeros_like(dk) if dk is None else last_dim_contiguous(dk)
    dq, dk = torch.ops.fastlm.rotary(
        dq,
        dk,
        cos,
        sin,
        positions,
        ctx.offset,
        ctx.interleaved,
        not ctx.conj,
        ctx.backend_name,
    )
    return dq, dk, None, None, None, None, None, None, None


torch.library.register_autograd("fastlm::rotary", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Compiled backends.


def _support(q, k, cos, sin, inplace) -> dict[str, SupportCheck]:
    """Per backend, a check returning why it cannot serve these arguments (or None)."""

    def triton_error():
        for name, t in (("q", q), ("k", k)):
            if error := dtype_error(name, t, FLOAT32_AND_HALF_DTYPES):
                return error
            if inplace and t.stride(-1) != 1:
                return f"in place needs {name} with a unit stride on its last dim"
        return None

    return supports(triton_error)


def _triton_rotary(x, cos, sin, positions, offset, interleaved, conj, out):
    from fastlm.kernels import rotary as kernels

    return kernels.rotary_apply(x, cos, sin, positions, offset, interleaved, conj, out)


# The kernel contract of kernels/rotary.py, per backend (the kernel tests call these directly).
FORWARD = {"triton": _triton_rotary}
backend.register_op("apply_rotary", ("triton", "torch"))
