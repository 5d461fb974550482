"""Attention: the fp64 reference, ``flash_attention`` (dense and packed) and a drop-in
``scaled_dot_product_attention``, on the Triton kernels of ``kernels/attention.py`` (CUDA
tensors, or forced) or a torch backend (CPU tensors).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from fastlm import backend
from fastlm.ops._common import (
    HALF_DTYPES,
    EagerOp,
    _is_compiling,
    absent,
    any_autocast,
    last_dim_contiguous,
    remember,
    signature_memo,
    supports,
)
from fastlm.ops.activation import check_dropout
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_int, check_real, check_softcap, describe, values_readable
from fastlm.ops.masks import (
    NO_WINDOW,
    UNBOUNDED,
    Window,
    additive_mask,
    causal_window,
    diagonal_offset,
    visible,
    window_bounds,
)


def attention_probs(
    q: Tensor,
    k: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = NO_WINDOW,
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The attention probabilities, materialized: ``(probs (B, H, Sq, Sk), lse (B, H, Sq))``
    with the masking and soft-capping of :func:`attention_ref` (rows that see no key:
    probabilities 0, lse -inf)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    window = window_bounds(window)
    return _probs(
        q,
        k,
        causal=causal,
        scale=scale,
        window=window,
        bias=attn_bias,
        slopes=alibi_slopes,
        softcap=softcap,
    )


def _probs(
    q: Tensor,
    k: Tensor,
    *,
    causal: bool,
    scale: float,
    window: Window,
    bias: Tensor | None,
    slopes: Tensor | None,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`attention_probs` with the window as a :data:`~fastlm.ops.masks.Window`."""
    seqlen_q, n_heads = q.shape[1:3]
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:  # on the scaled scores, before any bias (flash-attn's and Gemma 2's order)
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if slopes is not None:
        offset = diagonal_offset(seqlen_q, seqlen_k, q.device)
        scores = scores - slopes.reshape(-1, n_heads, 1, 1) * offset.abs()
    seen = visible(seqlen_q, seqlen_k, causal, window, q.device)
    scores = scores.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Only rows that see no key (lse -inf) are zeroed: a NaN score stays NaN, as in PyTorch.
    probs = torch.exp(scores - lse[..., None]).masked_fill(lse[..., None] == float("-inf"), 0.0)
    return probs, lse


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = NO_WINDOW,
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention computed the plain way, materializing every score. Returns ``(out, lse)``.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0. Query i sees key j when
    ``i + shift - left <= j <= i + shift + right`` with ``shift = Sk - Sq`` (bottom-right
    aligned; -1: unbounded side; ``causal`` sets right = 0). ``attn_bias`` broadcasts to
    (B, H, Sq, Sk); ALiBi adds ``-slope * |i + shift - j|`` with slopes (H,) or (B, H).
    ``dropout_mask`` (B, H, Sq, Sk), True = kept, scales kept probabilities by 1/(1 - p).
    ``softcap`` > 0 caps the scaled scores first: ``s = softcap * tanh(s / softcap)``, then
    the bias and ALiBi are added (0: no cap). Rows that see no key give out 0 and lse -inf.
    lse: (B, H, Sq).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    window = window_bounds(window)
    return _reference(
        q,
        k,
        v,
        causal=causal,
        scale=scale,
        window=window,
        bias=attn_bias,
        slopes=alibi_slopes,
        dropout_mask=dropout_mask,
        dropout_p=dropout_p,
        softcap=softcap,
    )


def _reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: Window = UNBOUNDED,
    bias: Tensor | None = None,
    slopes: Tensor | None = None,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`attention_ref` with the window as a :data:`~fastlm.ops.masks.Window`."""
    probs, lse = _probs(
        q,
        k,
        causal=causal,
        scale=scale,
        window=window,
        bias=bias,
        slopes=slopes,
        softcap=softcap,
    )
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


# ---------------------------------------------------------------------------------------------
# Public API. Each entry point runs its contract (the checks below) before it picks a backend.

MAX_HEAD_DIM = 256  # flash-attn's limit, and the Triton kernels'

# The signatures (shapes, dtypes, devices) whose tensors have passed an op's metadata
# checks: on a small call those checks cost as much as the attention, and a workload
# repeats a few signatures. Only passes are recorded (a failing signature raises, with the
# same message, every time) and never while torch.compile traces (its guards fix the
# metadata anyway). Bounded: a full memo is emptied first.
_PASSED_QKV = signature_memo()  # flash_attention's q, k, v -> its _nan_probe
_PASSED_SDPA = signature_memo()  # scaled_dot_product_attention's, no mask -> same


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = NO_WINDOW,
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    seed: int | None = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    return_attn_probs: bool = False,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Attention over (batch, seqlen, heads, head_dim) tensors, as ``flash_attn_func``.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA: K/V are never
            repeated in memory). fp16/bf16 on the Triton kernels (fp32/fp64 on the torch
            backend); D from 1 to 256; any strides with a contiguous last dim.
        causal: query i sees keys j <= i + Sk - Sq (aligned bottom-right, as FlashAttention
            >= 2.1: with Sq > Sk the first Sq - Sk rows see nothing).
        softmax_scale: a finite number; defaults to 1/sqrt(D).
        dropout_p: dropout on the attention probabilities; ``seed`` fixes the mask (the same
            seed gives the same mask, and backward regenerates it). ``seed=None`` draws one
            from torch's default generator.
        window: (left, right): query i sees keys ``i + Sk - Sq - left <= j <= i + Sk - Sq +
            right``; -1 leaves a side unbounded.
        attn_bias: additive bias broadcastable to (B, H, Sq, Sk), differentiable (its
            gradient is summed over the broadcast dims), e.g. T5's relative positions.
        alibi_slopes: fp32 (H,) or (B, H); adds ``-slope * |i + Sk - Sq - j|``.
        return_lse: also return the fp32 log-sum-exp of each row's scores, (B, H, Sq).
        softcap: > 0 caps the scaled scores, ``s = softcap * tanh(s / softcap)`` (Gemma 2,
            Grok), before the bias, ALiBi and masks are applied; 0 (default): no cap.
        return_attn_probs: return ``(out, lse, S_dmask)`` as flash-attn: ``S_dmask``
            (B, H, Sq, Sk) fp32 holds the softmax probabilities (before dropout's 1/(1 - p)
            rescaling), negated where dropout dropped the entry (a dropped zero reads -0.0:
            test with ``signbit``), so ``out == (S_dmask.clamp(min=0) / (1 - p)) @ v``. For
            testing: it materializes every score, and is not traceable by torch.compile.
        deterministic: flash-attn's keyword. The Triton backward is deterministic always (no
            atomics: dK/dV summed per key block, dQ per query block) and so is the torch
            backend on the CPU; True makes the torch backend on CUDA tensors (forced) use
            its explicit path (matmuls) instead of SDPA, whose fused backwards may not be.

    Rows that see no key give zeros (and lse -inf), never NaN. A NaN in a row's query, or
    in a key, value or bias entry the row sees, gives NaN, as PyTorch's attention does; one
    in an entry the row does not see may reach it or not depending on the backend (SDPA
    adds the mask to a NaN score; the Triton kernels skip key blocks outside the window).
    """
    if any_autocast() and autocast_applies(q):  # (the decorator's layer costs every call)
        return _flash_under_autocast(
            q,
            k,
            v,
            causal,
            softmax_scale,
            dropout_p,
            window,
            attn_bias,
            alibi_slopes,
            seed,
            return_lse,
            softcap,
            return_attn_probs,
            deterministic,
        )
    # The contract's metadata checks run once per signature (see _PASSED_QKV), which also
    # keeps how the torch backend's SDPA call restores NaN rows (see _nan_probe).
    compiling = _is_compiling()
    probe = signature = None
    if not compiling:
        try:
            qs, ks = q.shape, k.shape
            where = (q.is_cpu and k.is_cpu and v.is_cpu) or (q.device, k.device, v.device)
            signature = (qs, ks, v.shape, q.dtype, k.dtype, v.dtype, where, type(q))
        except AttributeError:  # not tensors: the checks name the argument
            signature = None
        probe = _PASSED_QKV.get(signature)
    if probe is None:
        _check_qkv(q, k, v, packed=False)
        qs, ks = q.shape, k.shape
        probe = _nan_probe(q, ks[1], False, compiling)
        if signature is not None:
            remember(_PASSED_QKV, signature, probe)
    if (
        attn_bias is None
        and alibi_slopes is None
        and window is NO_WINDOW
        and seed is None
        and return_lse is False
        and return_attn_probs is False
        and deterministic is False
        and type(dropout_p) is float
        and dropout_p == 0.0
        and type(softcap) is float
        and softcap == 0.0
    ):
        # The common call (no option but causal and the scale) on the torch backend, bottom-
        # right causal with Sq != Sk aside (a mask): the SDPA call a user writes, with only
        # the arguments that differ from SDPA's defaults (each one passed costs SDPA's
        # argument parser time; a default scale is SDPA's own 1/sqrt(D), the same double).
        forced = backend.forced_backend()
        if (forced == "torch" or (forced is None and not q.is_cuda)) and (
            not causal or qs[1] == ks[1]
        ):
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if softmax_scale is not None or qs[2] != ks[2]:
                if softmax_scale is not None:
                    _check_scale(softmax_scale, 1)
                out = F.scaled_dot_product_attention(
                    qt,
                    kt,
                    vt,
                    None,
                    0.0,
                    bool(causal),
                    scale=softmax_scale,
                    enable_gqa=qs[2] != ks[2],
                )
            elif causal:
                out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
            else:
                out = F.scaled_dot_product_attention(qt, kt, vt)
            out = out.transpose(1, 2)
            # Every row sees a key: NaN rows as the reference's (torch.equal: _may_hold_nan).
            if not torch.equal(q, q) if probe is _EQUAL else probe is _PROBE and _may_hold_nan(q):
                out = out.masked_fill(q.isnan().any(-1, keepdim=True), math.nan)
            return out
    qs = q.shape
    bias = None
    if attn_bias is not None:
        bias = _check_bias(attn_bias, qs[0], qs[2], qs[1], k.shape[1], q)
    slopes = None if alibi_slopes is None else _check_alibi(alibi_slopes, qs[0], qs[2], q)
    scale = _check_scale(softmax_scale, qs[3])
    window = window_bounds(window)
    seed = _check_dropout(dropout_p, seed)
    softcap = check_softcap(softcap)
    need_probs = _check_flag("return_attn_probs", return_attn_probs)
    deterministic = _check_flag("deterministic", deterministic)
    need_lse = need_probs or return_lse
    name = _choose(q, lambda: _support(q))
    if name == "torch":
        out, lse, probs = _torch_dense(
            q,
            k,
            v,
            causal,
            scale,
            window,
            dropout_p,
            seed,
            bias,
            slopes,
            softcap,
            need_lse,
            need_probs,
            deterministic,
        )
    else:
        out, lse, probs = _kernel_dense(
            q, k, v, name, causal, scale, window, dropout_p, seed, bias, slopes, softcap, need_probs
        )
    if need_probs:
        return out, lse, probs
    return (out, lse) if return_lse else out


@autocast_policy(lower_precision=True)
def flash_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = NO_WINDOW,
    alibi_slopes: Tensor | None = None,
    seed: int | None = None,
    return_lse: bool = False,
    softcap: float = 0.0,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
    deterministic: bool = False,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """:func:`flash_attention` over packed variable-length sequences, as
    ``flash_attn_varlen_func``: q (total_q, H, D), k/v (total_k, Hkv, D); sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32, B + 1 non-decreasing entries from 0 to the
    packed length); ``max_seqlen_q``/``max_seqlen_k`` are at least the longest sequence's
    length. Masks align within each sequence. lse is (H, total_q). ``softcap`` and
    ``deterministic`` as in :func:`flash_attention`; ``return_attn_probs`` gives ``(out,
    lse, S_dmask)`` with S_dmask (B, H, max_seqlen_q, max_seqlen_k), sequence b's
    probabilities in its top-left corner and zeros past its lengths.

    Paged K/V (flash-attn's ``block_table``): k and v are caches (num_pages, page_size, Hkv,
    D) and ``block_table`` int32 (B, max_pages) lists each sequence's pages: its key j is
    slot ``j % page_size`` of page ``block_table[b, j // page_size]``, for j below its key
    count ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]`` (cu_seqlens_k counts keys from 0; it
    does not index k). Any page_size. Forward only, as flash-attn's: it runs under autograd
    (as flash-attn's tests call it), and a backward through it raises instead of giving a
    gradient. The Triton kernel reads the pages in place; the torch backend gathers them
    first."""
    paged = block_table is not None
    _check_qkv(q, k, v, packed=True, paged=paged)
    batch = _check_cu_seqlens(
        cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k, paged=paged
    )
    if paged:
        _check_block_table(block_table, batch, q, k, cu_seqlens_k)
    slopes = None if alibi_slopes is None else _check_alibi(alibi_slopes, batch, q.shape[1], q)
    scale = _check_scale(softmax_scale, q.shape[-1])
    graph = paged and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    with torch.no_grad() if graph else contextlib.nullcontext():
        out, lse, probs = _attention(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            window=window_bounds(window),
            dropout_p=dropout_p,
            seed=_check_dropout(dropout_p, seed),
            slopes=slopes,
            softcap=check_softcap(softcap),
            packed=(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
            block_table=block_table,
            need_lse=_check_flag("return_attn_probs", return_attn_probs) or return_lse,
            need_probs=return_attn_probs,
            deterministic=_check_flag("deterministic", deterministic),
        )
    if graph:
        out = _PagedForwardOnly.apply(out, q, k, v)
    if return_attn_probs:
        return out, lse, probs
    return (out, lse) if return_lse else out


class _PagedForwardOnly(torch.autograd.Function):
    """Paged K/V's output inside a graph (flash-attn runs that forward under autograd and has
    no backward for it): every backend alike, a backward that reaches it raises."""

    @staticmethod
    def forward(ctx, out: Tensor, *inputs: Tensor) -> Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "block_table: paged K/V attention has no backward (as flash-attn's); compute "
            "gradients through contiguous K/V (flash_attention_varlen without block_table)"
        )


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Same signature, (..., heads, seqlen, head_dim) layout and semantics as
    ``torch.nn.functional.scaled_dot_product_attention``: a boolean ``attn_mask`` marks
    allowed positions, a float one is added to the scores, ``is_causal`` is aligned top-left.
    Rows with no allowed key give zeros; a NaN query row that sees a key gives NaN. On CPU
    tensors this is PyTorch's own function. The Triton kernels take 4-D fp16/bf16 tensors
    with value's head_dim equal to query's, up to 256."""
    if any_autocast() and autocast_applies(query):  # (the decorator's layer costs every call)
        return _sdpa_under_autocast(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
        )
    # Without a mask the contract's metadata checks run once per signature (see
    # _PASSED_SDPA; enable_gqa is True only loosens them); dropout_p and scale every call.
    # The memo also keeps how the NaN rows are restored (_nan_probe) for that signature.
    compiling = _is_compiling()
    probe = signature = None
    if attn_mask is None and not compiling:
        try:
            where = (query.is_cpu and key.is_cpu and value.is_cpu) or (
                query.device,
                key.device,
                value.device,
            )
            signature = (
                query.shape,
                key.shape,
                value.shape,
                query.dtype,
                key.dtype,
                value.dtype,
                where,
                type(query),
                enable_gqa is True,
            )
        except AttributeError:  # not tensors: the checks name the argument
            signature = None
        probe = _PASSED_SDPA.get(signature)
    plain = type(dropout_p) is float and dropout_p == 0.0 and scale is None
    if probe is None:
        _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        probe = _nan_probe(query, key.shape[-2], attn_mask is not None, compiling)
        if signature is not None:
            remember(_PASSED_SDPA, signature, probe)
    elif not plain:
        # _check_sdpa's value checks, in its order.
        check_dropout(dropout_p, 0)
        _check_scale(scale, 1, "scale")
    forced = backend.forced_backend()
    if forced == "torch" or (forced is None and not query.is_cuda):
        name = "torch"
    else:
        name = _choose(query, lambda: _sdpa_support(query, key, value))
    if name == "torch":
        # Only the arguments that differ from SDPA's defaults: each one passed costs its
        # argument parser time.
        if plain and attn_mask is None and enable_gqa is False and is_causal is True:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        elif plain and attn_mask is None and enable_gqa is False and is_causal is False:
            out = F.scaled_dot_product_attention(query, key, value)
        else:
            out = F.scaled_dot_product_attention(
                query,
                key,
                value,
                attn_mask,
                dropout_p,
                is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        # PyTorch's fused CPU kernel drops a NaN query row to zeros; its math path, and the
        # reference, give NaN. With S > 0 every row sees a key (top-left causal included).
        if probe is _EQUAL:
            lost = not torch.equal(query, query)  # (see _may_hold_nan)
        else:
            lost = probe is _PROBE and _may_hold_nan(query)
        if lost:
            out = out.masked_fill(query.isnan().any(-1, keepdim=True), math.nan)
        return out
    # (B, S, H, D) views; key and value broadcast over the batch as in torch.
    q = query.transpose(1, 2)
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    if k.shape[0] != q.shape[0]:  # a batch of one, broadcast
        k, v = (t.expand(q.shape[0], *t.shape[1:]) for t in (k, v))
    batch, seqlen_q, n_heads = q.shape[:3]
    seqlen_k = k.shape[1]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = additive_mask(attn_mask, q.dtype)
        bias = _check_bias(attn_mask, batch, n_heads, seqlen_q, seqlen_k, q, name="attn_mask")
    scale = _check_scale(scale, q.shape[-1], "scale")
    # Top-left causal: j <= i, i.e. a window's right bound of -(Sk - Sq) at bottom-right.
    window = (None, seqlen_q - seqlen_k) if is_causal else UNBOUNDED
    seed = _check_dropout(dropout_p, None)
    out, _, _ = _kernel_dense(
        q, k, v, name, False, scale, window, dropout_p, seed, bias, None, 0.0, False
    )
    return out.transpose(1, 2)


# Under autocast the public functions run through their policy's wrapper, which calls them
# again with autocast off for their tensors' device (so :func:`autocast_applies` is then
# False): the common call, without autocast, pays one query instead of the wrapper's layer.
_flash_under_autocast = autocast_policy(lower_precision=True)(flash_attention)
_sdpa_under_autocast = autocast_policy(lower_precision=True)(scaled_dot_product_attention)


def autocast_applies(t: object) -> bool:
    """Whether autocast is on for the device of ``t``, the first tensor argument of a public
    function, as :func:`~fastlm.ops.autocast.autocast_policy` decides it (not a tensor:
    False, and the contract names it)."""
    if not isinstance(t, Tensor):
        return False
    device_type = t.device.type
    return (
        _is_compiling() or torch.amp.is_autocast_available(device_type)
    ) and torch.is_autocast_enabled(device_type)


# ---------------------------------------------------------------------------------------------
# Checks: the contract every backend shares.


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, packed: bool, paged: bool = False) -> None:
    dims = 3 if packed else 4
    if not paged and _qkv_plain(q, k, v, dims):
        # The common call, answered from the flags; the loop below names what is wrong.
        qs, ks = q.shape, k.shape
        head_dim = qs[-1]
        if ks != v.shape or ks[-1] != head_dim or not 1 <= head_dim <= MAX_HEAD_DIM:
            _check_head_dim(head_dim, ks[-1], v.shape[-1])
            raise ValueError(
                f"k and v must have the same shape, got {tuple(ks)} and {tuple(v.shape)}"
            )
        if ks[-2] < 1 or qs[-2] % ks[-2]:
            _check_heads(qs[-2], ks[-2])
        if not packed and ks[0] != qs[0]:
            raise ValueError(f"k has batch {ks[0]} but q has {qs[0]}")
        return
    layout = "(total, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if paged and name != "q":
            if t.dim() != 4:
                raise ValueError(
                    f"{name} must be a paged cache (num_pages, page_size, heads, head_dim) "
                    f"with block_table, got shape {tuple(t.shape)}"
                )
        elif t.dim() != dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_head_dim(q.shape[-1], k.shape[-1], v.shape[-1])
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    _check_heads(q.shape[-2], k.shape[-2])
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}")


def _qkv_plain(q, k, v, dims: int) -> bool:
    """Whether q, k and v pass :func:`_check_qkv`'s per-tensor checks (tensors of ``dims``
    dims, of q's floating-point dtype and device), read from their flags."""
    return (
        isinstance(q, Tensor)
        and isinstance(k, Tensor)
        and isinstance(v, Tensor)
        and q.dim() == dims
        and k.dim() == dims
        and v.dim() == dims
        and q.is_floating_point()
        and k.dtype is q.dtype
        and v.dtype is q.dtype
        and ((q.is_cpu and k.is_cpu and v.is_cpu) or q.device == k.device == v.device)
    )


def _check_head_dim(head_dim: int, k_dim: int, v_dim: int) -> None:
    if k_dim != head_dim or v_dim != head_dim:
        raise ValueError(f"head_dim must match: q {head_dim}, k {k_dim}, v {v_dim}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def _check_heads(n_heads: int, n_kv_heads: int) -> None:
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(
            f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads})"
        )


def _check_scale(softmax_scale, head_dim: int, name: str = "softmax_scale") -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    return check_real(name, softmax_scale)


def _check_dropout(dropout_p, seed) -> int:
    """:func:`~fastlm.ops.activation.check_dropout`, with no dropout answered first."""
    if seed is None and type(dropout_p) is float and dropout_p == 0.0:
        return 0
    return check_dropout(dropout_p, seed)


def _check_flag(name: str, value) -> bool:
    if value is False or value is True:
        return value
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def _check_bias(bias, batch, n_heads, seqlen_q, seqlen_k, q, name="attn_bias"):
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor")
    if bias.device != q.device:
        raise ValueError(f"{name} is on {bias.device} but q is on {q.device}")
    full = (batch, n_heads, seqlen_q, seqlen_k)
    try:
        return bias.expand(full)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(bias.shape)} does not broadcast to "
            f"(batch, heads, seqlen_q, seqlen_k) = {full}"
        ) from None


def _check_alibi(slopes, batch, n_heads, q):
    if slopes is None:
        return None
    if not isinstance(slopes, Tensor) or slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be a float32 tensor, got {describe(slopes)}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {q.device}")
    if tuple(slopes.shape) not in ((n_heads,), (batch, n_heads)):
        raise ValueError(
            f"alibi_slopes must be ({n_heads},) or ({batch}, {n_heads}), got {tuple(slopes.shape)}"
        )
    return slopes.expand(batch, n_heads)


def _check_cu_seqlens(cu_q, cu_k, q, k, max_seqlen_q, max_seqlen_k, paged=False) -> int:
    """Offsets from 0 to the packed length (for paged K/V, cu_seqlens_k only from 0: keys
    are counted, not packed), non-decreasing, each sequence no longer than its max_seqlen.
    The values are read with one device-to-host copy per tensor, skipped where they cannot
    be read (see :func:`~fastlm.ops.contract.values_readable`)."""
    check_int("max_seqlen_q", max_seqlen_q, 1)
    check_int("max_seqlen_k", max_seqlen_k, 1)
    for name, cu, total, max_name, longest in (
        ("cu_seqlens_q", cu_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
        ("cu_seqlens_k", cu_k, k.shape[0], "max_seqlen_k", max_seqlen_k),
    ):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32:
            raise TypeError(f"{name} must be an int32 tensor, got {describe(cu)}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(
                f"{name} must be 1-D with batch + 1 >= 2 offsets, got shape {tuple(cu.shape)}"
            )
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if not values_readable(cu):
            continue
        if cu.numel() <= _LISTED_OFFSETS:  # one copy, and the rest in Python
            offsets = cu.tolist()
            lengths = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
            first, last = offsets[0], offsets[-1]
            shortest, longest_seen = min(lengths), max(lengths)
        else:
            lengths = cu.diff()
            first, last, shortest, longest_seen = torch.stack(
                (cu[0], cu[-1], lengths.min(), lengths.max())
            ).tolist()
        if paged and name == "cu_seqlens_k":
            if first != 0:
                raise ValueError(f"{name} must start at 0, got {first}")
        elif first != 0 or last != total:
            raise ValueError(
                f"{name} must run from 0 to the packed length {total}, got {first}..{last}"
            )
        if shortest < 0:
            i = int((cu.diff() < 0).nonzero()[0, 0])
            raise ValueError(
                f"{name} must be non-decreasing, got {name}[{i}] = "
                f"{int(cu[i])} > {name}[{i + 1}] = {int(cu[i + 1])}"
            )
        if longest_seen > longest:
            raise ValueError(
                f"{max_name} = {longest} is less than the longest sequence in {name} "
                f"({longest_seen} rows)"
            )
    if cu_q.numel() != cu_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    return cu_q.numel() - 1


# Offsets read as a Python list up to this many (a batch of sequences): reducing them on the
# device takes several calls of a few microseconds each.
_LISTED_OFFSETS = 1024


def _check_block_table(block_table, batch: int, q: Tensor, k: Tensor, cu_k: Tensor) -> None:
    """flash-attn's ``block_table``: int32 (batch, max_pages) page numbers of k/v; enough
    pages for every sequence's keys, each a page of k (read where readable)."""
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be an int32 tensor, got {describe(block_table)}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must be (batch, max_pages) with batch = {batch}, got shape "
            f"{tuple(block_table.shape)}"
        )
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
    num_pages, page_size = k.shape[:2]
    if page_size < 1:
        raise ValueError(f"k's page_size (dim 1) must be >= 1, got {page_size}")
    if not (values_readable(block_table) and values_readable(cu_k)):
        return
    needed = (cu_k.diff().long() + page_size - 1) // page_size  # pages per sequence
    most = int(needed.max()) if batch else 0
    if most > block_table.shape[1]:
        b = int(needed.argmax())
        raise ValueError(
            f"block_table has {block_table.shape[1]} pages per sequence, but sequence {b} has "
            f"{int(cu_k[b + 1] - cu_k[b])} keys in pages of {page_size}: {most} pages"
        )
    used = torch.arange(block_table.shape[1], device=q.device)[None, :] < needed[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_pages))
    if bad.any():
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {i}] = {int(block_table[b, i])} is not a page of k "
            f"(num_pages = {num_pages})"
        )


def _gather_pages(cache: Tensor, block_table: Tensor, cu_k: Tensor) -> Tensor:
    """The packed (total_k, Hkv, D) keys (or values) of a paged cache (num_pages,
    page_size, Hkv, D): key j of sequence b is slot j % page_size of page
    block_table[b, j // page_size]."""
    page_size = cache.shape[1]
    lengths = cu_k.diff().long()
    total = int(cu_k[-1])
    seq = torch.repeat_interleave(
        torch.arange(lengths.numel(), device=cache.device), lengths, output_size=total
    )
    j = torch.arange(total, device=cache.device) - cu_k[:-1].long()[seq]
    pages = block_table.long()[seq, j // page_size]
    return cache.flatten(0, 1)[pages * page_size + j % page_size]


def _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """torch's rules for ``F.scaled_dot_product_attention``, refused with named errors."""
    if _sdpa_plain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != query.dtype:
            raise TypeError(f"{name} is {t.dtype} but query is {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}")
        if t.dim() != query.dim() or t.dim() < 2:
            raise ValueError(
                f"{name} must be (..., seqlen, head_dim) with query's "
                f"{query.dim()} dims, got shape {tuple(t.shape)}"
            )
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"head_dim must match: query {query.shape[-1]}, key {key.shape[-1]}")
    if query.shape[-1] < 1:
        raise ValueError(f"head_dim must be >= 1, got {query.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"key and value must have the same seqlen, got {key.shape[-2]} and {value.shape[-2]}"
        )
    if query.dim() >= 3:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if value.shape[-3] != kv_heads:
            raise ValueError(f"key has {kv_heads} heads but value {value.shape[-3]}")
        if enable_gqa:
            _check_heads(heads, kv_heads)
        elif kv_heads not in (heads, 1):
            raise ValueError(
                f"key has {kv_heads} heads and query {heads}: set "
                "enable_gqa=True for grouped-query attention"
            )
        for name, t in (("key", key), ("value", value)):
            try:
                batch = tuple(torch.broadcast_shapes(t.shape[:-3], query.shape[:-3]))
            except RuntimeError:  # no common shape at all
                batch = None
            if batch != query.shape[:-3]:
                raise ValueError(
                    f"{name}'s batch dims {tuple(t.shape[:-3])} do not broadcast "
                    f"to query's {tuple(query.shape[:-3])}"
                )
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor) or not (
            attn_mask.dtype == torch.bool or attn_mask.is_floating_point()
        ):
            raise TypeError(f"attn_mask must be a bool or float tensor, got {describe(attn_mask)}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        full = (*query.shape[:-1], key.shape[-2])
        try:
            broadcast = tuple(torch.broadcast_shapes(attn_mask.shape, full))
        except RuntimeError:
            broadcast = None
        if broadcast != full:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                f"to (..., seqlen_q, seqlen_k) = {full}"
            )
        if is_causal:
            raise ValueError("attn_mask and is_causal cannot both be set")
    # A given seed validates dropout_p without drawing one from torch's generator, which
    # would shift the random stream PyTorch's own SDPA then draws its mask from.
    check_dropout(dropout_p, 0)
    _check_scale(scale, query.shape[-1], "scale")


def _sdpa_plain(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """Whether a call passes :func:`_check_sdpa` by its most common shape: three tensors of
    one float dtype and device, (..., H, S, D) with equal batch dims, as many key as value
    heads (one, or the query's, or a divisor with ``enable_gqa``), no mask, no dropout, the
    default scale. Read from the flags, for a fraction of what the full check costs; the
    full check decides (and names the error) otherwise."""
    if not (
        attn_mask is None
        and scale is None
        and type(dropout_p) is float
        and dropout_p == 0.0
        and isinstance(query, Tensor)
        and isinstance(key, Tensor)
        and isinstance(value, Tensor)
        and query.is_floating_point()
        and key.dtype is query.dtype
        and value.dtype is query.dtype
        and (
            (query.is_cpu and key.is_cpu and value.is_cpu)
            or query.device == key.device == value.device
        )
    ):
        return False
    qs, ks, vs = query.shape, key.shape, value.shape
    dims = len(qs)
    if dims < 3 or len(ks) != dims or len(vs) != dims or qs[-1] < 1 or ks[-1] != qs[-1]:
        return False
    if ks[-2] != vs[-2] or ks[:-3] != qs[:-3] or vs[:-3] != qs[:-3]:
        return False
    heads, kv_heads = qs[-3], ks[-3]
    if vs[-3] != kv_heads:
        return False
    return kv_heads in (heads, 1) or (enable_gqa and kv_heads >= 1 and heads % kv_heads == 0)


# ---------------------------------------------------------------------------------------------
# Dispatch, custom ops and autograd.


def _choose(where: Tensor, support) -> str:
    """``backend.select`` for attention, with a forced torch backend answered first: it
    serves every call that passed the contract, so building the support checks to ask
    would only cost time."""
    if backend.forced_backend() == "torch":
        return "torch"
    return backend.select("attention", where, support)


def _support(q: Tensor) -> dict:
    def triton_error():
        if q.dtype not in HALF_DTYPES:
            return f"the attention kernels take fp16/bf16, got {q.dtype}"
        return None

    return supports(triton_error)


def _sdpa_support(query, key, value) -> dict:
    def triton_error():
        if query.dim() != 4:
            return (
                f"the attention kernels take 4-D (batch, heads, seqlen, head_dim) tensors, "
                f"got {query.dim()}-D"
            )
        if value.shape[-1] != query.shape[-1]:
            return (
                f"the attention kernels need value's head_dim ({value.shape[-1]}) equal "
                f"to query's ({query.shape[-1]})"
            )
        if query.shape[-1] > MAX_HEAD_DIM:
            return (
                f"the attention kernels take head_dim up to {MAX_HEAD_DIM}, got {query.shape[-1]}"
            )
        if query.dtype not in HALF_DTYPES:
            return f"the attention kernels take fp16/bf16, got {query.dtype}"
        return None

    return supports(triton_error)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: Window,
    dropout_p: float,
    seed: int,
    bias: Tensor | None = None,
    slopes: Tensor | None = None,
    softcap: float = 0.0,
    packed: tuple[Tensor, Tensor, int, int] | None = None,
    block_table: Tensor | None = None,
    need_lse: bool = False,
    need_probs: bool = False,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Checked arguments to the chosen backend. ``packed`` is (cu_seqlens_q, cu_seqlens_k,
    max_seqlen_q, max_seqlen_k) for packed sequences. Returns ``(out, lse, S_dmask)``; the
    torch backend computes lse only when ``need_lse``, S_dmask (flash-attn's probabilities,
    negative where dropped) is computed only when ``need_probs``."""
    cu_k = packed[1] if packed else None
    name = backend.select("attention", q, lambda: _support(q))
    if block_table is not None and (name == "torch" or need_probs) and not q.is_meta:
        packed_k, packed_v = (_gather_pages(t, block_table, cu_k) for t in (k, v))
    if name == "torch":
        if block_table is not None:  # the torch backend reads gathered pages
            k, v = (packed_k, packed_v) if not q.is_meta else (k[:0, 0], v[:0, 0])
        return _torch_attention(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            window=window,
            dropout_p=dropout_p,
            seed=seed,
            bias=bias,
            slopes=slopes,
            softcap=softcap,
            packed=packed,
            need_lse=need_lse,
            need_probs=need_probs,
            deterministic=deterministic,
        )
    keys = packed_k if block_table is not None and need_probs else None
    return _kernel_dense(
        q,
        k,
        v,
        name,
        causal,
        scale,
        window,
        dropout_p,
        seed,
        bias,
        slopes,
        softcap,
        need_probs,
        packed,
        block_table,
        keys,
    )


def _kernel_dense(
    q,
    k,
    v,
    name,
    causal,
    scale,
    window,
    dropout_p,
    seed,
    bias,
    slopes,
    softcap,
    need_probs,
    packed=None,
    block_table=None,
    keys=None,
):
    """:func:`_attention` for backend ``name``, a kernel's (chosen already): the custom op
    called with no layer between; dense (B, S, H, D) tensors unless ``packed`` (and
    ``block_table``, whose gathered keys ``keys`` the probabilities read) say otherwise."""
    cu_q, cu_k, max_q, max_k = packed or (None, None, q.shape[1], k.shape[1])
    # The custom op's schema takes flat arguments: the window as its two sides.
    left, right = window
    out, lse = attention_fwd(
        last_dim_contiguous(q),
        last_dim_contiguous(k),
        last_dim_contiguous(v),
        bias,
        slopes,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal,
        scale,
        left,
        right,
        float(dropout_p),
        seed,
        softcap,
        block_table,
        name,
    )
    probs = None
    if need_probs:
        args = _kernel_args(causal, scale, left, right, dropout_p, seed, softcap)
        probs = _kernel_probs(q, k if keys is None else keys, args, window, bias, slopes, packed)
    return out, lse, probs


def _kernel_probs(q, k, args, window, bias, slopes, packed) -> Tensor:
    """S_dmask for the Triton kernels: the probabilities in fp32, negated where the keep
    pattern the kernels drew (regenerated by their own random function) dropped them."""
    from fastlm.kernels.attention import dropout_keep

    if packed is None:
        batch, max_q, n_heads = q.shape[:3]
        max_k, cu_q, cu_k = k.shape[1], None, None
        probs, _ = _probs(
            q.float(),
            k.float(),
            causal=args.causal,
            scale=args.softmax_scale,
            window=window,
            bias=None if bias is None else bias.float(),
            slopes=slopes,
            softcap=args.softcap,
        )
    else:
        cu_q, cu_k, max_q, max_k = packed
        batch, n_heads = cu_q.numel() - 1, q.shape[1]
        probs = _packed_probs(q, k, cu_q, cu_k, max_q, max_k, args, window, slopes)
    keep = dropout_keep(batch, n_heads, max_q, max_k, args, cu_q, cu_k, q.device)
    return torch.where(keep, probs, -probs)


def _packed_probs(q, k, cu_q, cu_k, max_q, max_k, args, window, slopes) -> Tensor:
    """(B, H, max_q, max_k) fp32 probabilities of packed sequences, each in its top-left
    corner, zeros elsewhere."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    probs = q.new_zeros((len(starts_q) - 1, q.shape[1], max_q, max_k), dtype=torch.float32)
    for b in range(len(starts_q) - 1):
        rows = slice(starts_q[b], starts_q[b + 1])
        cols = slice(starts_k[b], starts_k[b + 1])
        p, _ = _probs(
            q[None, rows].float(),
            k[None, cols].float(),
            causal=args.causal,
            scale=args.softmax_scale,
            window=window,
            bias=None,
            slopes=None if slopes is None else slopes[b : b + 1],
            softcap=args.softcap,
        )
        probs[b, :, : p.shape[2], : p.shape[3]] = p[0]
    return probs


@functools.cache
def _kernels():
    """``fastlm.kernels.attention``, imported on first use (it imports Triton); its
    functions are looked up per call, so a test may replace them."""
    import fastlm.kernels.attention

    return fastlm.kernels.attention


@functools.lru_cache(maxsize=64)
def _kernel_args(causal, scale, left, right, dropout_p, seed, softcap):
    # Kept per distinct arguments: building the frozen dataclass costs microseconds per
    # call, and a training run repeats a few combinations (dropout's seed aside).
    return _kernels().AttentionArgs(causal, scale, (left, right), dropout_p, seed, softcap)


def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    dropout_p: float,
    seed: int,
    softcap: float,
    block_table: Tensor | None,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    args = _kernel_args(causal, scale, window_left, window_right, dropout_p, seed, softcap)
    return _kernels().attention_fwd(
        q,
        k,
        v,
        args,
        bias,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        block_table,
    )


_attention_fwd_op = torch.library.custom_op(
    "fastlm::attention_fwd", _attention_fwd, mutates_args=()
)


@_attention_fwd_op.register_fake
def _(
    q,
    k,
    v,
    bias,
    alibi_slopes,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window_left,
    window_right,
    dropout_p,
    seed,
    softcap,
    block_table,
    backend_name,
):
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


def _attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    bias: Tensor | None,
    bias_grad: bool,
    alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None,
    cu_seqlens_k: Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int | None,
    window_right: int | None,
    dropout_p: float,
    seed: int,
    softcap: float,
    backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dbias); dbias is the fp32 (B, H, Sq, Sk) score gradient or empty."""
    args = _kernel_args(causal, scale, window_left, window_right, dropout_p, seed, softcap)
    dq, dk, dv, dbias = _kernels().attention_bwd(
        last_dim_contiguous(grad_out),
        q,
        k,
        v,
        out,
        lse,
        args,
        bias,
        bias_grad,
        alibi_slopes,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
    )
    return dq, dk, dv, absent(q, torch.float32) if dbias is None else dbias


_attention_bwd_op = torch.library.custom_op(
    "fastlm::attention_bwd", _attention_bwd, mutates_args=()
)
attention_bwd = EagerOp(_attention_bwd_op, _attention_bwd)


@_attention_bwd_op.register_fake
def _(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    bias,
    bias_grad,
    alibi_slopes,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window_left,
    window_right,
    dropout_p,
    seed,
    softcap,
    backend_name,
):
    dbias = (
        bias.new_empty(bias.shape, dtype=torch.float32) if bias_grad else absent(q, torch.float32)
    )
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _attention_setup_context(ctx, inputs, output):
    # block_table (paged K/V) is refused at the op's entry wherever autograd is on.
    q, k, v, bias, slopes, cu_q, cu_k, *options, _block_table, name = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, slopes, cu_q, cu_k)
    ctx.options = (*options, name)  # max_q, max_k, ..., softcap, backend name


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias, slopes, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale, left, right, p, seed, softcap, name = ctx.options
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = attention_bwd(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        bias,
        bias_grad,
        slopes,
        cu_q,
        cu_k,
        max_q,
        max_k,
        causal,
        scale,
        left,
        right,
        p,
        seed,
        softcap,
        name,
    )
    dbias = dbias.to(bias.dtype) if bias_grad else None
    return (dq, dk, dv, dbias, *([None] * 14))


attention_fwd = EagerOp(
    _attention_fwd_op, _attention_fwd, _attention_setup_context, _attention_backward
)


def _torch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: Window,
    dropout_p: float,
    seed: int,
    bias: Tensor | None,
    slopes: Tensor | None,
    softcap: float,
    packed: tuple[Tensor, Tensor, int, int] | None,
    need_lse: bool,
    need_probs: bool,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The torch backend. PyTorch's SDPA with the masks as one additive mask (fp32, so an
    fp32 bias or ALiBi is not rounded to the inputs' dtype first), its dropout seeded by
    ``seed`` (reproducible, though not the Triton kernels' random stream). SDPA cannot cap
    scores nor return the log-sum-exp or the probabilities: with a soft cap, or when those
    are asked for, the scores are computed explicitly (:func:`_explicit_attention`). Packed
    sequences run one at a time."""
    if packed is not None:
        return _torch_packed(
            q,
            k,
            v,
            packed,
            causal=causal,
            scale=scale,
            window=window,
            dropout_p=dropout_p,
            seed=seed,
            slopes=slopes,
            softcap=softcap,
            need_lse=need_lse,
            need_probs=need_probs,
            deterministic=deterministic,
        )
    return _torch_dense(
        q,
        k,
        v,
        causal,
        scale,
        window,
        dropout_p,
        seed,
        bias,
        slopes,
        softcap,
        need_lse,
        need_probs,
        deterministic,
    )


def _torch_dense(
    q,
    k,
    v,
    causal,
    scale,
    window,
    dropout_p,
    seed,
    bias,
    slopes,
    softcap,
    need_lse,
    need_probs,
    deterministic,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The torch backend on dense (B, S, H, D) tensors (see :func:`_torch_attention`), its
    arguments positional: the one call of both entrances (flash_attention's own, and
    :func:`_torch_attention`'s)."""
    if softcap or need_lse or need_probs or (deterministic and q.is_cuda):
        return _explicit_attention(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            window=window,
            dropout_p=dropout_p,
            seed=seed,
            bias=bias,
            slopes=slopes,
            softcap=softcap,
            need_probs=need_probs,
            need_lse=need_lse,
        )
    out = _torch_sdpa(q, k, v, causal, scale, window, dropout_p, seed, bias, slopes)
    return out, None, None


# How SDPA's NaN rows are restored for a signature (see _nan_probe).
_EQUAL, _PROBE, _NONE = "equal", "probe", "none"


def _nan_probe(q: Tensor, seqlen_k: int, masked: bool, compiling: bool) -> str:
    """How to find whether SDPA dropped a NaN query row of ``q`` (against ``seqlen_k`` keys),
    from the metadata: ``_EQUAL`` (``not torch.equal(q, q)``: a small plain CPU query, not
    traced), ``_PROBE`` (:func:`_may_hold_nan`) or ``_NONE`` (no row lost: no key, or a
    fused CPU kernel that keeps NaN rows). ``masked``: with a mask (any row may be lost)."""
    if seqlen_k < 1 or (not masked and seqlen_k >= NAN_SAFE_KEYS and q.is_cpu):
        return _NONE
    if masked or compiling or type(q) is not Tensor or not q.is_cpu or q.numel() > _EQUAL_PROBE:
        return _PROBE
    return _EQUAL


def _nan_rows_lost(q: Tensor, seqlen_k: int, compiling: bool) -> bool:
    """``_nan_rows_may_be_lost(q, seqlen_k) and _may_hold_nan(q)`` in one call, a small CPU
    query probed here (every call of the torch backend's SDPA on a few keys asks; the
    layers between cost as much as the probe). ``compiling`` as
    ``torch.compiler.is_compiling()`` answered."""
    if seqlen_k < 1 or (seqlen_k >= NAN_SAFE_KEYS and q.is_cpu):
        return False
    if compiling or type(q) is not Tensor or not q.is_cpu or q.numel() > _EQUAL_PROBE:
        return _may_hold_nan(q)
    return not torch.equal(q, q)  # (see _may_hold_nan)


def _torch_sdpa(q, k, v, causal, scale, window, dropout_p, seed, bias, slopes) -> Tensor:
    """The torch backend's SDPA path of dense attention (no cap, no lse): PyTorch's SDPA on
    (B, H, S, D) views, the masks as one additive mask (fp32, so an fp32 bias or ALiBi is
    not rounded to the inputs' dtype first), its dropout seeded by ``seed``.

    The common calls cost what plain PyTorch's do: no mask unless one is needed (causal
    with Sq == Sk is SDPA's own ``is_causal``, the call a user writes), small masks built
    once per shape, and the random state forked only for dropout."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    seen = None
    is_causal = False
    left, right = window
    plain_causal = left is None and (right is None or right >= 0) and seqlen_q == seqlen_k
    if causal and plain_causal and bias is None and slopes is None:
        # Top-left and bottom-right causal agree when Sq == Sk; SDPA takes is_causal only
        # without an explicit mask, so a bias or ALiBi gets the triangle in its mask.
        is_causal = True
    elif causal or left is not None or right is not None:
        seen = _visible(seqlen_q, seqlen_k, causal, window, q.device)
    mask = None
    if seen is not None or bias is not None or slopes is not None:
        compute = torch.promote_types(q.dtype, torch.float32)
        mask = _sdpa_mask(seqlen_q, seqlen_k, seen, bias, slopes, compute, q.device)
        if not _sdpa_takes_wider_mask(q.device):
            mask = _rounded_mask(mask, q.dtype)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
    gqa = q.shape[2] != k.shape[2]
    if dropout_p > 0:
        with torch.random.fork_rng(devices=[q.device] if q.is_cuda else []):
            torch.manual_seed(seed)
            out = F.scaled_dot_product_attention(
                *args, dropout_p, is_causal, scale=scale, enable_gqa=gqa
            )
    else:
        out = F.scaled_dot_product_attention(*args, 0.0, is_causal, scale=scale, enable_gqa=gqa)
    return _nan_rows_as_reference(out.transpose(1, 2), q, seqlen_k, seen)


# Masks of up to this many (query, key) pairs are kept per shape: building one costs more
# than SDPA on such a shape, while a long sequence's mask costs little beside its attention
# and would hold memory.
_CACHED_MASK_PAIRS = 1 << 16


def _visible(seqlen_q: int, seqlen_k: int, causal: bool, window: Window, device) -> Tensor:
    """:func:`~fastlm.ops.masks.visible`, the small ones built once per shape (never under
    torch.compile, which traces the masks into its graph)."""
    if seqlen_q * seqlen_k > _CACHED_MASK_PAIRS or torch.compiler.is_compiling():
        return visible(seqlen_q, seqlen_k, causal, window, device)
    return _cached_visible(seqlen_q, seqlen_k, bool(causal), window, device)


@functools.lru_cache(maxsize=32)
def _cached_visible(seqlen_q, seqlen_k, causal, window, device) -> Tensor:
    return visible(seqlen_q, seqlen_k, causal, window, device)


def _torch_packed(
    q, k, v, packed, *, slopes, need_lse, need_probs, deterministic, **options
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The torch backend on packed sequences: each sequence as a batch of one (dropout seeded
    by ``seed + b``); S_dmask padded to (B, H, max_seqlen_q, max_seqlen_k) with zeros."""
    cu_q, cu_k, max_q, max_k = packed
    shape = (cu_q.numel() - 1, q.shape[1], max_q, max_k)
    if q.device.type == "meta":  # no offsets to read: shapes only
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        probs = q.new_empty(shape, dtype=torch.float32) if need_probs else None
        return torch.empty_like(q), lse if need_lse else None, probs
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    seed = options.pop("seed")
    outs, lses, probs = [], [], []
    for b in range(shape[0]):
        rows = slice(starts_q[b], starts_q[b + 1])
        cols = slice(starts_k[b], starts_k[b + 1])
        o, lse, p = _torch_attention(
            q[None, rows],
            k[None, cols],
            v[None, cols],
            seed=seed + b,
            bias=None,
            slopes=None if slopes is None else slopes[b : b + 1],
            packed=None,
            need_lse=need_lse,
            need_probs=need_probs,
            deterministic=deterministic,
            **options,
        )
        outs.append(o[0])
        lses.append(None if lse is None else lse[0])
        probs.append(p)
    lse = (lses[0] if len(lses) == 1 else torch.cat(lses, dim=-1)) if need_lse else None
    s_dmask = None
    if need_probs:
        s_dmask = q.new_zeros(shape, dtype=torch.float32)
        for b, p in enumerate(probs):
            s_dmask[b, :, : p.shape[2], : p.shape[3]] = p[0]
    one = len(outs) == 1 and outs[0].is_contiguous()  # (a cat would only copy it)
    return outs[0] if one else torch.cat(outs), lse, s_dmask


# Scores per chunk of query rows on the explicit path: 4M fp32 elements (16 MiB), a few live
# copies at a time, whatever the sequence length.
_CHUNK_SCORES = 1 << 22


def _explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float,
    window: Window,
    dropout_p: float,
    seed: int,
    bias: Tensor | None,
    slopes: Tensor | None,
    softcap: float,
    need_probs: bool,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Attention with the scores materialized in fp32 (fp64 for fp64 inputs), the reference's
    formula, chunk by chunk of query rows so memory stays bounded for long sequences; under
    autograd, when there are several chunks, each is recomputed in backward (activation
    checkpointing) instead of keeping its probabilities. Dropout draws each chunk's keep
    pattern in turn from one generator seeded by ``seed`` (the chunks depend on the shapes
    only, so a seed gives one pattern). Returns ``(out, lse or None unless need_lse,
    S_dmask or None)``."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, seqlen_q, n_heads, _ = q.shape
    seqlen_k = k.shape[1]
    group = n_heads // k.shape[2]
    # (B, H, S, D) operands for batched matmuls; the scale (over the cap) folded into q.
    q_ = q.to(compute).transpose(1, 2) * (scale / softcap if softcap else scale)
    if group > 1:
        k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    k_, v_ = (t.to(compute).transpose(1, 2) for t in (k, v))
    bias_ = None if bias is None else bias.to(compute)
    gen = None
    if dropout_p > 0:
        gen = torch.Generator(device=q.device).manual_seed(seed)
    rows = max(1, _CHUNK_SCORES // max(1, batch * n_heads * seqlen_k))
    options = dict(
        seqlen_q=seqlen_q,
        causal=causal,
        window=window,
        slopes=slopes,
        softcap=softcap,
        dropout_p=dropout_p,
        need_lse=need_lse,
    )
    tensors = [t for t in (q, k, v, bias) if t is not None]
    # Recomputed in backward only where the rows run in several chunks: one chunk's scores
    # (at most _CHUNK_SCORES) are kept as plain PyTorch keeps them, and backward then costs
    # what plain PyTorch's does.
    recompute = (
        rows < seqlen_q
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not need_probs
        and q.device.type != "meta"
    )
    outs, lses, probs = [], [], []
    for first in range(0, seqlen_q, rows):
        part = slice(first, first + rows)
        keep = None
        if gen is not None:  # one chunk's pattern in memory at a time (1 byte per score)
            shape = (batch, n_heads, min(rows, seqlen_q - first), seqlen_k)
            keep = torch.rand(shape, generator=gen, device=q.device) >= dropout_p
        chunk = (
            q_[:, :, part],
            k_,
            v_,
            None if bias_ is None else bias_[:, :, part],
            keep,
            first,
        )
        if recompute:
            o, lse, p = checkpoint(_attention_chunk, *chunk, **options, use_reentrant=False)
        else:
            o, lse, p = _attention_chunk(*chunk, **options)
        outs.append(o)
        lses.append(lse)
        if need_probs:
            probs.append(p if keep is None else torch.where(keep, p, -p))
    if not outs:  # no query rows
        empty = q.new_empty((batch, 0, n_heads), dtype=torch.float32).transpose(1, 2)
        s_dmask = q.new_zeros((batch, n_heads, 0, seqlen_k), dtype=torch.float32)
        return torch.empty_like(q), empty, s_dmask if need_probs else None
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)).to(q.dtype)
    lse = torch.cat(lses, dim=-1).float() if need_lse else None
    return out, lse, torch.cat(probs, dim=2).float() if need_probs else None


def _attention_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    keep: Tensor | None,
    first: int,
    *,
    seqlen_q: int,
    causal: bool,
    window: Window,
    slopes: Tensor | None,
    softcap: float,
    dropout_p: float,
    need_lse: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Query rows ``first .. first + len`` of :func:`_reference`, from (B, H, S, D) operands
    (q already scaled, over ``softcap`` when capped; K/V repeated over the query heads):
    ``(out (B, rows, H, D), lse or None, probabilities before dropout)``."""
    seqlen_k, n_rows = k.shape[2], q.shape[2]
    scores = q @ k.transpose(-1, -2)
    if softcap:
        scores = torch.tanh(scores) * softcap
    if bias is not None:
        scores = scores + bias
    shift = seqlen_k - seqlen_q  # the masks and ALiBi align bottom-right
    left, right = causal_window(window, causal)
    offset = None
    if slopes is not None or left is not None:
        # i + Sk - Sq - j for the chunk's rows i.
        i = torch.arange(first, first + n_rows, device=q.device)[:, None]
        offset = i + shift - torch.arange(seqlen_k, device=q.device)[None, :]
    if slopes is not None:
        scores = scores - slopes.to(scores.dtype).reshape(-1, q.shape[1], 1, 1) * offset.abs()
    seen = None
    if left is not None or right is not None:
        if offset is None:  # causal-like, no left bound: a triangle, j <= i + shift + right
            seen = torch.ones(n_rows, seqlen_k, dtype=torch.bool, device=q.device)
            seen = seen.tril_(first + shift + right)
        else:
            seen = offset <= left if left is not None else offset >= -right
            if left is not None and right is not None:
                seen &= offset >= -right
        scores = scores.masked_fill(~seen, float("-inf"))
    # A bias may hide every key of a row (-inf): then only the log-sum-exp tells.
    lse = torch.logsumexp(scores, dim=-1) if need_lse or bias is not None else None
    probs = torch.softmax(scores, dim=-1)
    # Only rows that see no key are zeroed: a NaN score stays NaN, as in PyTorch.
    if lse is not None:
        probs = probs.masked_fill(lse[..., None] == float("-inf"), 0.0)
    elif seen is not None:
        sees = seen.any(-1, keepdim=True)
        # On CPU tensors in eager mode the fill is skipped when every row sees a key (no
        # device sync there; a traced call cannot branch on a value).
        if not q.is_cpu or torch.compiler.is_compiling() or not sees.all():
            probs = probs.masked_fill(~sees, 0.0)
    weights = probs if keep is None else probs * keep / (1.0 - dropout_p)
    return (weights @ v).transpose(1, 2), lse, probs


def _nan_rows_as_reference(out: Tensor, q: Tensor, seqlen_k: int, seen: Tensor | None):
    """PyTorch's fused CPU kernel takes a NaN query row for one that sees no key and gives
    it zeros, and gives NaN to a NaN row that sees none; the reference (and PyTorch's math
    path) give NaN exactly where the row sees a key. out, q: (B, Sq, H, D)."""
    if seqlen_k == 0 or not _may_hold_nan(q):
        return out
    nan_rows = q.isnan().any(-1, keepdim=True)  # (B, Sq, H, 1)
    if seen is None:
        return out.masked_fill(nan_rows, math.nan)
    sees_key = seen.any(-1)[:, None, None]  # (Sq, 1, 1)
    out = out.masked_fill(nan_rows & sees_key, math.nan)
    return out.masked_fill(nan_rows & ~sees_key, 0.0)


# From this many keys on, PyTorch's fused CPU attention kernel gives a NaN query row NaN by
# itself: its row maximum over each block of keys is vectorized (a NaN in any lane makes it
# NaN), and only key counts below one vector's width (8 or 16 floats on x86; the first block
# holds at least 32 keys) go through its scalar tail, which skips a NaN and zeroes the row.
# test_cpu_sdpa_keeps_nan_rows_from_this_many_keys checks it on the installed PyTorch.
NAN_SAFE_KEYS = 64


def _nan_rows_may_be_lost(q: Tensor, seqlen_k: int) -> bool:
    """Whether SDPA may have turned a NaN query row into zeros, when every row sees one of
    ``seqlen_k`` > 0 keys: always off the CPU (other kernels, other rules), on CPU tensors
    only below :data:`NAN_SAFE_KEYS` keys."""
    return seqlen_k > 0 and (seqlen_k < NAN_SAFE_KEYS or not q.is_cpu)


def _may_hold_nan(x: Tensor) -> bool:
    """False when ``x`` surely holds no NaN. On CPU tensors one call answers for a fraction
    of what finding the NaN rows costs: on small tensors ``torch.equal(x, x)``, False
    exactly when x holds a NaN (NaN != NaN; for a tensor and itself PyTorch's CPU kernel
    scans for NaN, one element at a time, with no temporary and no ``.item()``); on larger
    ones a reduction, vectorized: a NaN makes the max NaN, and the sum (so may inf - inf, a
    false alarm the exact check then clears); max is the cheaper of the two on mid-sized
    tensors, sum the faster pass over large ones. Elsewhere (a device sync, a graph break)
    the exact check runs."""
    if type(x) is not Tensor or not x.is_cpu or _is_compiling():
        return True  # (a subclass, DTensor say, may not reduce to one local number)
    n = x.numel()
    if n <= _EQUAL_PROBE:
        return not torch.equal(x, x)
    if x.requires_grad:
        x = x.detach()
    if n <= _MAX_PROBE:
        return math.isnan(x.max().item())
    return math.isnan(x.sum().item())


# Up to this many elements torch.equal's scalar scan beats a reduction and its .item(); up
# to _MAX_PROBE max beats sum (measured on a 2-core EPYC, float32 and bfloat16).
_EQUAL_PROBE = 1 << 11
_MAX_PROBE = 1 << 14


def _sdpa_takes_wider_mask(device: torch.device) -> bool:
    """Whether SDPA adds a float32 mask to half-precision scores as it is. PyTorch's CPU
    kernels do (and faster than a bf16 mask); CUDA's memory-efficient kernel refuses a mask
    whose dtype is not the query's."""
    return device.type == "cpu"


def _rounded_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask`` in ``dtype``, each row first shifted so its largest entry is 0: softmax
    ignores a per-row constant, and the entries near the row's top, which carry its weight,
    then round to within ``dtype``'s precision of their distance from the top rather than of
    their size (ALiBi's distances reach the sequence length)."""
    top = mask.amax(-1, keepdim=True)
    return (mask - torch.where(torch.isfinite(top), top, 0.0)).to(dtype)


def _sdpa_mask(seqlen_q, seqlen_k, seen, bias, slopes, dtype, device):
    """The visible keys (``seen``, None: all), bias and ALiBi as one additive ``dtype`` mask
    for SDPA (None when none apply)."""
    mask = None if seen is None else additive_mask(seen, dtype)
    if bias is not None:
        mask = bias.to(dtype) if mask is None else mask + bias.to(dtype)
    if slopes is not None:
        distance = diagonal_offset(seqlen_q, seqlen_k, device).abs()
        alibi = -slopes.to(dtype).reshape(slopes.shape[0], -1, 1, 1) * distance
        mask = alibi if mask is None else mask + alibi
    return mask


backend.register_op("attention", ("triton", "torch"))
