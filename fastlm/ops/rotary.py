"""Rotary position embeddings: reference, custom op with autograd, backend dispatch.

The Triton path is one ``torch.library`` custom op, ``fastlm::rotary``, that rotates q and k
(plus ``fastlm::rotary_`` for in-place inference), entered through ``EagerOp`` (the custom op
under torch.compile, its function directly in plain eager). Its backward is the same op on the
gradients with the angle negated, since a rotation's transpose is its inverse. The torch path
computes the plain ``x * cos + rotate_half(x) * sin`` formula's products and sums (the same
float32 bits) with fewer temporaries, and differentiates it the same way.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import (
    FLOAT32_AND_HALF_DTYPES,
    EagerOp,
    SupportCheck,
    dtype_error,
    last_dim_contiguous,
    supports,
    value_range,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import FLOAT_DTYPES, check_float, values_readable

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
    # The autocast policy's own wrapper costs a call layer; one query answers the usual case.
    if _any_autocast():
        return _apply_under_autocast(q, k, cos, sin, interleaved, position_ids, offset, inplace)
    return _apply(q, k, cos, sin, interleaved, position_ids, offset, inplace)


def _apply(q, k, cos, sin, interleaved, position_ids, offset, inplace):
    positions, offset = _validate(q, k, cos, sin, position_ids, offset)
    # What select() answers, without its call: the torch backend serves every call that passed
    # the contract, forced or chosen (the automatic choice on CPU tensors).
    forced = backend.forced_backend()
    if forced is None and q.is_cpu or forced == "torch":
        name = "torch"
    else:
        name = backend.select("apply_rotary", q, lambda: _support(q, k, cos, sin, inplace))
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if name == "torch":
        ids = positions if position_ids is None else position_ids  # the caller's, for the cache
        return _torch_apply(q, k, cos, sin, interleaved, positions, ids, offset, inplace, grad)
    if inplace and not grad:
        rotary_(q, k, cos, sin, positions, offset, interleaved, False, name)
        return q, k
    q_rot, k_rot = rotary(
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


_apply_under_autocast = autocast_policy(lower_precision=False)(_apply)
_any_autocast = torch._C._is_any_autocast_enabled


def _check_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...], what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {what}, got dtype {t.dtype}")


def _validate(q, k, cos, sin, position_ids, offset) -> tuple[Tensor | None, int]:
    """Check the arguments; return the kernel's ``positions`` (None, offsets (B,) or ids
    (B, S)) and scalar offset."""
    check_float("q", q)
    check_float("k", k)
    check_float("cos", cos)
    check_float("sin", sin)
    qs, ks, cs = q.shape, k.shape, cos.shape  # each .shape builds a new Size: read once
    if len(qs) != 4:
        raise ValueError(f"q must be 4-D (B, S, H, D), got shape {tuple(qs)}")
    if len(ks) != 4 or ks[0] != qs[0] or ks[1] != qs[1] or ks[3] != qs[3]:
        raise ValueError(
            f"k must be (B, S, Hk, D) with q's B, S and D {tuple(qs[:2])}, {qs[3]}; "
            f"got shape {tuple(ks)}"
        )
    if len(cs) != 2 or cs[1] < 1:
        raise ValueError(f"cos must be (max_positions, rotary_dim / 2), got {tuple(cs)}")
    if sin.shape != cs:
        raise ValueError(f"sin must have cos's shape {tuple(cs)}, got {tuple(sin.shape)}")
    if 2 * cs[1] > qs[3]:
        raise ValueError(
            f"rotary_dim = 2 * cos.shape[1] = {2 * cs[1]} exceeds the head dim {qs[3]}"
        )
    # Comparing devices costs more than the rest of these checks; CPU tensors need none.
    if not (q.is_cpu and k.is_cpu and cos.is_cpu and sin.is_cpu):
        for name, t in (("k", k), ("cos", cos), ("sin", sin)):
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    bsz, seqlen, max_pos = qs[0], qs[1], cs[0]
    if position_ids is not None:
        _check_tensor("position_ids", position_ids, _INT_DTYPES, "an int32/int64 tensor")
        if isinstance(offset, Tensor) or offset != 0:
            raise ValueError("offset must be 0 when position_ids is given")
        if not (position_ids.is_cpu and q.is_cpu) and position_ids.device != q.device:
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
        _check_range("position_ids", position_ids, 0, max_pos)
        return positions, 0
    if isinstance(offset, Tensor):
        _check_tensor("offset", offset, _INT_DTYPES, "an int or an int32/int64 tensor")
        if offset.shape != (bsz,):
            raise ValueError(
                f"offset tensor must have shape (B,) = ({bsz},), got {tuple(offset.shape)}"
            )
        if not (offset.is_cpu and q.is_cpu) and offset.device != q.device:
            raise ValueError(f"offset is on {offset.device} but q is on {q.device}")
        _check_range("offset", offset, 0, max_pos - seqlen + 1)
        return offset, 0
    if type(offset) is not int and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"offset must be an int or an int tensor, got {type(offset).__name__}")
    if offset < 0 or offset + seqlen > max_pos:
        raise ValueError(
            f"positions offset..offset+S-1 = {offset}..{offset + seqlen - 1} must lie in "
            f"[0, max_positions = cos.shape[0] = {max_pos})"
        )
    return None, offset


def _check_range(name: str, t: Tensor, low: int, high: int) -> None:
    # Reads the values back (a device sync), so it is skipped where they cannot be read.
    if t.numel() == 0 or not (t.is_cpu and not torch.compiler.is_compiling() or values_readable(t)):
        return
    lo, hi = value_range(t)
    if lo < low or hi >= high:
        raise ValueError(
            f"{name} values must lie in [{low}, {high}) so every position is in "
            f"[0, max_positions = cos.shape[0]); got min {lo}, max {hi}"
        )


# ---------------------------------------------------------------------------------------------
# The torch backend.
#
# With ``swap(x)`` exchanging the two members of every pair ((i, i + R/2) or (2i, 2i + 1)) and
# full-width tables ``cf = (cos, cos)`` and ``sn = (-sin, sin)`` laid out as the pairs are, the
# rotation is ``x * cf + swap(x) * sn``: two products and a sum per element, each rounded as in
# Hugging Face's ``q * cos + rotate_half(q) * sin`` (negation is exact), so float32 results are
# the same bits. It writes one output and one temporary per tensor where the plain formula
# allocates four (-x2, the cat, both products), and its backward, the transpose (the same
# rotation by the negated angle, ``sn -> -sn``), is one node instead of a dozen.


def _torch_apply(q, k, cos, sin, interleaved, positions, ids, offset, inplace, grad):
    """``ids``: the position tensor the caller passed (``positions`` may be a view of it)."""
    compute = _COMPUTE_DTYPE.get((q.dtype, k.dtype)) or torch.promote_types(
        torch.promote_types(q.dtype, k.dtype), torch.float32
    )
    qs = q.shape
    if _cacheable(cos, sin, ids):
        cf, sn = _cached_tables(
            cos, sin, positions, ids, offset, qs[1], qs[3], interleaved, compute
        )
    else:
        cf, sn = _tables(cos, sin, positions, offset, qs[1], qs[3], interleaved, compute)
    if grad:
        q_rot, k_rot = _TorchRotary.apply(q, k, cf, sn, interleaved)
        if inplace:  # under autograd: out of place, copied back (as the kernels' path does)
            return q.copy_(q_rot), k.copy_(k_rot)
        return q_rot, k_rot
    if inplace:
        return _torch_rotary((q, k), cf, sn, interleaved, True, False)
    # Every argument given: defaults left to fill would each be one more torch.compile guard.
    return _torch_rotary((q, k), cf, sn, interleaved, False, False)


# Derived tables of recent calls. A model rotates with the same cos/sin (and positions) in
# every layer; building the tables again costs several small ops per call, as much as the
# rotation of a decoding step. Keyed by the identity of the tensors, checked against their
# version counters (an in-place change misses), held only through weak references, and only
# for tables up to _CACHED_ELEMENTS (those of longer sequences cost little next to the
# rotation itself).
_cache: dict[tuple, tuple] = {}
# promote(promote(q, k), float32), looked up (promote_types costs a C call each).
_COMPUTE_DTYPE = {
    (a, b): torch.promote_types(torch.promote_types(a, b), torch.float32)
    for a in FLOAT_DTYPES
    for b in FLOAT_DTYPES
}
_CACHE_ENTRIES = 8
_CACHED_ELEMENTS = 1 << 16


def _cacheable(cos: Tensor, sin: Tensor, positions: Tensor | None) -> bool:
    # Not while tracing (fake tensors), for subclasses, or for inference tensors (no version
    # counter to tell an in-place change).
    return (
        not torch.compiler.is_compiling()
        and type(cos) is Tensor
        and type(sin) is Tensor
        and (positions is None or type(positions) is Tensor and not positions.is_inference())
        and not cos.is_inference()
        and not sin.is_inference()
    )


def _cached_tables(cos, sin, positions, ids, offset, seqlen, d, interleaved, dtype):
    key = (id(cos), id(sin), id(ids), offset, seqlen, d, interleaved, dtype)
    versions = (cos._version, sin._version, None if ids is None else ids._version)
    hit = _cache.get(key)
    if hit is not None:
        refs, seen, cf, sn = hit
        if seen == versions and refs[0]() is cos and refs[1]() is sin and refs[2]() is ids:
            return cf, sn
    cf, sn = _tables(cos, sin, positions, offset, seqlen, d, interleaved, dtype)
    if cf.numel() <= _CACHED_ELEMENTS:
        if len(_cache) >= _CACHE_ENTRIES:
            _cache.clear()
        pos_ref = _none_ref if ids is None else weakref.ref(ids)
        _cache[key] = ((weakref.ref(cos), weakref.ref(sin), pos_ref), versions, cf, sn)
    return cf, sn


def _none_ref() -> None:
    return None


def _tables(cos, sin, positions, offset, seqlen, d, interleaved, dtype) -> tuple[Tensor, Tensor]:
    """``cf`` (.., S, 1, D) and ``sn`` (.., S, 1, R) in ``dtype`` at the tokens' positions:
    (S, 1, .) for a scalar offset, (B, S, 1, .) otherwise. Beyond R, ``cf`` is 1 so one
    product also copies the features that are not rotated."""
    if positions is None:
        if offset != 0 or seqlen != cos.shape[0]:
            cos, sin = cos.narrow(0, offset, seqlen), sin.narrow(0, offset, seqlen)
    else:
        if positions.dim() == 1:  # per-sequence offsets (B,)
            positions = positions[:, None] + torch.arange(seqlen, device=positions.device)
        cos, sin = cos[positions], sin[positions]  # (B, S, R/2)
    if cos.dtype is not dtype:
        cos, sin = cos.to(dtype), sin.to(dtype)
    neg = torch.neg(sin)
    rest = d - 2 * cos.shape[-1]
    if interleaved:
        cf = torch.stack((cos, cos), -1).flatten(-2)
        sn = torch.stack((neg, sin), -1).flatten(-2)
        if rest:
            cf = torch.cat((cf, cf.new_ones(*cf.shape[:-1], rest)), -1)
    else:
        parts = (cos, cos) if not rest else (cos, cos, cos.new_ones(*cos.shape[:-1], rest))
        cf = torch.cat(parts, -1)
        sn = torch.cat((neg, sin), -1)
    return cf.unsqueeze(-2), sn.unsqueeze(-2)


# Elements of x from which the no-grad path takes the half-size temporary (see _rotate).
_HALVES_FROM = 1 << 19


def _torch_rotary(xs, cf, sn, interleaved, inplace=False, halves=False):
    """Rotate each (B, S, H, D) tensor of ``xs`` by the tables of :func:`_tables` (``sn``
    negated rotates back): new tensors of the inputs' dtypes, or ``xs`` themselves rotated in
    place. ``halves``: the lower-memory order (see :func:`_rotate`)."""
    r = sn.shape[-1]
    return tuple([_rotate(x, cf, sn, r, interleaved, inplace, halves) for x in xs])


def _members(t: Tensor, r: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """Views of the first and of the second members of the pairs among ``t``'s first ``r``
    features."""
    if interleaved:
        v = t.narrow(-1, 0, r).view(*t.shape[:-1], r // 2, 2)
        return v.select(-1, 0), v.select(-1, 1)
    return t.narrow(-1, 0, r // 2), t.narrow(-1, r // 2, r // 2)


def _rotate(x, cf, sn, r, interleaved, inplace, halves):
    """``x * cf + swap(x) * sn`` in one of two orders, both the same bits. Few calls: a full
    swapped copy (``torch.roll`` / ``flip``) multiplied and added in place, four ops, best
    for small tensors and in place. Less memory: each half of the output takes its cross term
    through one half-size temporary, which wins where fresh allocations fault pages (large
    tensors, and under autograd, where the outputs stay alive)."""
    if not inplace and (halves or x.numel() >= _HALVES_FROM):
        out = torch.mul(x, cf)
        (xa, xb), (oa, ob) = _members(x, r, interleaved), _members(out, r, interleaved)
        sa, sb = _members(sn, r, interleaved)  # -sin, sin (negated for the backward)
        t = torch.mul(xb, sa)
        oa.add_(t)
        torch.mul(xa, sb, out=t)
        ob.add_(t)
        return out if out.dtype is x.dtype else out.to(x.dtype)
    xr = x if x.shape[-1] == r else x.narrow(-1, 0, r)
    # A new tensor with the members of each pair exchanged (a roll by R/2 swaps the halves).
    if interleaved:
        b, s, h, _ = xr.shape
        swapped = xr.view(b, s, h, r // 2, 2).flip(-1).flatten(-2)
    else:
        swapped = torch.roll(xr, r // 2, -1)
    if swapped.dtype is sn.dtype:
        swapped.mul_(sn)
        if inplace:
            xr.mul_(cf if xr is x else cf.narrow(-1, 0, r))
            xr.add_(swapped)
            return x
    else:  # half precision: products and sums in float32, rounded once
        swapped = torch.mul(swapped, sn)
    out = torch.mul(x, cf)
    (out if xr is x else out.narrow(-1, 0, r)).add_(swapped)
    if out.dtype is not x.dtype:
        out = out.to(x.dtype)
    return x.copy_(out) if inplace else out


class _TorchRotary(torch.autograd.Function):
    """The torch backend's rotation of q and k as one autograd node."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, cf, sn, interleaved):
        return _torch_rotary((q, k), cf, sn, interleaved, halves=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, _, cf, sn, interleaved = inputs
        ctx.save_for_backward(cf, sn)
        ctx.interleaved = interleaved

    @staticmethod
    def backward(ctx, dq, dk):
        cf, sn = ctx.saved_tensors
        grads = [g for g in (dq, dk) if g is not None]
        if not grads:
            return None, None, None, None, None
        rotated = iter(_torch_rotary(grads, cf, torch.neg(sn), ctx.interleaved, halves=True))
        dq = None if dq is None else next(rotated)
        dk = None if dk is None else next(rotated)
        return dq, dk, None, None, None


# ---------------------------------------------------------------------------------------------
# Custom ops.


def _rotary(
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
    cos, sin = last_dim_contiguous(cos), last_dim_contiguous(sin)
    forward = FORWARD[backend_name]
    return (
        forward(q, cos, sin, positions, offset, interleaved, conj, None),
        forward(k, cos, sin, positions, offset, interleaved, conj, None),
    )


_rotary_op = torch.library.custom_op("fastlm::rotary", _rotary, mutates_args=())


@_rotary_op.register_fake
def _(q, k, cos, sin, positions, offset, interleaved, conj, backend_name):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _rotary_inplace(
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
    cos, sin = last_dim_contiguous(cos), last_dim_contiguous(sin)
    forward = FORWARD[backend_name]
    forward(q, cos, sin, positions, offset, interleaved, conj, q)
    forward(k, cos, sin, positions, offset, interleaved, conj, k)


_rotary_inplace_op = torch.library.custom_op(
    "fastlm::rotary_", _rotary_inplace, mutates_args=("q", "k")
)
rotary_ = EagerOp(_rotary_inplace_op, _rotary_inplace)


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
    dq, dk = rotary(
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


rotary = EagerOp(_rotary_op, _rotary, _setup_context, _backward)


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
