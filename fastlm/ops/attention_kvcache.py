"""Decode attention over KV caches, ``attention_with_kvcache`` (as ``flash_attn_with_kvcache``):
its contract, custom op and backends (the Triton decode kernel of
``kernels/attention_decode.py``, or torch).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import (
    HALF_DTYPES,
    EagerOp,
    _is_compiling,
    any_autocast,
    remember,
    remembered_range,
    signature_memo,
    supports,
)
from fastlm.ops.attention import (
    _EQUAL_PROBE,
    MAX_HEAD_DIM,
    NAN_SAFE_KEYS,
    _check_alibi,
    _check_head_dim,
    _check_heads,
    _check_scale,
    _may_hold_nan,
    _nan_rows_may_be_lost,
    autocast_applies,
)
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_int, check_softcap, describe, values_readable
from fastlm.ops.masks import NO_WINDOW, window_bounds
from fastlm.ops.rotary import apply_rotary


def attention_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None = None,
    v_new: Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    *,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    rotary_interleaved: bool = True,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    window: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention: a few new queries against per-sequence KV caches, as
    ``flash_attn_with_kvcache`` (same keywords, except ``window`` for its ``window_size``
    and ``k_new``/``v_new`` for its ``k``/``v``). Inference only (no autograd).

    q: (B, Sq, H, D), Sq >= 1, D from 1 to 256. k_cache, v_cache in q's dtype, H % Hkv == 0:
      (B_cache, S_max, Hkv, D), or with ``block_table`` (num_pages, page_size, Hkv, D).
    cache_seqlens: int32 (B,), the cache position where row b's new keys go (the keys already
      cached end there).
    k_new, v_new: (B, Sq_new, Hkv, D), both or neither: written into the caches in place at
      positions ``cache_seqlens[b] .. + Sq_new - 1`` and attended to. Row b then has the
      keys at positions ``[cache_leftpad[b], L_b)``, ``L_b = cache_seqlens[b] + Sq_new``,
      which must fit the cache (``L_b <= S_max``, or ``max_pages * page_size``).
    causal: query i sees positions ``j <= L_b - Sq + i`` (bottom-right aligned).
    window: ``(left, right)``, flash-attn's ``window_size``: query i sees positions
      ``L_b - Sq + i - left <= j <= L_b - Sq + i + right``; -1 leaves a side unbounded.
    softcap: > 0 caps the scaled scores, ``s = softcap * tanh(s / softcap)`` (0: off).
    alibi_slopes: fp32 (H,) or (B, H): adds ``-slope * |L_b - Sq + i - j|`` after the cap.
    rotary_cos, rotary_sin: (seqlen_ro, rotary_dim / 2), both or neither, only with k_new:
      rotate the first rotary_dim features of q and k_new before anything else (the cache
      receives the rotated k_new). k_new token t sits at position ``cache_seqlens[b] + t``;
      query i at ``cache_seqlens[b] + i`` when causal or windowed, else every query at
      ``cache_seqlens[b]`` (flash-attn's positions; the cache's left padding does not shift
      them). ``rotary_interleaved`` True rotates pairs (2i, 2i + 1) (GPT-J), False pairs
      (i, i + rotary_dim / 2) (GPT-NeoX); every position must be < seqlen_ro.
    cache_batch_idx: int32 (B,): query row b uses cache row ``cache_batch_idx[b]`` (default
      b); rows must be distinct when appending (else which write lands is unspecified).
    cache_leftpad: int32 (B,): row b's first valid cache position, at most
      ``cache_seqlens[b]`` (left-padded caches; default 0).
    block_table: int32 (B, max_pages): a paged cache; row b's position j is slot
      ``j % page_size`` of page ``block_table[b, j // page_size]``. Entries past a row's
      last page are not read. Not with cache_batch_idx or cache_leftpad (as flash-attn).
    num_splits: an int >= 1 splits long caches across programs (flash-decoding); None
      chooses (the torch backend ignores it).

    The Triton kernel takes fp16/bf16 caches with a unit stride on D. On a contiguous cache
    the torch backend reads in place, with zero weight, the slots of a row outside its keys
    (its left padding, and up to the longest row's ``L_b``): they must hold finite numbers,
    as a zero-initialized cache does. Pages and cache rows are read through a copy whose
    free slots are zeroed first, so fresh pages may hold anything.
    Returns out (B, Sq, H, D) (and fp32 lse (B, H, Sq)); a row with no key gives zeros
    (and lse -inf).
    """
    if any_autocast() and autocast_applies(q):  # (the decorator's layer costs every call)
        return _kvcache_under_autocast(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            k_new,
            v_new,
            causal,
            softmax_scale,
            num_splits,
            return_lse,
            rotary_cos=rotary_cos,
            rotary_sin=rotary_sin,
            rotary_interleaved=rotary_interleaved,
            cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad,
            block_table=block_table,
            window=window,
            softcap=softcap,
            alibi_slopes=alibi_slopes,
        )
    if (
        k_new is not None
        and window is NO_WINDOW
        and return_lse is False
        and type(softcap) is float
        and softcap == 0.0
        and num_splits is None
        and rotary_cos is None
        and rotary_sin is None
        and cache_batch_idx is None
        and cache_leftpad is None
        and block_table is None
        and alibi_slopes is None
        and backend.forced_backend() in (None, "torch")
    ):
        # A generation step's usual call on the torch backend, here: CPU tensors, rows of
        # one length, new tokens appended, no option. _decode_step's checks, then
        # _torch_decode's no-mask case (the same calls, so the same bits) without the
        # layers between them, which cost as much again as the checks on a small step.
        # Any other call (None from the checks, or a mask needed) takes the general path,
        # nothing changed yet. _decode_step's body is inline (its call and result tuple cost
        # a tenth of the step's overhead); the signature's memo is shared (_step_shapes).
        step = (
            None
            if _is_compiling()
            else _step_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
        )
        if step is not None and (
            softmax_scale is None or (type(softmax_scale) is float and math.isfinite(softmax_scale))
        ):
            seqlen_q, n_new, grouped, small_q, capacity, scale = step
            low, high = remembered_range(cache_seqlens)  # (see _decode_step)
            most = high + n_new
            if (
                low == high
                and low >= 0
                and most <= capacity
                and most >= seqlen_q
                and not (causal and seqlen_q > 1)
            ):
                # An indexed write: the same copy as narrow().copy_(), in one call less.
                k_cache[:, low:most] = k_new
                v_cache[:, low:most] = v_new
                qt = q.transpose(1, 2)
                kt = k_cache.narrow(1, 0, most).transpose(1, 2)
                vt = v_cache.narrow(1, 0, most).transpose(1, 2)
                if softmax_scale is None and not grouped:
                    # SDPA's defaults (its scale is the same double): each argument passed
                    # costs its parser time.
                    out = F.scaled_dot_product_attention(qt, kt, vt)
                else:
                    out = F.scaled_dot_product_attention(
                        qt,
                        kt,
                        vt,
                        scale=scale if softmax_scale is None else softmax_scale,
                        enable_gqa=grouped,
                    )
                out = out.transpose(1, 2)
                # Every row sees a key: a NaN query row gives NaN (CPU tensors, not traced:
                # _nan_rows_lost's answer, inline; torch.equal: see _may_hold_nan).
                if most < NAN_SAFE_KEYS and (
                    not torch.equal(q, q) if small_q else _may_hold_nan(q)
                ):
                    out.masked_fill_(q.isnan().any(-1, keepdim=True), math.nan)
                return out
    scale, key_range = _check_kvcache(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new,
        v_new,
        softmax_scale,
        num_splits,
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
    )
    left, right = window_bounds(window)
    if rotary_cos is not None:
        windowed = causal or left is not None or right is not None
        q, k_new = _rotate(
            q, k_new, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens, windowed
        )

    def support():
        features = {
            "block_table": block_table is not None,
            "cache_batch_idx": cache_batch_idx is not None,
            "cache_leftpad": cache_leftpad is not None,
            "alibi_slopes": alibi_slopes is not None,
            "window": (left, right) != (None, None),
            "softcap": bool(softcap),
        }
        return _kvcache_support(q, k_cache, v_cache, features)

    name = backend.select("attention", q, support)
    window = (-1 if left is None else left, -1 if right is None else right)
    if name == "torch":
        # PyTorch ops throughout (torch.compile traces them): called directly, since the
        # custom op's dispatch alone costs as much as a small decode step on the CPU.
        out, lse = _torch_decode(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            k_new,
            v_new,
            block_table,
            cache_batch_idx,
            cache_leftpad,
            alibi_slopes,
            causal,
            scale,
            window,
            softcap,
            key_range,
            return_lse,
        )
    else:
        out, lse = attention_kvcache_op(
            q,
            k_cache,
            v_cache,
            cache_seqlens,
            k_new,
            v_new,
            block_table,
            cache_batch_idx,
            cache_leftpad,
            alibi_slopes,
            causal,
            scale,
            *window,
            float(softcap),
            num_splits,
            name,
        )
    return (out, lse) if return_lse else out


# Runs the public function again with autocast off for q's device (see
# fastlm.ops.attention.autocast_applies): the common call pays one query, not a layer.
_kvcache_under_autocast = autocast_policy(lower_precision=False)(attention_with_kvcache)


def _rotate(q, k_new, cos, sin, interleaved, cache_seqlens, windowed):
    """q and k_new rotated at flash-attn's positions (see :func:`attention_with_kvcache`)."""
    if windowed or q.shape[1] == 1:
        if q.shape[1] == k_new.shape[1]:
            return apply_rotary(q, k_new, cos, sin, interleaved, offset=cache_seqlens)
        q = _rotate_alone(q, cos, sin, interleaved, offset=cache_seqlens)
    else:  # every query at the position of the first new key
        ids = cache_seqlens[:, None].expand(-1, q.shape[1])
        q = _rotate_alone(q, cos, sin, interleaved, position_ids=ids)
    return q, _rotate_alone(k_new, cos, sin, interleaved, offset=cache_seqlens)


def _rotate_alone(x, cos, sin, interleaved, **positions):
    # apply_rotary rotates a (q, k) pair of equal length; a one-head view stands in for k.
    return apply_rotary(x, x[:, :, :1], cos, sin, interleaved, **positions)[0]


@functools.cache
def _decode_kernels():
    """``fastlm.kernels.attention_decode``, imported on first use (it imports Triton); its
    launcher is looked up per call, so a test may replace it."""
    import fastlm.kernels.attention_decode

    return fastlm.kernels.attention_decode


def _attention_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    block_table: Tensor | None,
    cache_batch_idx: Tensor | None,
    cache_leftpad: Tensor | None,
    alibi_slopes: Tensor | None,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    num_splits: int | None,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    # Only the kernels come here: the torch backend is called directly.
    return _decode_kernels().attention_decode(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        softmax_scale=scale,
        causal=causal,
        num_splits=num_splits,
        block_table=block_table,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        alibi_slopes=alibi_slopes,
        window=(window_left, window_right),
        softcap=softcap,
    )


_attention_kvcache_op = torch.library.custom_op(
    "fastlm::attention_kvcache", _attention_kvcache, mutates_args=("k_cache", "v_cache")
)
# In plain eager the kernel is called directly (it writes the caches in place either way);
# torch.compile and tensor subclasses see the custom op, which declares the writes.
attention_kvcache_op = EagerOp(_attention_kvcache_op, _attention_kvcache)


@_attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, *args):
    return torch.empty_like(q), q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32
    )


# ---------------------------------------------------------------------------------------------
# The torch backend.


def _torch_decode(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    block_table,
    cache_batch_idx,
    cache_leftpad,
    slopes,
    causal,
    scale,
    window,
    softcap,
    key_range,
    need_lse,
):
    """The torch backend of :func:`attention_with_kvcache`, batched: the appends are one
    indexed write per cache, the keys one view (or one gather of pages or rows) cut to the
    longest row (``key_range``: the fewest and most keys of a row), and attention one SDPA
    call over the whole batch with each row's visible keys as a boolean mask and GQA by
    ``enable_gqa`` (no repeated K/V). With a soft cap, ALiBi or the log-sum-exp asked for,
    the scores are formed in fp32 instead, by the reference's formula."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    n_new = 0 if k_new is None else k_new.shape[1]
    fewest, most = key_range
    # Rows of one known length in a plain cache (generation without padding): the append is
    # a slice copy, and unless a window or causal Sq > 1 cuts keys, SDPA needs no mask.
    uniform = (
        fewest == most and block_table is None and cache_batch_idx is None and cache_leftpad is None
    )
    ends = None if uniform else cache_seqlens.long() + n_new  # (B,) keys per row
    if n_new and uniform:  # narrow: the slice's view without parsing an index
        k_cache.narrow(1, most - n_new, n_new).copy_(k_new)
        v_cache.narrow(1, most - n_new, n_new).copy_(v_new)
    elif n_new:
        pos = ends[:, None] - n_new + torch.arange(n_new, device=q.device)  # (B, Sq_new)
        if block_table is not None:
            page_size = k_cache.shape[1]
            rows = block_table.long().gather(1, pos // page_size)
            pos = pos % page_size
        elif cache_batch_idx is not None:
            rows = cache_batch_idx.long()[:, None]
        else:
            rows = torch.arange(batch, device=q.device)[:, None]
        k_cache[rows, pos] = k_new
        v_cache[rows, pos] = v_new
    k, v = (_keys(cache, block_table, cache_batch_idx, most) for cache in (k_cache, v_cache))
    if block_table is not None or cache_batch_idx is not None:
        # The gathered copies may hold slots of pages or rows the contract leaves free
        # (fresh pages from a pool, never written): zeroed, so that garbage, NaN included,
        # gets no say when masked out. A contiguous cache is read in place (no copy).
        if ends is None:
            ends = cache_seqlens.long() + n_new
        j = torch.arange(k.shape[1], device=q.device)
        free = j >= ends[:, None]
        if cache_leftpad is not None:
            free |= j < cache_leftpad.long()[:, None]
        # Zeroed whole (contiguous), then cut to the longest row as a contiguous cache is.
        k, v = (_zero_rows(t, free)[:, :most] for t in (k, v))

    exact = need_lse or softcap or slopes is not None
    offset = None
    if (
        uniform
        and slopes is None
        and fewest >= seqlen_q
        and window == (-1, -1)
        and (seqlen_q == 1 or not causal)
    ):
        seen = None  # every query sees all keys
    else:
        if ends is None:
            ends = cache_seqlens.long() + n_new
        seen, offset = _visible(ends, cache_leftpad, seqlen_q, most, causal, window, slopes)
    if exact:
        compute = torch.promote_types(q.dtype, torch.float32)
        out, lse = _decode_scores(q, k, v, seen, offset, scale, softcap, slopes, compute, need_lse)
        if out.dtype is not q.dtype:
            out = out.to(q.dtype)
        return out, None if lse is None else lse.float()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=None if seen is None else seen[:, None],
        scale=scale,
        enable_gqa=n_heads != k.shape[2],
    ).transpose(1, 2)
    # A NaN query row gives NaN where it sees a key (PyTorch's fused CPU kernel has given it
    # zeros), and a row that sees no key zeros (SDPA's fused kernels may give NaN). Every
    # row sees a key when each has Sq or more and none is left-padded (causal row 0 sees
    # L_b - Sq + 1; a window keeps the diagonal's neighbour): then one fill suffices.
    # SDPA's output is ours to fill in place.
    if fewest < seqlen_q or cache_leftpad is not None:
        sees = seen.any(-1)[:, :, None, None]  # (B, Sq, 1, 1)
        out.masked_fill_(~sees, 0.0)
        if _may_hold_nan(q):
            out.masked_fill_(q.isnan().any(-1, keepdim=True) & sees, math.nan)
        return out, None
    if (seen is not None or _nan_rows_may_be_lost(q, most)) and _may_hold_nan(q):
        out.masked_fill_(q.isnan().any(-1, keepdim=True), math.nan)  # (B, Sq, H, 1)
    return out, None


def _zero_rows(t: Tensor, free: Tensor) -> Tensor:
    """``t`` (B, S, Hkv, D) with the positions where ``free`` (B, S) is True zeroed, in place.

    masked_fill_ with a mask broadcast over (Hkv, D) runs element by element on the CPU
    (5x a copy of ``t``); filling the listed rows writes only those. Listing them takes
    a nonzero (a device sync on GPUs, and data-dependent shapes torch.compile cannot
    trace), so traced and GPU calls keep the one-kernel masked fill.
    """
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return t.masked_fill_(free[:, :, None, None], 0.0)
    rows = t.view(-1, t.shape[2] * t.shape[3])  # a fresh gathered copy: contiguous
    return rows.index_fill_(0, free.flatten().nonzero().squeeze(1), 0.0).view(t.shape)


def _keys(cache, block_table, cache_batch_idx, key_bound):
    """(B, S, Hkv, D): every row's first S cache positions, S = key_bound (a view of a
    contiguous cache; a gather of the rows otherwise) or up to the end of the page holding
    position key_bound - 1 (a gather of pages)."""
    # index_select copies whole rows; advanced indexing gathers element by element on the
    # CPU, several times slower.
    if block_table is not None:
        page_size = cache.shape[1]
        pages = block_table[:, : -(-key_bound // page_size)]
        # Whole pages: up to page_size - 1 positions past the bound.
        return cache.index_select(0, pages.flatten()).view(pages.shape[0], -1, *cache.shape[2:])
    if cache_batch_idx is not None:
        return cache[:, :key_bound].index_select(0, cache_batch_idx)
    return cache.narrow(1, 0, key_bound)


def _visible(ends, leftpad, seqlen_q, seqlen_k, causal, window, slopes):
    """(B, Sq, S) bool: which positions each query sees, and (None, or with ALiBi) the
    (B, Sq, S) offsets ``L_b - Sq + i - j`` of key j left of query i's diagonal."""
    j = torch.arange(seqlen_k, device=ends.device)
    seen = (j < ends[:, None])[:, None, :]  # (B, 1, S)
    if leftpad is not None:
        seen = seen & (j >= leftpad.long()[:, None])[:, None, :]
    left, right = window
    if causal:  # no key right of the diagonal
        right = 0
    offset = None
    # With one query and no left bound, j < L_b already says everything.
    if slopes is not None or left >= 0 or (right >= 0 and seqlen_q > 1):
        i = torch.arange(seqlen_q, device=ends.device)
        offset = (ends - seqlen_q)[:, None, None] + i[None, :, None] - j  # (B, Sq, S)
        if right >= 0:
            seen = seen & (offset >= -right)
        if left >= 0:
            seen = seen & (offset <= left)
    return seen.expand(-1, seqlen_q, -1), offset


def _decode_scores(q, k, v, seen, offset, scale, softcap, slopes, compute, need_lse=True):
    """out (B, Sq, H, D) and lse (B, H, Sq; None unless ``need_lse``) from scores formed in
    ``compute`` (the reference's formula; the H / Hkv query heads of a KV head are one
    matmul's rows). ``seen`` None: every query sees every key."""
    batch, seqlen_q, n_heads, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[2], k.shape[1]
    grouped = n_heads != kv_heads
    rows = (batch, kv_heads, n_heads // kv_heads * seqlen_q, head_dim)
    # (Each call costs a microsecond or more on a small step: the conversions and views
    # that change nothing are skipped.)
    qf, kf, vf = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # kf, vf (B, Hkv, S, D)
    if q.dtype is not compute:
        qf, kf, vf = qf.to(compute), kf.to(compute), vf.to(compute)
    if grouped:
        qf = qf.reshape(rows)  # head h = kv * group + g
    scores = qf @ kf.transpose(-1, -2)
    if grouped:
        scores = scores.view(batch, n_heads, seqlen_q, seqlen_k)
    if scores.requires_grad:
        scores = scores * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
    else:  # the fresh scores, rewritten in place: no score-sized temporaries
        scores.mul_(scale)
        if softcap:
            scores.div_(softcap).tanh_().mul_(softcap)
    if slopes is not None:
        scores = scores - slopes.to(compute).reshape(-1, n_heads, 1, 1) * offset.abs()[:, None]
    if seen is not None:
        scores = scores.masked_fill(~seen[:, None], -math.inf)
    if need_lse:
        lse = torch.logsumexp(scores, -1)  # (B, H, Sq)
        probs = torch.exp(scores - lse[..., None]).masked_fill(lse[..., None] == -math.inf, 0.0)
    else:
        lse, probs = None, torch.softmax(scores, -1)
        if seen is not None:  # rows that see no key: zeros (softmax gives NaN)
            probs = probs.masked_fill(~seen.any(-1)[:, None, :, None], 0.0)
    if not grouped:
        return (probs @ vf).transpose(1, 2), lse
    out = probs.view(batch, kv_heads, rows[2], seqlen_k) @ vf  # rows[2]: -1 fails at S = 0
    return out.view(batch, n_heads, seqlen_q, head_dim).transpose(1, 2), lse


# ---------------------------------------------------------------------------------------------
# Checks: the contract every backend shares.


def _check_kvcache(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new,
    v_new,
    softmax_scale,
    num_splits,
    *,
    rotary_cos=None,
    rotary_sin=None,
    rotary_interleaved=True,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softcap=0.0,
    alibi_slopes=None,
) -> tuple[float, int]:
    """The contract of :func:`attention_with_kvcache`; returns the softmax scale and bounds
    (fewest, most) on the rows' key counts ``L_b``: their minimum and maximum when the
    lengths can be read, else (the new keys' count, the cache's capacity)."""
    if (
        k_new is not None
        and block_table is None
        and cache_batch_idx is None
        and cache_leftpad is None
        and rotary_cos is None
        and rotary_sin is None
        and alibi_slopes is None
        and num_splits is None
    ):
        step = _decode_step(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale)
        if step is not None:
            check_softcap(softcap)
            return step[:2]
    for name, t in (
        ()
        if _plain_tensors(q, k_cache, v_cache, k_new, v_new)
        else (
            ("q", q),
            ("k_cache", k_cache),
            ("v_cache", v_cache),
            ("k_new", k_new),
            ("v_new", v_new),
        )
    ):
        if t is None and name in ("k_new", "v_new"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    batch, seqlen_q, n_heads, head_dim = q.shape
    if seqlen_q < 1:
        raise ValueError("q must hold at least one query (Sq >= 1)")
    cache_shape = k_cache.shape
    if cache_shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if block_table is None and cache_batch_idx is None and cache_shape[0] != batch:
        raise ValueError(f"k_cache has batch {cache_shape[0]} but q has {batch}")
    _check_head_dim(head_dim, cache_shape[3], cache_shape[3])
    _check_heads(n_heads, cache_shape[2])
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    n_new = 0
    if k_new is not None:
        expected = (batch, k_new.shape[1], *cache_shape[2:])
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if t.shape != expected:
                raise ValueError(
                    f"{name} must be (batch, Sq_new, Hkv, head_dim) = {expected}, as the "
                    f"caches, got {tuple(t.shape)}"
                )
        n_new = k_new.shape[1]
    _check_rows("cache_seqlens", cache_seqlens, q)
    if cache_batch_idx is not None:
        _check_rows("cache_batch_idx", cache_batch_idx, q)
    if cache_leftpad is not None:
        _check_rows("cache_leftpad", cache_leftpad, q)
    if block_table is not None:
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:  # flash-attn refuses both combinations too
                raise ValueError(f"{name} cannot be combined with block_table (a paged cache)")
        if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be an int32 tensor, got {describe(block_table)}")
        if block_table.dim() != 2 or block_table.shape[0] != batch:
            raise ValueError(
                f"block_table must be (batch, max_pages) with batch {batch}, got shape "
                f"{tuple(block_table.shape)}"
            )
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}")
        capacity = block_table.shape[1] * cache_shape[1]
    else:
        capacity = cache_shape[1]
    rotary_dim = 0
    if rotary_cos is not None or rotary_sin is not None:
        rotary_dim = _check_rotary(rotary_cos, rotary_sin, rotary_interleaved, k_new, q)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, batch, n_heads, q)
    softcap = check_softcap(softcap)
    if num_splits is not None:
        check_int("num_splits", num_splits, 1)
    scale = _check_scale(softmax_scale, head_dim)

    # Only the lengths, on the CPU (a decode step's usual call): readable unless traced.
    only_lengths = cache_batch_idx is None and cache_leftpad is None and block_table is None
    if only_lengths and cache_seqlens.is_cpu:
        readable = not torch.compiler.is_compiling()
    else:
        readable = values_readable(cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    if not (batch and readable):
        # Unread lengths (a traced call): every row still has its n_new appended keys, so
        # with n_new >= Sq no row sees nothing and the torch backend skips that fill.
        return scale, (n_new if batch else 0, capacity)
    room = (block_table, cache_shape[1], capacity)
    # Every value check in one device-to-host copy: (min, max) pairs.
    if only_lengths and rotary_cos is None:
        lengths = cache_seqlens.tolist()  # cheaper than reducing on the device first
        return scale, _check_room(min(lengths), max(lengths), n_new, capacity, room)
    stats = [cache_seqlens]
    if cache_batch_idx is not None:
        stats.append(cache_batch_idx)
    if cache_leftpad is not None:
        stats += [cache_leftpad, cache_seqlens - cache_leftpad]
    if block_table is not None:  # only the pages the rows use
        used = -(-(cache_seqlens.long() + n_new) // k_cache.shape[1])
        in_use = torch.arange(block_table.shape[1], device=q.device) < used[:, None]
        stats.append(torch.where(in_use, block_table, 0))
    values = torch.stack(
        [
            torch.stack(torch.aminmax(t.long())) if t.numel() else t.new_zeros(2).long()
            for t in stats
        ]
    ).tolist()
    (low, high), rest = values[0], values[1:]
    key_range = _check_room(low, high, n_new, capacity, room)
    if cache_batch_idx is not None:
        (lo, hi), rest = rest[0], rest[1:]
        if lo < 0 or hi >= k_cache.shape[0]:
            raise ValueError(
                f"cache_batch_idx values must lie in [0, {k_cache.shape[0]}) (k_cache's "
                f"batch), got min {lo}, max {hi}"
            )
    if cache_leftpad is not None:
        (lo, _), (gap, _), rest = rest[0], rest[1], rest[2:]
        if lo < 0:
            raise ValueError(f"cache_leftpad must be >= 0, got {lo}")
        if gap < 0:
            raise ValueError(
                f"cache_leftpad must be <= cache_seqlens in every row; one row's is {-gap} past"
            )
    if block_table is not None:
        lo, hi = rest[0]
        if lo < 0 or hi >= k_cache.shape[0]:
            raise ValueError(
                f"block_table entries in use must lie in [0, num_pages = {k_cache.shape[0]}), "
                f"got min {lo}, max {hi}"
            )
    if rotary_dim:
        last = high + max(n_new, seqlen_q) - 1
        if last >= rotary_cos.shape[0]:
            raise ValueError(
                f"rotary_cos has {rotary_cos.shape[0]} positions but the new tokens reach "
                f"position {last} (cache_seqlens up to {high})"
            )
    return scale, key_range


def _check_room(low: int, high: int, n_new: int, capacity: int, room: tuple) -> tuple[int, int]:
    """Checks the cached lengths' range against ``capacity``; returns the range of the rows'
    key counts. ``room`` is (block_table or None, page or cache length, capacity): what the
    error describes (put into words only when it is raised)."""
    if low < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {low}")
    if high + n_new > capacity:
        block_table, size, capacity = room
        if block_table is None:
            where = f"the cache's {capacity} positions"
        else:
            where = f"block_table's {block_table.shape[1]} pages of {size} ({capacity} positions)"
        raise ValueError(
            f"no room: cache_seqlens up to {high} plus {n_new} new tokens exceed {where}"
        )
    return low + n_new, high + n_new


def _check_rows(name, t, q) -> None:
    batch = q.shape[0]
    if not isinstance(t, Tensor) or t.dtype is not torch.int32:
        raise TypeError(f"{name} must be an int32 tensor, got {describe(t)}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {tuple(t.shape)}")
    if not (t.is_cpu and q.is_cpu) and t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


# The signatures (shapes, dtypes, all on the CPU) of the tensors of decode steps that passed
# _decode_step's metadata checks (see fastlm.ops.attention._PASSED_QKV): the checks cost
# as much again as a small step's attention, and a generation loop repeats one signature.
# -> (Sq, Sq_new, grouped, q small enough to probe inline, capacity, default scale)
_PASSED_STEPS = signature_memo()
_INT32 = torch.int32


def _decode_step(q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale):
    """The contract's answer for a decode step's usual call (CPU tensors, an append, lengths
    only), read from the tensors' flags and shapes with as few calls as the checks allow:
    ``(scale, key_range, (Sq, Sq_new, grouped, small_q))`` when every check passes, None when one
    may fail (the full check then runs, and names the error). The metadata checks run once
    per signature; the scale and the lengths (values) every call."""
    if _is_compiling():
        return None
    shapes = _step_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    if shapes is None:
        return None
    seqlen_q, n_new, grouped, small_q, capacity, scale = shapes
    if softmax_scale is not None:
        if type(softmax_scale) is not float or not math.isfinite(softmax_scale):
            return None
        scale = softmax_scale
    # Read once per step: every layer of a decode step passes the same lengths tensor (and
    # on a GPU each read is a host sync); an in-place advance is seen by its version.
    low, high = remembered_range(cache_seqlens)
    if low < 0 or high + n_new > capacity:
        return None
    return scale, (low + n_new, high + n_new), (seqlen_q, n_new, grouped, small_q)


def _step_shapes(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> tuple | None:
    """What :data:`_PASSED_STEPS` keeps for this decode step's signature, its tensors checked
    and the answer kept on first sight; None when a metadata check may fail (the full check
    then runs, and names the error)."""
    try:
        qs, dtype = q.shape, q.dtype
        signature = (
            qs,
            k_cache.shape,
            k_new.shape,
            v_cache.shape,
            v_new.shape,
            cache_seqlens.shape,
            dtype,
            type(q),
            k_cache.dtype is dtype
            and v_cache.dtype is dtype
            and k_new.dtype is dtype
            and v_new.dtype is dtype
            and cache_seqlens.dtype is _INT32
            and q.is_cpu
            and k_cache.is_cpu
            and v_cache.is_cpu
            and k_new.is_cpu
            and v_new.is_cpu
            and cache_seqlens.is_cpu,
        )
    except AttributeError:  # not tensors
        return None
    shapes = _PASSED_STEPS.get(signature)
    if shapes is None:
        return _new_step(signature, q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    return shapes


def _new_step(signature, q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> tuple | None:
    """A decode step's signature not seen yet: what :data:`_PASSED_STEPS` keeps for it, and
    kept, when its tensors pass the metadata checks; else None (nothing kept)."""
    if not _step_metadata_passes(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
        return None
    qs, cs, ns = q.shape, k_cache.shape, k_new.shape
    small_q = type(q) is Tensor and q.numel() <= _EQUAL_PROBE  # probed inline for NaN
    shapes = (qs[1], ns[1], qs[2] != cs[2], small_q, cs[1], 1.0 / math.sqrt(qs[3]))
    remember(_PASSED_STEPS, signature, shapes)
    return shapes


def _step_metadata_passes(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> bool:
    """Whether a decode step's tensors pass the contract's metadata checks (CPU tensors of
    one floating-point dtype, shapes that agree, int32 lengths), read from their flags."""
    if not (
        isinstance(q, Tensor)
        and isinstance(k_cache, Tensor)
        and isinstance(v_cache, Tensor)
        and isinstance(k_new, Tensor)
        and isinstance(v_new, Tensor)
        and isinstance(cache_seqlens, Tensor)
        and q.is_cpu
        and k_cache.is_cpu
        and v_cache.is_cpu
        and k_new.is_cpu
        and v_new.is_cpu
        and cache_seqlens.is_cpu
        and cache_seqlens.dtype is torch.int32
    ):
        return False
    dtype = q.dtype
    if not (
        dtype.is_floating_point
        and k_cache.dtype is dtype
        and v_cache.dtype is dtype
        and k_new.dtype is dtype
        and v_new.dtype is dtype
    ):
        return False
    qs, cs, ns = q.shape, k_cache.shape, k_new.shape
    if len(qs) != 4 or len(cs) != 4 or len(ns) != 4 or v_cache.shape != cs or v_new.shape != ns:
        return False
    batch, seqlen_q, heads, head_dim = qs
    cache_batch, capacity, kv_heads, cache_dim = cs
    return (
        batch > 0
        and seqlen_q > 0
        and cache_batch == batch
        and cache_dim == head_dim
        and 1 <= head_dim <= MAX_HEAD_DIM
        and kv_heads > 0
        and heads % kv_heads == 0
        and ns[0] == batch
        and ns[2] == kv_heads
        and ns[3] == head_dim
        and cache_seqlens.shape == (batch,)
    )


def _plain_tensors(q, k_cache, v_cache, k_new, v_new) -> bool:
    """Whether the tensor arguments pass the contract's per-tensor checks, read from their
    flags (the common call; the loop that names an error runs otherwise): tensors, 4-D, of
    q's floating-point dtype and device, k_new and v_new both or neither."""
    if not (
        isinstance(q, Tensor)
        and isinstance(k_cache, Tensor)
        and isinstance(v_cache, Tensor)
        and q.is_floating_point()
        and k_cache.dtype is q.dtype
        and v_cache.dtype is q.dtype
        and q.dim() == 4
        and k_cache.dim() == 4
        and v_cache.dim() == 4
    ):
        return False
    cpu = q.is_cpu and k_cache.is_cpu and v_cache.is_cpu
    if not cpu and not q.device == k_cache.device == v_cache.device:
        return False
    if k_new is None and v_new is None:
        return True
    return (
        isinstance(k_new, Tensor)
        and isinstance(v_new, Tensor)
        and k_new.dtype is q.dtype
        and v_new.dtype is q.dtype
        and k_new.dim() == 4
        and v_new.dim() == 4
        and ((cpu and k_new.is_cpu and v_new.is_cpu) or k_new.device == q.device == v_new.device)
    )


def _check_rotary(cos, sin, interleaved, k_new, q) -> int:
    """flash-attn's rotary arguments; returns rotary_dim (0: none)."""
    if cos is None and sin is None:
        return 0
    if cos is None or sin is None:
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if k_new is None:
        raise ValueError("rotary_cos/rotary_sin rotate k_new: they need k_new and v_new")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if cos.dim() != 2 or cos.shape[1] < 1 or 2 * cos.shape[1] > q.shape[3]:
        raise ValueError(
            f"rotary_cos must be (seqlen_ro, rotary_dim / 2) with rotary_dim <= head_dim "
            f"{q.shape[3]}, got shape {tuple(cos.shape)}"
        )
    if sin.shape != cos.shape:
        raise ValueError(
            f"rotary_sin must have rotary_cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}"
        )
    if not isinstance(interleaved, bool):
        raise TypeError(f"rotary_interleaved must be a bool, got {type(interleaved).__name__}")
    return 2 * cos.shape[1]


# ---------------------------------------------------------------------------------------------
# Dispatch.


def _kvcache_support(q: Tensor, k_cache: Tensor, v_cache: Tensor, features: dict) -> dict:
    def triton_error():
        if q.dtype not in HALF_DTYPES:
            return f"the decode kernel takes fp16/bf16, got {q.dtype}"
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.stride(-1) != 1:
                return (
                    f"the decode kernel writes {name} in place and needs a unit stride on "
                    "its head_dim"
                )
        missing = [name for name, used in features.items() if used and name not in _KERNEL_TAKES]
        if missing:
            return f"the decode kernel does not take {', '.join(missing)}"
        return None

    return supports(triton_error)


# The keywords the Triton decode kernel serves (rotary is applied before it, by the op).
_KERNEL_TAKES = frozenset(
    ("block_table", "cache_batch_idx", "cache_leftpad", "alibi_slopes", "window", "softcap")
)
