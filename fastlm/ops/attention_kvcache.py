"""Decode attention over KV caches, ``attention_with_kvcache`` (as ``flash_attn_with_kvcache``):
its contract, custom op and backends (the Triton decode kernel of
``kernels/attention_decode.py``, or torch).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm import backend
from fastlm.ops._common import HALF_DTYPES, supports
from fastlm.ops.attention import _check_head_dim, _check_heads, _check_scale, _reference
from fastlm.ops.autocast import autocast_policy
from fastlm.ops.contract import check_int, describe, values_readable


@autocast_policy(lower_precision=False)
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Decode attention: a few new queries against per-sequence KV caches, as
    ``flash_attn_with_kvcache``. Inference only (no autograd).

    q: (B, Sq, H, D), Sq >= 1, D from 1 to 256; k_cache, v_cache: (B, S_max, Hkv, D) in q's
    dtype, H % Hkv == 0; cache_seqlens: int32 (B,) tokens already cached, each in
    ``[0, S_max - Sq_new]``. ``k_new``/``v_new`` (B, Sq_new, Hkv, D), both or neither, are
    written into the caches in place at ``cache_seqlens[b]:`` and attended to (apply rotary
    embeddings to them first: that hook is the caller's). Sequence b then has
    ``L_b = cache_seqlens[b] + Sq_new`` keys; causal query i sees keys ``j <= L_b - Sq + i``.
    ``num_splits`` (an int >= 1) splits long caches across programs (flash-decoding); None
    chooses. The Triton kernel takes fp16/bf16 caches with a unit stride on D.
    Returns out (B, Sq, H, D) (and fp32 lse (B, H, Sq)); a row with no key gives zeros.
    """
    scale = _check_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, num_splits
    )
    name = backend.select("attention", q.device, _kvcache_support(q, k_cache, v_cache))
    out, lse = torch.ops.fastlm.attention_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, num_splits, name
    )
    return (out, lse) if return_lse else out


@torch.library.custom_op("fastlm::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kvcache_op(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    k_new: Tensor | None,
    v_new: Tensor | None,
    causal: bool,
    scale: float,
    num_splits: int | None,
    backend_name: str,
) -> tuple[Tensor, Tensor]:
    if backend_name == "torch":
        return _torch_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale)
    from fastlm.kernels.attention_decode import attention_decode

    return attention_decode(
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new=k_new,
        v_new=v_new,
        softmax_scale=scale,
        causal=causal,
        num_splits=num_splits,
    )


@_attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, num_splits, backend_name):
    return torch.empty_like(q), q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32
    )


def _torch_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale):
    """The torch backend of :func:`attention_with_kvcache`: append, then the reference per
    sequence (in fp32, or fp64 for fp64)."""
    compute = torch.promote_types(q.dtype, torch.float32)
    n_new = 0 if k_new is None else k_new.shape[1]
    outs, lses = (
        [q.new_empty((0, *q.shape[1:]))],
        [q.new_empty((0, q.shape[2], q.shape[1]), dtype=torch.float32)],
    )
    for b, n in enumerate(cache_seqlens.tolist()):
        if n_new:
            k_cache[b, n : n + n_new] = k_new[b]
            v_cache[b, n : n + n_new] = v_new[b]
        keys = slice(0, n + n_new)
        out, lse = _reference(
            q[b : b + 1].to(compute),
            k_cache[b : b + 1, keys].to(compute),
            v_cache[b : b + 1, keys].to(compute),
            causal=causal,
            scale=scale,
        )
        outs.append(out.to(q.dtype))
        lses.append(lse.float())
    return torch.cat(outs), torch.cat(lses)


# ---------------------------------------------------------------------------------------------
# Checks: the contract every backend shares.


def _check_kvcache(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, softmax_scale, num_splits
) -> float:
    """The contract of :func:`attention_with_kvcache`; returns the softmax scale."""
    for name, t in (
        ("q", q),
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("k_new", k_new),
        ("v_new", v_new),
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
    if k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.shape[0] != batch:
        raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {batch}")
    _check_head_dim(head_dim, k_cache.shape[3], v_cache.shape[3])
    _check_heads(n_heads, k_cache.shape[2])
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    n_new = 0
    if k_new is not None:
        expected = (batch, k_new.shape[1], *k_cache.shape[2:])
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if tuple(t.shape) != expected:
                raise ValueError(
                    f"{name} must be (batch, Sq_new, Hkv, head_dim) = {expected}, as the "
                    f"caches, got {tuple(t.shape)}"
                )
        n_new = k_new.shape[1]
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be an int32 tensor, got {describe(cache_seqlens)}")
    if tuple(cache_seqlens.shape) != (batch,):
        raise ValueError(
            f"cache_seqlens must have shape (batch,) = ({batch},), got {tuple(cache_seqlens.shape)}"
        )
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}")
    if batch and values_readable(cache_seqlens):
        low, high = torch.stack(torch.aminmax(cache_seqlens)).tolist()  # one device sync
        if low < 0:
            raise ValueError(f"cache_seqlens must be >= 0, got {low}")
        if high + n_new > k_cache.shape[1]:
            raise ValueError(
                f"no room: cache_seqlens up to {high} plus {n_new} new tokens "
                f"exceed the cache's {k_cache.shape[1]} positions"
            )
    if num_splits is not None:
        check_int("num_splits", num_splits, 1)
    return _check_scale(softmax_scale, head_dim)


# ---------------------------------------------------------------------------------------------
# Dispatch.


def _kvcache_support(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> dict:
    def triton_error():
        if q.dtype not in HALF_DTYPES:
            return f"the decode kernel takes fp16/bf16, got {q.dtype}"
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if cache.stride(-1) != 1:
                return (
                    f"the decode kernel writes {name} in place and needs a unit stride on "
                    "its head_dim"
                )
        return None

    return supports(triton_error)
