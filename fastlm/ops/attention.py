"""Attention: the fp64 reference, ``flash_attention`` (dense and packed) and a drop-in
``scaled_dot_product_attention``, on the Triton kernels of ``kernels/attention.py`` (CUDA
tensors, or forced) or a torch backend (CPU tensors).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm import backend
from fastlm.ops.autocast import autocast_policy


def attention_probs(
    q: Tensor,
    k: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention probabilities, materialized: ``(probs (B, H, Sq, Sk), lse (B, H, Sq))``
    with the masking of :func:`attention_ref` (rows that see no key: probabilities 0, lse
    -inf)."""
    seqlen_q, n_heads, head_dim = q.shape[1:]
    seqlen_k, n_kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(n_heads // n_kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    diag = i + seqlen_k - seqlen_q
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    if attn_bias is not None:
        scores = scores + attn_bias
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.reshape(-1, n_heads, 1, 1) * (diag - j).abs()
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]).nan_to_num(0.0), lse


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    dropout_mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention computed the plain way, materializing every score. Returns ``(out, lse)``.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0. Query i sees key j when
    ``i + shift - left <= j <= i + shift + right`` with ``shift = Sk - Sq`` (bottom-right
    aligned; -1: unbounded side; ``causal`` sets right = 0). ``attn_bias`` broadcasts to
    (B, H, Sq, Sk); ALiBi adds ``-slope * |i + shift - j|`` with slopes (H,) or (B, H).
    ``dropout_mask`` (B, H, Sq, Sk), True = kept, scales kept probabilities by 1/(1 - p).
    Rows that see no key give out 0 and lse -inf. lse: (B, H, Sq).
    """
    probs, lse = attention_probs(q, k, causal, softmax_scale, window, attn_bias, alibi_slopes)
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


# ---------------------------------------------------------------------------------------------
# Public API.

_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


@autocast_policy(lower_precision=True)
def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    window: tuple[int, int] = (-1, -1),
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    seed: int | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over (batch, seqlen, heads, head_dim) tensors, as ``flash_attn_func``.

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA: K/V are never
            repeated in memory). fp16/bf16 on the Triton kernels (fp32/fp64 on the torch
            backend); D up to 256; any strides with a contiguous last dim.
        causal: query i sees keys j <= i + Sk - Sq (aligned bottom-right, as FlashAttention
            >= 2.1: with Sq > Sk the first Sq - Sk rows see nothing).
        softmax_scale: defaults to 1/sqrt(D).
        dropout_p: dropout on the attention probabilities; ``seed`` fixes the mask (the same
            seed gives the same mask, and backward regenerates it). ``seed=None`` draws one
            from torch's default generator.
        window: (left, right): query i sees keys ``i + Sk - Sq - left <= j <= i + Sk - Sq +
            right``; -1 leaves a side unbounded.
        attn_bias: additive bias broadcastable to (B, H, Sq, Sk), differentiable (its
            gradient is summed over the broadcast dims), e.g. T5's relative positions.
        alibi_slopes: fp32 (H,) or (B, H); adds ``-slope * |i + Sk - Sq - j|``.
        return_lse: also return the fp32 log-sum-exp of each row's scores, (B, H, Sq).

    Rows that see no key give zeros (and lse -inf), never NaN.
    """
    _check_qkv(q, k, v, packed=False)
    bias = _check_bias(attn_bias, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q)
    slopes = _check_alibi(alibi_slopes, q.shape[0], q.shape[2], q)
    out, lse = _attention(q, k, v, causal, softmax_scale, dropout_p, window, bias, slopes,
                          seed, None, None, q.shape[1], k.shape[1], return_lse)  # fmt: skip
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
    window: tuple[int, int] = (-1, -1),
    alibi_slopes: Tensor | None = None,
    seed: int | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`flash_attention` over packed variable-length sequences, as
    ``flash_attn_varlen_func``: q (total_q, H, D), k/v (total_k, Hkv, D); sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b + 1]`` (int32, B + 1 entries, starting at 0); masks align
    within each sequence. lse is (H, total_q)."""
    _check_qkv(q, k, v, packed=True)
    batch = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q, k, max_seqlen_q, max_seqlen_k)
    slopes = _check_alibi(alibi_slopes, batch, q.shape[1], q)
    out, lse = _attention(q, k, v, causal, softmax_scale, dropout_p, window, None, slopes,
                          seed, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          return_lse)  # fmt: skip
    return (out, lse) if return_lse else out


@autocast_policy(lower_precision=True)
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
    Rows with no allowed key give zeros. On CPU tensors this is PyTorch's own function."""
    name = backend.select("attention", query.device, _sdpa_support(query, key, value))
    if name == "torch":
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"query, key and value must be 4-D (batch, heads, seqlen, head_dim) on "
            f"the {name} backend, got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D"
        )
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise ValueError(f"key has {key.shape[1]} heads and query {query.shape[1]}: set "
                         "enable_gqa=True for grouped-query attention")  # fmt: skip
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views
    _check_qkv(q, k, v, packed=False)
    batch, seqlen_q, n_heads = q.shape[:3]
    seqlen_k = k.shape[1]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~attn_mask, float("-inf")
            )
        bias = _check_bias(attn_mask, batch, n_heads, seqlen_q, seqlen_k, q, name="attn_mask")
    # Top-left causal: j <= i, i.e. a window's right bound of -(Sk - Sq) at bottom-right.
    window = (None, seqlen_q - seqlen_k) if is_causal else (None, None)
    out, _ = _attention(q, k, v, False, scale, dropout_p, window, bias, None, None, None, None,
                        seqlen_q, seqlen_k, False, bounds=True)  # fmt: skip
    return out.transpose(1, 2)


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

    q: (B, Sq, H, D); k_cache, v_cache: (B, S_max, Hkv, D), H % Hkv == 0; cache_seqlens:
    int32 (B,) tokens already cached. ``k_new``/``v_new`` (B, Sq_new, Hkv, D) are written
    into the caches in place at ``cache_seqlens[b]:`` and attended to (apply rotary
    embeddings to them first: that hook is the caller's). Sequence b then has
    ``L_b = cache_seqlens[b] + Sq_new`` keys; causal query i sees keys ``j <= L_b - Sq + i``.
    ``num_splits`` splits long caches across programs (flash-decoding); None chooses.
    Returns out (B, Sq, H, D) (and fp32 lse (B, H, Sq)); a row with no key gives zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    name = backend.select("attention", q.device, _support(q))
    out, lse = torch.ops.fastlm.attention_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, num_splits, name
    )
    return (out, lse) if return_lse else out


@torch.library.custom_op("fastlm::attention_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_kvcache_op(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Tensor | None,
    v_new: Tensor | None, causal: bool, scale: float, num_splits: int | None,
    backend_name: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    if backend_name == "torch":
        return _torch_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale)
    from fastlm.kernels.attention_decode import attention_decode

    return attention_decode(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new,
                            softmax_scale=scale, causal=causal,
                            num_splits=num_splits)  # fmt: skip


@_attention_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale, num_splits,
      backend_name):  # fmt: skip
    return torch.empty_like(q), q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                                            dtype=torch.float32)  # fmt: skip


def _torch_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, causal, scale):
    """The torch backend of :func:`attention_with_kvcache`: append, then the reference per
    sequence (in fp32)."""
    lengths = cache_seqlens.tolist()
    n_new = 0 if k_new is None else k_new.shape[1]
    if any(n + n_new > k_cache.shape[1] for n in lengths):
        raise ValueError(f"cache_seqlens + {n_new} new tokens exceed the cache's "
                         f"{k_cache.shape[1]} slots")  # fmt: skip
    outs, lses = [], []
    for b, n in enumerate(lengths):
        if n_new:
            k_cache[b, n : n + n_new] = k_new[b]
            v_cache[b, n : n + n_new] = v_new[b]
        keys = slice(0, n + n_new)
        out, lse = attention_ref(q[b : b + 1].float(), k_cache[b : b + 1, keys].float(),
                                 v_cache[b : b + 1, keys].float(), causal,
                                 scale)  # fmt: skip
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


# ---------------------------------------------------------------------------------------------
# Checks.


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, packed: bool) -> None:
    dims = 3 if packed else 4
    layout = "(total, heads, head_dim)" if packed else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} is {t.dtype} but q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"head_dim must match: q {head_dim}, k {k.shape[-1]}, v {v.shape[-1]}")
    if head_dim > 256:
        raise ValueError(f"head_dim {head_dim} is over the supported 256")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")  # fmt: skip
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads "
                         f"({k.shape[-2]})")  # fmt: skip
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has {q.shape[0]}")


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
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {slopes.dtype}")
    if slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {q.device}")
    if tuple(slopes.shape) not in ((n_heads,), (batch, n_heads)):
        raise ValueError(f"alibi_slopes must be ({n_heads},) or ({batch}, {n_heads}), got "
                         f"{tuple(slopes.shape)}")  # fmt: skip
    return slopes.expand(batch, n_heads)


def _check_cu_seqlens(cu_q, cu_k, q, k, max_seqlen_q, max_seqlen_k) -> int:
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k,
                                                                   k.shape[0])):  # fmt: skip
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of batch + 1 offsets")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
        if not torch.compiler.is_compiling():
            first, last = cu[0].item(), cu[-1].item()
            if first != 0 or last != total:
                raise ValueError(f"{name} must run from 0 to the packed length {total}, got "
                                 f"{first}..{last}")  # fmt: skip
    if cu_q.numel() != cu_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    if max_seqlen_q < 1 or max_seqlen_k < 1:
        raise ValueError("max_seqlen_q and max_seqlen_k must be positive")
    return cu_q.numel() - 1


# ---------------------------------------------------------------------------------------------
# Dispatch, custom ops and autograd.


def _support(q: Tensor) -> dict:
    def triton_error():
        if q.dtype not in _KERNEL_DTYPES:
            return f"the attention kernels take fp16/bf16, got {q.dtype}"
        return None

    return {"triton": triton_error, "torch": lambda: None}


def _sdpa_support(query, key, value) -> dict:
    return _support(query)


def _attention(q, k, v, causal, softmax_scale, dropout_p, window, bias, slopes, seed, cu_q,
               cu_k, max_q, max_k, need_lse, bounds=False):  # fmt: skip
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    left, right = window if bounds else _window_bounds(window)
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    name = backend.select("attention", q.device, _support(q))
    if name == "torch":
        return _torch_attention(q, k, v, causal, scale, dropout_p, (left, right), bias, slopes,
                                seed or 0, cu_q, cu_k, need_lse)  # fmt: skip
    return torch.ops.fastlm.attention_fwd(
        _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), bias, slopes,
        cu_q, cu_k, max_q, max_k, causal, scale, left, right, float(dropout_p), seed or 0, name,
    )  # fmt: skip


def _window_bounds(window):
    if len(window) != 2 or not all(isinstance(w, int) for w in window):
        raise ValueError(f"window must be (left, right) ints, -1 for unbounded, got {window!r}")
    return tuple(None if w < 0 else w for w in window)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _kernel_args(causal, scale, left, right, dropout_p, seed):
    from fastlm.kernels.attention import AttentionArgs

    return AttentionArgs(causal, scale, (left, right), dropout_p, seed)


@torch.library.custom_op("fastlm::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, window_left: int | None,
    window_right: int | None, dropout_p: float, seed: int, backend_name: str,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    from fastlm.kernels.attention import attention_fwd

    args = _kernel_args(causal, scale, window_left, window_right, dropout_p, seed)
    return attention_fwd(q, k, v, args, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                         max_seqlen_q, max_seqlen_k)  # fmt: skip


@_attention_fwd_op.register_fake
def _(q, k, v, bias, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      causal, scale, window_left, window_right, dropout_p, seed, backend_name):  # fmt: skip
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("fastlm::attention_bwd", mutates_args=())
def _attention_bwd_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    bias: Tensor | None, bias_grad: bool, alibi_slopes: Tensor | None,
    cu_seqlens_q: Tensor | None, cu_seqlens_k: Tensor | None, max_seqlen_q: int,
    max_seqlen_k: int, causal: bool, scale: float, window_left: int | None,
    window_right: int | None, dropout_p: float, seed: int, backend_name: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(dq, dk, dv, dbias); dbias is the fp32 (B, H, Sq, Sk) score gradient or empty."""
    from fastlm.kernels.attention import attention_bwd

    args = _kernel_args(causal, scale, window_left, window_right, dropout_p, seed)
    dq, dk, dv, dbias = attention_bwd(
        _last_dim_contiguous(grad_out), q, k, v, out, lse, args, bias, bias_grad, alibi_slopes,
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    )  # fmt: skip
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32) if dbias is None else dbias


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, bias, bias_grad, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
      max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right, dropout_p, seed,
      backend_name):  # fmt: skip
    dbias = (bias.new_empty(bias.shape, dtype=torch.float32) if bias_grad else
             q.new_empty(0, dtype=torch.float32))  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias


def _attention_setup_context(ctx, inputs, output):
    q, k, v, bias, slopes, cu_q, cu_k, max_q, max_k, causal, scale, left, right, p, seed, name = (
        inputs
    )
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, slopes, cu_q, cu_k)
    ctx.options = (max_q, max_k, causal, scale, left, right, p, seed, name)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, bias, slopes, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, causal, scale, left, right, p, seed, name = ctx.options
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.fastlm.attention_bwd(
        grad_out, q, k, v, out, lse, bias, bias_grad, slopes, cu_q, cu_k, max_q, max_k,
        causal, scale, left, right, p, seed, name,
    )  # fmt: skip
    dbias = dbias.to(bias.dtype) if bias_grad else None
    return (dq, dk, dv, dbias, *([None] * 12))


torch.library.register_autograd("fastlm::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)  # fmt: skip


def _torch_attention(q, k, v, causal, scale, dropout_p, bounds, bias, slopes, seed, cu_q, cu_k,
                     need_lse):  # fmt: skip
    """The torch backend. PyTorch's SDPA with the masks as one additive mask, its dropout
    seeded by ``seed`` (reproducible, though not the Triton kernels' random stream); the
    reference formula in fp32 when the log-sum-exp is asked for. Packed sequences run one at
    a time."""
    if cu_q is not None:
        outs, lses = [], []
        for b in range(cu_q.numel() - 1):
            rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            o, lse = _torch_attention(q[None, rows], k[None, cols], v[None, cols], causal,
                                      scale, dropout_p, bounds, None,
                                      None if slopes is None else slopes[b : b + 1], seed + b,
                                      None, None, need_lse)  # fmt: skip
            outs.append(o[0])
            lses.append(None if lse is None else lse[0])
        return torch.cat(outs), torch.cat(lses, dim=-1) if need_lse else None
    if need_lse:
        # attention_ref speaks flash-attn's window convention (-1: unbounded).
        window = tuple(-1 if side is None else side for side in bounds)
        compute = torch.promote_types(q.dtype, torch.float32)
        mask = None
        if dropout_p > 0:
            gen = torch.Generator(device=q.device).manual_seed(seed)
            shape = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
            mask = torch.rand(shape, generator=gen, device=q.device) >= dropout_p
        out, lse = attention_ref(
            q.to(compute), k.to(compute), v.to(compute), causal, scale, window,
            None if bias is None else bias.to(compute), slopes, mask, dropout_p,
        )  # fmt: skip
        return out.to(q.dtype), lse.float()
    mask = _additive_mask(q, k, causal, bounds, bias, slopes)
    with torch.random.fork_rng(devices=[q.device] if q.device.type == "cuda" else []):
        if dropout_p > 0:
            torch.manual_seed(seed)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=dropout_p, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
        )  # fmt: skip
    return out.transpose(1, 2), None


def _additive_mask(q, k, causal, bounds, bias, slopes):
    """Window bounds (None: unbounded), causal, bias and ALiBi as one additive mask for SDPA
    (None when none apply)."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    i = torch.arange(seqlen_q, device=q.device)[:, None]
    j = torch.arange(seqlen_k, device=q.device)[None, :]
    diag = i + seqlen_k - seqlen_q
    left, right = bounds
    if causal:
        right = 0 if right is None else min(right, 0)
    mask = None
    if left is not None or right is not None:
        visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=q.device)
        if left is not None:
            visible &= j >= diag - left
        if right is not None:
            visible &= j <= diag + right
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device)
        mask = mask.masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = bias.float() if mask is None else mask + bias.float()
    if slopes is not None:
        alibi = -slopes.reshape(slopes.shape[0], -1, 1, 1) * (diag - j).abs()
        mask = alibi if mask is None else mask + alibi
    return None if mask is None else mask.to(q.dtype)


backend.register_op("attention", ("triton", "torch"))
