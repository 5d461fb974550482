"""One contract per op (DESIGN.md, "Backends"): every backend accepts and refuses the same
inputs, and answers the same.

:data:`CASES` is one table of good and bad inputs for every public op. Each case runs on
every backend available here (``torch``; ``triton`` forced on CPU tensors, i.e. Triton's
interpreter; on a GPU, also CUDA tensors with ``cuda`` where the extension is built) and
must give the same outcome class everywhere:

- ``ok``: the same output shapes and dtypes, NaN at the same places as the float64
  reference, and values within the numerical policy (:func:`fastlm.testing.assert_policy`,
  with PyTorch's formula at the inputs' dtype as the baseline);
- ``ValueError`` / ``TypeError``: the same type and message on every backend, naming the
  argument;
- ``BackendUnavailable``: a backend's own limit, allowed only where the case says so.

Meta-tensor cases return meta outputs shaped and typed as the same call on CPU tensors.
Every op in :func:`fastlm.backend.registered_ops` must have rows here.

``python tests/ops/test_conformance.py`` prints the table (op x case x backend -> outcome).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fastlm
from fastlm import backend, ops
from fastlm.backend import BackendUnavailable
from fastlm.ops.lora import lora_linear, lora_linear_ref
from fastlm.ops.quant import quantize_rows_ref
from fastlm.ops.quant_formats import QuantizedWeight, quantize_weight
from fastlm.testing import assert_policy

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
NAN = math.nan
OK = "ok"


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: ``fn(*args, **kwargs)`` with the inputs ``make()`` builds (on the CPU; moved
    to the device under test). ``expect`` is ``OK`` or ``(ValueError or TypeError, word)``
    with ``word`` in the message. ``unavailable`` maps a backend to a word of its
    BackendUnavailable message where that backend's own limit refuses the inputs. ``ref``
    computes the answer from the inputs (run in float64, and at the inputs' dtype for the
    baseline); None compares shapes and dtypes only (random dropout masks differ by
    backend). ``collect`` picks the tensors to compare from the result and the inputs
    (in-place ops). ``floor_scale`` gives the size at which the policy's one-ulp floor is
    taken, from the inputs and the float64 reference, where rounding in a correct
    computation can reach beyond one ulp of the result (None: the reference's largest
    element)."""

    op: str
    name: str
    fn: Callable
    make: Callable[[], tuple[tuple, dict]]
    expect: Any = OK
    ref: Callable | None = None
    unavailable: dict[str, str] = dataclasses.field(default_factory=dict)
    collect: Callable[[Any, tuple, dict], tuple[Tensor, ...]] | None = None
    meta: bool = False
    floor_scale: Callable[[tuple, dict, Tensor], float] | None = None

    @property
    def id(self) -> str:
        return f"{self.fn.__name__}/{self.name}"


def rand(*shape, dtype=BF16, nan_at=None):
    t = torch.randn(*shape).to(dtype)
    if nan_at is not None:
        t[nan_at] = NAN
    return t


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# References (the plain formulas; each case's inputs cast to float64, or to the baseline's
# dtype).


def ref_flash(
    q,
    k,
    v,
    causal=False,
    softmax_scale=None,
    window=(-1, -1),
    attn_bias=None,
    alibi_slopes=None,
    return_lse=False,
    softcap=0.0,
    return_attn_probs=False,
    **_,
):
    masks = (causal, softmax_scale, window, attn_bias, alibi_slopes)
    out, lse = ops.attention_ref(q, k, v, *masks, softcap=softcap)
    if return_attn_probs:  # no dropout: S_dmask is the probabilities
        return out, lse, ops.attention_probs(q, k, *masks, softcap=softcap)[0]
    return (out, lse) if return_lse else (out,)


def ref_varlen(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    causal=False,
    softmax_scale=None,
    window=(-1, -1),
    alibi_slopes=None,
    softcap=0.0,
    return_attn_probs=False,
    block_table=None,
    **_,
):
    if block_table is not None:  # paged: key j of sequence b at page table[b, j // P], j % P
        page = k.shape[1]
        rows = [
            (int(block_table[b, j // page]), j % page)
            for b in range(cu_k.numel() - 1)
            for j in range(int(cu_k[b + 1] - cu_k[b]))
        ]
        k, v = (torch.stack([t[p, i] for p, i in rows]) for t in (k, v))
    outs, lses = [q.new_zeros(0, *q.shape[1:])], [q.new_zeros(q.shape[1], 0)]
    probs = q.new_zeros(cu_q.numel() - 1, q.shape[1], max_q, max_k)
    for b in range(cu_q.numel() - 1):
        rows, cols = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        slopes = None if alibi_slopes is None else alibi_slopes.expand(cu_q.numel() - 1, -1)[b]
        seq = (q[None, rows], k[None, cols])
        masks = (causal, softmax_scale, window, None, slopes)
        out, lse = ops.attention_ref(*seq, v[None, cols], *masks, softcap=softcap)
        outs.append(out[0])
        lses.append(lse[0])
        p = ops.attention_probs(*seq, *masks, softcap=softcap)[0][0]
        probs[b, :, : p.shape[1], : p.shape[2]] = p
    if return_attn_probs:
        return torch.cat(outs), torch.cat(lses, dim=-1), probs
    return (torch.cat(outs),)


def ref_sdpa(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, **_):
    unbatched = query.dim() == 3
    if unbatched:
        query, key, value = (t[None] for t in (query, key, value))
        attn_mask = None if attn_mask is None or attn_mask.dim() < 4 else attn_mask[None]
    sq, sk = query.shape[-2], key.shape[-2]
    bias = torch.zeros(sq, sk, dtype=query.dtype)
    if is_causal:  # top-left
        bias = bias.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), -math.inf)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = bias.masked_fill(~attn_mask, -math.inf)
    elif attn_mask is not None:
        bias = bias + attn_mask
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    k, v = (t.expand(q.shape[0], *t.shape[1:]) for t in (k, v))
    out, _ = ops.attention_ref(q, k, v, softmax_scale=scale, attn_bias=bias)
    out = out.transpose(1, 2)
    return (out[0] if unbatched else out,)


def ref_kvcache(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new=None,
    v_new=None,
    causal=False,
    softmax_scale=None,
    block_table=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    alibi_slopes=None,
    window=(-1, -1),
    softcap=0.0,
    **_,
):
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    n_new = 0 if k_new is None else k_new.shape[1]
    outs = [q.new_zeros(0, *q.shape[1:])]
    for b, n in enumerate(cache_seqlens.tolist()):
        # Row b's cache positions (S, Hkv, D): its pages in order, or its cache row (a view).
        if block_table is not None:
            pages = block_table[b].long()
            kb, vb = (c[pages].flatten(0, 1) for c in (k_cache, v_cache))
        else:
            row = b if cache_batch_idx is None else int(cache_batch_idx[b])
            kb, vb = k_cache[row], v_cache[row]
        if n_new:
            kb[n : n + n_new], vb[n : n + n_new] = k_new[b], v_new[b]
        if block_table is not None:
            k_cache[pages], v_cache[pages] = (t.view(-1, *k_cache.shape[1:]) for t in (kb, vb))
        keys = slice(0 if cache_leftpad is None else int(cache_leftpad[b]), n + n_new)
        slopes = alibi_slopes
        if slopes is not None and slopes.dim() == 2:
            slopes = slopes[b]
        out, _ = ops.attention_ref(
            q[b : b + 1],
            kb[None, keys],
            vb[None, keys],
            causal,
            softmax_scale,
            window=window,
            alibi_slopes=slopes,
            softcap=softcap,
        )
        outs.append(out)
    return torch.cat(outs), k_cache, v_cache


def collect_kvcache(result, args, kwargs):
    return result, args[1], args[2]


def ref_rotary(q, k, cos, sin, interleaved=False, position_ids=None, offset=0, **_):
    return tuple(
        ops.apply_rotary_ref(t, cos, sin, interleaved, position_ids, offset) for t in (q, k)
    )


def ref_fused_mlp(x, w1, b1, w2, b2, activation="gelu", **_):
    return (F.linear(ops.linear_act_ref(x, w1, b1, activation), w2, b2),)


def ref_gated_mlp(x, wg, wu, wd, activation="silu", gate_bias=None, up_bias=None, down_bias=None):
    return (
        F.linear(ops.gated_linear_ref(x, wg, wu, activation, gate_bias, up_bias), wd, down_bias),
    )


def ref_linear_ce(
    hidden,
    weight,
    target,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    z_loss=0.0,
    ce_weight=None,
    softcap=None,
    return_z_loss=False,
    **_,
):
    logits = F.linear(hidden, weight, bias)
    out = ops.cross_entropy_ref(
        logits,
        target,
        ignore_index,
        label_smoothing,
        reduction,
        z_loss,
        ce_weight,
        softcap,
        return_z_loss=return_z_loss,
    )
    return (out.loss, out.z_loss) if return_z_loss else (out,)


def collect_ce_extras(result, args, kwargs):
    """The tensors of a CrossEntropyOutput (the fields asked for)."""
    return tuple(t for t in result if t is not None)


def ref_ce_extras(*args, **kwargs):
    return collect_ce_extras(ops.cross_entropy_ref(*args, **kwargs), args, kwargs)


def ref_w8a8(x, qw, bias=None):
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = quantize_rows_ref(x2)
    y = (xq.double() @ qw.qweight.double().T) * xs.double()[:, None] * qw.scales.double()
    y = y if bias is None else y + bias.double()
    return (y.to(x.dtype).view(*x.shape[:-1], qw.shape[0]),)


# ---------------------------------------------------------------------------------------------
# The table.


def qkv(b=2, sq=5, sk=7, h=4, hkv=2, d=24, dtype=BF16, nan_at=None):
    return (
        rand(b, sq, h, d, dtype=dtype, nan_at=nan_at),
        rand(b, sk, hkv, d, dtype=dtype),
        rand(b, sk, hkv, d, dtype=dtype),
    )


def flash_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case("attention", name, ops.flash_attention, make, expect, ref_flash, **kw)

    return [
        case("odd shapes, causal, GQA", lambda: (qkv(), dict(causal=True))),
        case("length 1", lambda: (qkv(1, 1, 1, 2, 1, 16), {})),
        case("empty batch", lambda: (qkv(0), {})),
        case("sq > sk, causal, lse", lambda: (qkv(sq=9, sk=4), dict(causal=True, return_lse=True))),
        case(
            "window, bias, alibi",
            lambda: (
                qkv(),
                dict(window=(2, 1), attn_bias=rand(1, 4, 5, 7), alibi_slopes=torch.rand(4)),
            ),
        ),
        case("NaN query", lambda: (qkv(nan_at=(1, 2, 3, 5)), {})),
        case(
            "NaN query, row sees no key",
            lambda: (qkv(sq=9, sk=4, nan_at=(0, 1, 0, 0)), dict(causal=True)),
        ),
        case("fp32", lambda: (qkv(dtype=F32), {}), unavailable={"triton": "fp16/bf16"}),
        case("meta", lambda: (qkv(), dict(causal=True)), meta=True),
        case("int64 q", lambda: (tuple(t.long() for t in qkv()), {}), (TypeError, "q")),
        case("k dtype", lambda: ((lambda q, k, v: (q, k.half(), v))(*qkv()), {}), (TypeError, "k")),
        case("head_dim 0", lambda: (qkv(d=0), {}), (ValueError, "head_dim")),
        case("head_dim 264", lambda: (qkv(d=264), {}), (ValueError, "head_dim")),
        case(
            "head_dim mismatch",
            lambda: ((lambda q, k, v: (q, k[..., :16], v[..., :16]))(*qkv()), {}),
            (ValueError, "head_dim"),
        ),
        case("heads not a multiple", lambda: (qkv(h=3), {}), (ValueError, "heads")),
        case(
            "batch mismatch",
            lambda: ((lambda q, k, v: (q[:1], k, v))(*qkv()), {}),
            (ValueError, "batch"),
        ),
        case(
            "softmax_scale nan",
            lambda: (qkv(), dict(softmax_scale=NAN)),
            (ValueError, "softmax_scale"),
        ),
        case(
            "softmax_scale inf",
            lambda: (qkv(), dict(softmax_scale=math.inf)),
            (ValueError, "softmax_scale"),
        ),
        case("dropout_p 1", lambda: (qkv(), dict(dropout_p=1.0)), (ValueError, "dropout_p")),
        case("window of floats", lambda: (qkv(), dict(window=(1.5, 0))), (ValueError, "window")),
        case(
            "attn_bias shape",
            lambda: (qkv(), dict(attn_bias=rand(3, 4, 5, 7))),
            (ValueError, "attn_bias"),
        ),
        case(
            "alibi_slopes bf16",
            lambda: (qkv(), dict(alibi_slopes=rand(4))),
            (TypeError, "alibi_slopes"),
        ),
        case(
            "v on another device",
            lambda: ((lambda q, k, v: (q, k, v.to("meta")))(*qkv()), {}),
            (ValueError, "v"),
        ),
        case("softcap, causal, GQA", lambda: (qkv(), dict(causal=True, softcap=1.0))),
        case(
            "softcap, window, bias, alibi, lse",
            lambda: (
                qkv(),
                dict(
                    softcap=2.0,
                    window=(2, 1),
                    attn_bias=rand(1, 4, 5, 7),
                    alibi_slopes=torch.rand(4),
                    return_lse=True,
                ),
            ),
        ),
        case("softcap, NaN query", lambda: (qkv(nan_at=(1, 2, 3, 5)), dict(softcap=1.0))),
        case("softcap, meta", lambda: (qkv(), dict(causal=True, softcap=3.0)), meta=True),
        case(
            "return_attn_probs, sq > sk, causal",
            lambda: (qkv(sq=9, sk=4), dict(causal=True, return_attn_probs=True)),
        ),
        case(
            "return_attn_probs, softcap, bias",
            lambda: (qkv(), dict(softcap=1.5, attn_bias=rand(2, 1, 5, 7), return_attn_probs=True)),
        ),
        case("softcap negative", lambda: (qkv(), dict(softcap=-1.0)), (ValueError, "softcap")),
        case("softcap nan", lambda: (qkv(), dict(softcap=NAN)), (ValueError, "softcap")),
        case("softcap inf", lambda: (qkv(), dict(softcap=math.inf)), (ValueError, "softcap")),
        case(
            "softcap tensor",
            lambda: (qkv(), dict(softcap=torch.tensor(2.0))),
            (TypeError, "softcap"),
        ),
        case(
            "return_attn_probs not a bool",
            lambda: (qkv(), dict(return_attn_probs=1)),
            (TypeError, "return_attn_probs"),
        ),
    ]


def packed(lengths_q, lengths_k, h=4, hkv=2, d=16, dtype=BF16, nan_at=None):
    cu_q = i32(0, *torch.tensor(lengths_q).cumsum(0).tolist())
    cu_k = i32(0, *torch.tensor(lengths_k).cumsum(0).tolist())
    q = rand(int(cu_q[-1]), h, d, dtype=dtype, nan_at=nan_at)
    k, v = rand(int(cu_k[-1]), hkv, d, dtype=dtype), rand(int(cu_k[-1]), hkv, d, dtype=dtype)
    return q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k)


def paged_kv(page_size=3, num_pages=6):
    """Packed queries of lengths 3, 0, 5 against 4, 2, 6 keys in pages of 3."""
    q, _, _, cu_q, cu_k, max_q, max_k = packed([3, 0, 5], [4, 2, 6])
    k, v = (rand(num_pages, page_size, 2, 16) for _ in "kv")
    return q, k, v, cu_q, cu_k, max_q, max_k


def varlen_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case("attention", name, ops.flash_attention_varlen, make, expect, ref_varlen, **kw)

    def with_args(edit, **kwargs):
        def make():
            args = list(packed([3, 0, 5], [4, 2, 6]))
            edit(args)
            return tuple(args), kwargs

        return make

    def nothing(args):
        return None

    def set_arg(i, value):
        return lambda args: args.__setitem__(i, value)

    return [
        case("3 sequences, one empty, causal", with_args(nothing, causal=True)),
        case("alibi, window", with_args(nothing, alibi_slopes=torch.rand(4), window=(1, 2))),
        case("NaN query", lambda: (packed([3, 4], [4, 2], nan_at=(4, 1, 0)), {})),
        case("meta", with_args(nothing), meta=True),
        case(
            "decreasing cu_seqlens_q",
            with_args(set_arg(3, i32(0, 4, 2, 8))),
            (ValueError, "non-decreasing"),
        ),
        case(
            "cu_seqlens_k short of total",
            with_args(set_arg(4, i32(0, 4, 6, 11))),
            (ValueError, "cu_seqlens_k"),
        ),
        case("max_seqlen_q too small", with_args(set_arg(5, 4)), (ValueError, "max_seqlen_q")),
        case("max_seqlen_k float", with_args(set_arg(6, 6.0)), (TypeError, "max_seqlen_k")),
        case(
            "cu_seqlens_q int64",
            with_args(lambda a: a.__setitem__(3, a[3].long())),
            (TypeError, "cu_seqlens_q"),
        ),
        case(
            "cu_seqlens_k on meta",
            with_args(lambda a: a.__setitem__(4, a[4].to("meta"))),
            (ValueError, "cu_seqlens_k"),
        ),
        case(
            "softmax_scale nan",
            with_args(nothing, softmax_scale=NAN),
            (ValueError, "softmax_scale"),
        ),
        case("softcap, causal", with_args(nothing, causal=True, softcap=1.0)),
        case(
            "paged K/V, causal, softcap",
            lambda: (
                paged_kv(),
                dict(causal=True, softcap=2.0, block_table=i32(3, 0, 5, 1, 4, 2).view(3, 2)),
            ),
        ),
        case(
            "paged, block_table int64",
            lambda: (paged_kv(), dict(block_table=torch.zeros(3, 2, dtype=torch.long))),
            (TypeError, "block_table"),
        ),
        case(
            "paged, page out of range",
            lambda: (paged_kv(), dict(block_table=i32(3, 0, 5, 1, 4, 6).view(3, 2))),
            (ValueError, "block_table[2, 1] = 6"),
        ),
        case(
            "return_attn_probs, softcap, alibi",
            with_args(nothing, softcap=2.0, alibi_slopes=torch.rand(4), return_attn_probs=True),
        ),
        case("softcap negative", with_args(nothing, softcap=-0.5), (ValueError, "softcap")),
        case("softcap nan", with_args(nothing, softcap=NAN), (ValueError, "softcap")),
        case(
            "softcap tensor",
            with_args(nothing, softcap=torch.tensor(2.0)),
            (TypeError, "softcap"),
        ),
    ]


def bhsd(b=2, h=4, hkv=4, sq=5, sk=7, d=16, dtype=BF16, nan_at=None):
    return (
        rand(b, h, sq, d, dtype=dtype, nan_at=nan_at),
        rand(b, hkv, sk, d, dtype=dtype),
        rand(b, hkv, sk, d, dtype=dtype),
    )


def sdpa_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case(
            "attention", name, ops.scaled_dot_product_attention, make, expect, ref_sdpa, **kw
        )

    def bool_mask():
        mask = torch.rand(2, 1, 5, 7) > 0.4
        mask[..., 0] = True
        return mask

    return [
        case("bool mask", lambda: (bhsd(), dict(attn_mask=bool_mask()))),
        case("float mask, GQA", lambda: (bhsd(hkv=2), dict(attn_mask=rand(5, 7), enable_gqa=True))),
        case("is_causal sq < sk", lambda: (bhsd(), dict(is_causal=True))),
        case("is_causal sq > sk", lambda: (bhsd(sq=7, sk=3), dict(is_causal=True))),
        case("key batch broadcast", lambda: ((lambda q, k, v: (q, k[:1], v[:1]))(*bhsd()), {})),
        case("empty batch", lambda: (bhsd(b=0), {})),
        case("NaN query", lambda: (bhsd(nan_at=(0, 1, 2, 3)), dict(is_causal=True))),
        case(
            "3-D",
            lambda: ((lambda q, k, v: (q[0], k[0], v[0]))(*bhsd()), {}),
            unavailable={"triton": "4-D"},
        ),
        case(
            "value head_dim 8",
            lambda: ((lambda q, k, v: (q, k, v[..., :8]))(*bhsd()), {}),
            unavailable={"triton": "head_dim"},
        ),
        case("meta", lambda: (bhsd(), dict(is_causal=True)), meta=True),
        case("scale nan", lambda: (bhsd(), dict(scale=NAN)), (ValueError, "scale")),
        case(
            "mask and is_causal",
            lambda: (bhsd(), dict(attn_mask=bool_mask(), is_causal=True)),
            (ValueError, "is_causal"),
        ),
        case("mask shape", lambda: (bhsd(), dict(attn_mask=rand(5, 6))), (ValueError, "attn_mask")),
        case("heads without enable_gqa", lambda: (bhsd(hkv=2), {}), (ValueError, "enable_gqa")),
        case(
            "head_dim mismatch",
            lambda: ((lambda q, k, v: (q, k[..., :8], v))(*bhsd()), {}),
            (ValueError, "head_dim"),
        ),
        case("head_dim 0", lambda: (bhsd(d=0), {}), (ValueError, "head_dim")),
        case(
            "value dtype",
            lambda: ((lambda q, k, v: (q, k, v.half()))(*bhsd()), {}),
            (TypeError, "value"),
        ),
        case("int32 query", lambda: (tuple(t.int() for t in bhsd()), {}), (TypeError, "query")),
    ]


def decode(b=2, sq=1, h=4, hkv=2, d=16, s_max=9, lengths=(3, 6), n_new=2, dtype=BF16, nan_at=None):
    q = rand(b, sq, h, d, dtype=dtype, nan_at=nan_at)
    caches = [rand(b, s_max, hkv, d, dtype=dtype) for _ in "kv"]
    new = [rand(b, n_new, hkv, d, dtype=dtype) for _ in "kv"] if n_new else [None, None]
    return (q, *caches, i32(*lengths), *new)


def kvcache_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case(
            "attention",
            name,
            ops.attention_with_kvcache,
            make,
            expect,
            ref_kvcache,
            collect=collect_kvcache,
            **kw,
        )

    def edit(fn, **kwargs):
        def make():
            args = list(decode())
            fn(args)
            return tuple(args), kwargs

        return make

    def put(i, value):
        return lambda args: args.__setitem__(i, value)

    return [
        case("append, causal, sq 2", lambda: (decode(sq=2), dict(causal=True))),
        case("no new keys", lambda: (decode(n_new=0), {})),
        case("an empty sequence", lambda: (decode(lengths=(0, 5), n_new=0), {})),
        case("cache full after append", lambda: (decode(lengths=(7, 2)), {})),
        case("empty batch", lambda: (decode(b=0, lengths=()), {})),
        case("NaN query", lambda: (decode(nan_at=(1, 0, 2, 3)), {})),
        case("fp32", lambda: (decode(dtype=F32), {}), unavailable={"triton": "fp16/bf16"}),
        case("meta", lambda: (decode(), dict(causal=True)), meta=True),
        case("negative cache_seqlens", edit(put(3, i32(-2, 5))), (ValueError, "cache_seqlens")),
        case("no room for k_new", edit(put(3, i32(3, 8))), (ValueError, "no room")),
        case("cache_seqlens batch 1", edit(put(3, i32(3))), (ValueError, "cache_seqlens")),
        case(
            "cache_seqlens int64",
            edit(lambda a: a.__setitem__(3, a[3].long())),
            (TypeError, "cache_seqlens"),
        ),
        case(
            "cache_seqlens on meta",
            edit(lambda a: a.__setitem__(3, a[3].to("meta"))),
            (ValueError, "cache_seqlens"),
        ),
        case("q batch 3", edit(put(0, rand(3, 1, 4, 16))), (ValueError, "batch")),
        case(
            "int64 tensors",
            edit(lambda a: a.__setitem__(slice(0, 3), [t.long() for t in a[:3]])),
            (TypeError, "q"),
        ),
        case("k_new without v_new", edit(put(5, None)), (ValueError, "k_new and v_new")),
        case("k_new heads", edit(put(4, rand(2, 2, 1, 16))), (ValueError, "k_new")),
        case("head_dim mismatch", edit(put(0, rand(2, 1, 4, 8))), (ValueError, "head_dim")),
        case("heads not a multiple", edit(put(0, rand(2, 1, 3, 16))), (ValueError, "heads")),
        case(
            "v_cache dtype", edit(lambda a: a.__setitem__(2, a[2].half())), (TypeError, "v_cache")
        ),
        case(
            "softmax_scale nan",
            edit(lambda a: None, softmax_scale=NAN),
            (ValueError, "softmax_scale"),
        ),
        case("num_splits 0", edit(lambda a: None, num_splits=0), (ValueError, "num_splits")),
        case("no query", edit(put(0, rand(2, 0, 4, 16))), (ValueError, "Sq >= 1")),
        # flash-attn's keywords (rotary: tests/ops/test_attention_kvcache.py).
        case("paged", lambda: (paged(), dict(causal=True, block_table=i32(3, 0, 1, 4).view(2, 2)))),
        case("softcap", lambda: (decode(sq=2), dict(causal=True, softcap=0.5))),
        case(
            "alibi (B, H), window",
            lambda: (decode(sq=2), dict(alibi_slopes=rand(2, 4, dtype=F32), window=(3, 0))),
        ),
        case(
            "cache rows, left padding",
            lambda: (
                decode(),
                dict(causal=True, cache_batch_idx=i32(1, 0), cache_leftpad=i32(2, 0)),
            ),
        ),
        case(
            "paged with cache_leftpad",
            lambda: (
                paged(),
                dict(block_table=i32(3, 0, 1, 4).view(2, 2), cache_leftpad=i32(0, 1)),
            ),
            (ValueError, "block_table"),
        ),
        case(
            "block_table int64",
            lambda: (paged(), dict(block_table=torch.tensor([[3, 0], [1, 4]]))),
            (TypeError, "block_table"),
        ),
        case(
            "block_table page 5 of 5",
            lambda: (paged(), dict(block_table=i32(3, 0, 1, 5).view(2, 2))),
            (ValueError, "block_table"),
        ),
    ]


def paged(pages=5, page_size=4):
    """decode()'s inputs with its caches as pages (the block table is the keyword's)."""
    q, _, _, lengths, *new = decode()
    caches = [rand(pages, page_size, 2, 16) for _ in "kv"]
    return (q, *caches, lengths, *new)


def norm_cases(fn, ref) -> list[Case]:
    op = fn.__name__
    rms = op == "rms_norm"

    def case(name, make, expect=OK, **kw):
        return Case(op, name, fn, make, expect, ref, **kw)

    def params(n, dtype=BF16):
        w = rand(n, dtype=dtype)
        return (w,) if rms else (w, rand(n, dtype=dtype))

    def nan_row():
        x = rand(4, 33)
        x[2, 5] = NAN
        return (x, 33, *params(33)), {}

    return [
        case("odd shapes", lambda: ((rand(3, 7, 33), 33, *params(33)), {})),
        case("2-D normalized_shape", lambda: ((rand(3, 5, 6), (5, 6), *params(6)[:0]), {})),
        case("one row", lambda: ((rand(1, 17, dtype=F32), 17), {})),
        case("empty batch", lambda: ((rand(0, 33), 33, *params(33)), {})),
        case("residual", lambda: ((rand(5, 24), 24), dict(residual=rand(5, 24)))),
        case("NaN row", nan_row),
        case("fp64", lambda: ((rand(3, 8, dtype=F64), 8), {}), unavailable={"triton": "float64"}),
        case("meta", lambda: ((rand(3, 7, 33), 33, *params(33)), {}), meta=True),
        case(
            "float normalized_shape",
            lambda: ((rand(3, 8), 8.0), {}),
            (TypeError, "normalized_shape"),
        ),
        case("normalized_shape 0", lambda: ((rand(3, 8), 0), {}), (ValueError, "normalized_shape")),
        case(
            "normalized_shape mismatch",
            lambda: ((rand(3, 8), 7), {}),
            (ValueError, "normalized_shape"),
        ),
        case("weight shape", lambda: ((rand(3, 8), 8, rand(7)), {}), (ValueError, "weight")),
        case("int x", lambda: ((torch.ones(3, 8, dtype=torch.int64), 8), {}), (TypeError, "x")),
        case("eps nan", lambda: ((rand(3, 8), 8), dict(eps=NAN)), (ValueError, "eps")),
        case("eps inf", lambda: ((rand(3, 8), 8), dict(eps=math.inf)), (ValueError, "eps")),
        case(
            "residual on meta",
            lambda: ((rand(3, 8), 8), dict(residual=rand(3, 8).to("meta"))),
            (ValueError, "residual"),
        ),
    ]


def rotary_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case("apply_rotary", name, ops.apply_rotary, make, expect, ref_rotary, **kw)

    def tables(p=16, r2=6):
        angles = torch.arange(p)[:, None] * torch.rand(r2)
        return angles.cos(), angles.sin()

    def qk(b=2, s=5, h=3, hk=1, d=16, dtype=BF16, nan_at=None):
        return rand(b, s, h, d, dtype=dtype, nan_at=nan_at), rand(b, s, hk, d, dtype=dtype)

    return [
        case("partial rotary, GQA", lambda: ((*qk(), *tables()), {})),
        case("interleaved, offset", lambda: ((*qk(), *tables()), dict(interleaved=True, offset=4))),
        case("offset tensor", lambda: ((*qk(), *tables()), dict(offset=i32(0, 9)))),
        case(
            "position_ids",
            lambda: ((*qk(), *tables()), dict(position_ids=torch.randint(0, 16, (1, 5)))),
        ),
        case("in place", lambda: ((*qk(), *tables()), dict(inplace=True))),
        case("empty batch", lambda: ((*qk(b=0), *tables()), {})),
        case("NaN query", lambda: ((*qk(nan_at=(1, 2, 0, 3)), *tables()), {})),
        case("fp64", lambda: ((*qk(dtype=F64), *tables()), {}), unavailable={"triton": "float64"}),
        case("meta", lambda: ((*qk(), *tables()), dict(offset=2)), meta=True),
        case(
            "offset past the table",
            lambda: ((*qk(), *tables()), dict(offset=12)),
            (ValueError, "offset"),
        ),
        case(
            "position_ids out of range",
            lambda: ((*qk(), *tables()), dict(position_ids=torch.full((1, 5), 16))),
            (ValueError, "position_ids"),
        ),
        case(
            "rotary_dim over head_dim",
            lambda: ((*qk(d=8), *tables(r2=6)), {}),
            (ValueError, "rotary_dim"),
        ),
        case("k seqlen", lambda: ((qk()[0], qk(s=4)[1], *tables()), {}), (ValueError, "k")),
        case("int q", lambda: ((qk()[0].int(), qk()[1], *tables()), {}), (TypeError, "q")),
        case("sin shape", lambda: ((*qk(), tables()[0], tables(r2=4)[1]), {}), (ValueError, "sin")),
    ]


def bias_act_cases() -> list[Case]:
    def case(name, make, expect=OK, ref=ops.bias_act_ref, **kw):
        return Case("bias_act", name, ops.bias_act, make, expect, ref, **kw)

    return [
        case("odd shapes, gelu", lambda: ((rand(3, 5, 37), rand(37)), {})),
        case(
            "silu, fp32 bias", lambda: ((rand(7, 33), rand(33, dtype=F32)), dict(activation="silu"))
        ),
        case("no features", lambda: ((rand(4, 0), rand(0)), {})),
        case("empty batch", lambda: ((rand(0, 9), rand(9)), dict(activation="relu"))),
        case("NaN", lambda: ((rand(4, 9, nan_at=(2, 3)), None), dict(activation="gelu_tanh"))),
        case("dropout", lambda: ((rand(6, 40), rand(40)), dict(dropout_p=0.3, seed=1)), ref=None),
        case("fp64", lambda: ((rand(3, 8, dtype=F64),), {}), unavailable={"triton": "float64"}),
        case("meta", lambda: ((rand(3, 9), rand(9)), {}), meta=True),
        case("bias shape", lambda: ((rand(3, 9), rand(8)), {}), (ValueError, "bias")),
        case(
            "activation",
            lambda: ((rand(3, 9),), dict(activation="swish")),
            (ValueError, "activation"),
        ),
        case(
            "dropout_p nan", lambda: ((rand(3, 9),), dict(dropout_p=NAN)), (ValueError, "dropout_p")
        ),
        case("0-d x", lambda: ((torch.tensor(1.0, dtype=BF16),), {}), (ValueError, "x")),
        case("int x", lambda: ((torch.ones(3, 9, dtype=torch.int64),), {}), (TypeError, "x")),
    ]


def gemm_cases() -> list[Case]:
    """linear_act, gated_linear, fused_mlp, gated_mlp: odd shapes, K = 0, M = 0, one row,
    NaN rows, meta, and bad shapes/dtypes."""
    cases = []

    def w(n, k, dtype=BF16):
        return rand(n, k, dtype=dtype) / max(k, 1) ** 0.5

    def la(m=5, k=24, n=12, dtype=BF16, bias=True, x=None):
        x = rand(*m, k, dtype=dtype) if isinstance(m, tuple) else rand(m, k, dtype=dtype)
        return (x, w(n, k, dtype), rand(n, dtype=dtype) if bias else None)

    def gl(m=5, k=24, n=12, dtype=BF16, bias=True):
        x = rand(m, k, dtype=dtype)
        biases = dict(bias_gate=rand(n, dtype=dtype), bias_up=rand(n, dtype=dtype)) if bias else {}
        return (x, w(n, k, dtype), w(n, k, dtype)), biases

    def fm(m=5, k=24, hidden=12, n=10, dtype=BF16):
        return (
            rand(m, k, dtype=dtype),
            w(hidden, k, dtype),
            rand(hidden, dtype=dtype),
            w(n, hidden, dtype),
            rand(n, dtype=dtype),
        )

    def gm(m=5, k=24, hidden=12, n=10, dtype=BF16):
        return (
            rand(m, k, dtype=dtype),
            w(hidden, k, dtype),
            w(hidden, k, dtype),
            w(n, hidden, dtype),
        )

    def nan_x(args, at=(1, 3)):
        args = list(args)
        args[0] = args[0].clone()
        args[0][at] = NAN
        return tuple(args)

    specs = [
        (
            ops.linear_act,
            ops.linear_act_ref,
            [
                ("odd shapes, 3-D x", lambda: (la((2, 3)), dict(activation="gelu_tanh"))),
                ("K = 0", lambda: (la(k=0), dict(activation="relu"))),
                ("M = 0", lambda: (la(m=0), {})),
                ("one row, no bias", lambda: (la(m=1, bias=False), dict(activation="silu"))),
                ("NaN row", lambda: (nan_x(la()), {})),
                ("fp32", lambda: (la(dtype=F32), {}), OK, {"triton": "fp16/bf16"}),
                ("meta", lambda: (la(), {}), OK, {}, True),
                (
                    "weight K",
                    lambda: ((lambda x, wt, b: (x, wt[:, :7], b))(*la()), {}),
                    (ValueError, "weight"),
                ),
                (
                    "weight dtype",
                    lambda: ((lambda x, wt, b: (x, wt.half(), b))(*la()), {}),
                    (TypeError, "weight"),
                ),
                (
                    "bias dtype",
                    lambda: ((lambda x, wt, b: (x, wt, b.float()))(*la()), {}),
                    (TypeError, "bias"),
                ),
                (
                    "bias shape",
                    lambda: ((lambda x, wt, b: (x, wt, b[:5]))(*la()), {}),
                    (ValueError, "bias"),
                ),
                (
                    "activation",
                    lambda: (la(), dict(activation="swish")),
                    (ValueError, "activation"),
                ),
            ],
        ),
        (
            ops.gated_linear,
            ops.gated_linear_ref,
            [
                ("odd shapes, biases", lambda: gl()),
                ("K = 0", lambda: gl(k=0)),
                ("M = 0", lambda: gl(m=0)),
                ("NaN row", lambda: (nan_x(gl()[0]), dict(activation="gelu"))),
                ("meta", gl, OK, {}, True),
                (
                    "w_up rows",
                    lambda: ((lambda x, g, u: (x, g, u[:7]))(*gl()[0]), {}),
                    (ValueError, "w_up"),
                ),
                ("one bias", lambda: (gl()[0], dict(bias_gate=rand(12))), (ValueError, "bias_up")),
            ],
        ),
        (
            ops.fused_mlp,
            ref_fused_mlp,
            [
                ("odd shapes", lambda: (fm(), {})),
                ("K = 0", lambda: (fm(k=0), {})),
                ("M = 0", lambda: (fm(m=0), dict(activation="relu"))),
                ("NaN row", lambda: (nan_x(fm()), {})),
                ("meta", lambda: (fm(), {}), OK, {}, True),
                (
                    "fc2_weight",
                    lambda: ((lambda *a: (*a[:3], a[3][:, :5], a[4]))(*fm()), {}),
                    (ValueError, "fc2_weight"),
                ),
                (
                    "fc2_bias dtype",
                    lambda: ((lambda *a: (*a[:4], a[4].float()))(*fm()), {}),
                    (TypeError, "fc2_bias"),
                ),
            ],
        ),
        (
            ops.gated_mlp,
            ref_gated_mlp,
            [
                ("odd shapes", lambda: (gm(), {})),
                ("K = 0", lambda: (gm(k=0), {})),
                ("M = 0", lambda: (gm(m=0), {})),
                ("NaN row", lambda: (nan_x(gm()), {})),
                ("meta", lambda: (gm(), {}), OK, {}, True),
                (
                    "down_weight",
                    lambda: ((lambda *a: (*a[:3], a[3][:, :5]))(*gm()), {}),
                    (ValueError, "down_weight"),
                ),
            ],
        ),
    ]
    for fn, ref, rows in specs:
        for row in rows:
            name, make, expect, unavailable, meta = row + (OK, {}, False)[len(row) - 2 :]
            cases.append(Case(fn.__name__, name, fn, make, expect, ref, unavailable, meta=meta))
    return cases


def loss_floor_scale(logits: Tensor, kwargs: dict, ref: Tensor) -> float:
    """Where a correct cross-entropy may round: each row's loss is the difference of its
    log-sum-exp and its target's logit, numbers of size up to max|logit| + log V that are
    rounded before they cancel (an ulp each at that size); a mean or sum of n non-negative
    row losses adds up to n - 1 roundings in their sum, as many in the weights' (or the
    count's), and one in the division, at the result's size."""
    finite = logits[torch.isfinite(logits)]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    row = 2 * (largest + math.log(logits.shape[-1]))
    if kwargs.get("reduction", "mean") == "none" or ref.numel() == 0:
        return row
    return row + (2 * logits.shape[0] - 1) / 2 * ref.abs().max().item()


def loss_cases() -> list[Case]:
    def ce(name, make, expect=OK, ref=ops.cross_entropy_ref, **kw):
        return Case(
            "cross_entropy",
            name,
            ops.cross_entropy,
            make,
            expect,
            ref,
            floor_scale=lambda args, kwargs, ref: loss_floor_scale(args[0].double(), kwargs, ref),
            **kw,
        )

    def lce(name, make, expect=OK, **kw):
        return Case(
            "linear_cross_entropy",
            name,
            ops.linear_cross_entropy,
            make,
            expect,
            ref_linear_ce,
            floor_scale=lambda args, kwargs, ref: loss_floor_scale(
                args[0].double() @ args[1].double().T, kwargs, ref
            ),
            **kw,
        )

    def logits(n=6, v=37, dtype=BF16, nan_at=None):
        return rand(n, v, dtype=dtype, nan_at=nan_at), torch.randint(0, v, (n,))

    def lin(n=6, h=16, v=37, dtype=BF16):
        return rand(n, h, dtype=dtype), rand(v, h, dtype=dtype) / 4, torch.randint(0, v, (n,))

    def ignored(t, rows=(1, 4)):
        t = t.clone()
        t[list(rows)] = -100
        return t

    return [
        ce("odd shapes", lambda: (logits(), {})),
        ce(
            "ignored rows, smoothing, z-loss",
            lambda: (
                (lambda x, t: (x, ignored(t)))(*logits()),
                dict(label_smoothing=0.1, z_loss=1e-3),
            ),
        ),
        ce("reduction none", lambda: (logits(), dict(reduction="none"))),
        ce("one row, sum", lambda: (logits(1, dtype=F32), dict(reduction="sum"))),
        ce("empty batch, sum", lambda: (logits(0), dict(reduction="sum"))),
        ce("NaN row", lambda: (logits(nan_at=(2, 5)), dict(reduction="none"))),
        ce("class weights", lambda: (logits(dtype=F32), dict(weight=torch.rand(37)))),
        ce(
            "class weights, smoothing, ignored rows, none",
            lambda: (
                (lambda x, t: (x, ignored(t)))(*logits()),
                dict(weight=torch.rand(37) + 0.1, label_smoothing=0.2, reduction="none"),
            ),
        ),
        ce("soft cap", lambda: (logits(), dict(softcap=0.8, z_loss=1e-3))),
        ce(
            "z-loss and accuracy returned",
            lambda: (
                (lambda x, t: (x, ignored(t)))(*logits()),
                dict(z_loss=1e-2, return_z_loss=True, return_token_accuracy=True),
            ),
            ref=ref_ce_extras,
            collect=collect_ce_extras,
        ),
        ce("softcap negative", lambda: (logits(), dict(softcap=-1.0)), (ValueError, "softcap")),
        ce(
            "return_z_loss not bool",
            lambda: (logits(), dict(return_z_loss=1)),
            (TypeError, "return_z_loss"),
        ),
        ce("meta", lambda: (logits(), {}), meta=True),
        ce(
            "target out of range",
            lambda: ((logits()[0], torch.tensor([0, 1, 37, 2, 3, 4])), {}),
            (ValueError, "target"),
        ),
        ce(
            "float target",
            lambda: ((lambda x, t: (x, t.float()))(*logits()), {}),
            (TypeError, "target"),
        ),
        ce(
            "3-D logits",
            lambda: ((rand(2, 3, 5), torch.zeros(2, dtype=torch.long)), {}),
            (ValueError, "logits"),
        ),
        ce("reduction", lambda: (logits(), dict(reduction="avg")), (ValueError, "reduction")),
        ce(
            "label_smoothing nan",
            lambda: (logits(), dict(label_smoothing=NAN)),
            (ValueError, "label_smoothing"),
        ),
        ce("z_loss inf", lambda: (logits(), dict(z_loss=math.inf)), (ValueError, "z_loss")),
        lce("odd shapes", lambda: (lin(), {})),
        lce(
            "bias, ignored rows, chunks",
            lambda: (
                (lambda h, wt, t: (h, wt, ignored(t), rand(37)))(*lin()),
                dict(chunk_size=4, reduction="sum"),
            ),
        ),
        lce("empty batch, none", lambda: (lin(n=0), dict(reduction="none"))),
        lce(
            "class weights, soft cap, chunks",
            lambda: (lin(), dict(ce_weight=torch.rand(37) + 0.1, softcap=0.5, chunk_size=4)),
        ),
        lce(
            "z-loss returned",
            lambda: (lin(), dict(z_loss=1e-2, return_z_loss=True)),
            collect=collect_ce_extras,
        ),
        lce(
            "ce_weight shape",
            lambda: (lin(), dict(ce_weight=torch.rand(36))),
            (ValueError, "ce_weight"),
        ),
        lce("fp64", lambda: (lin(dtype=F64), {}), unavailable={"triton": "float64"}),
        lce("meta", lambda: (lin(), dict(reduction="none")), meta=True),
        lce(
            "weight dtype",
            lambda: ((lambda h, wt, t: (h, wt.float(), t))(*lin()), {}),
            (TypeError, "weight"),
        ),
        lce(
            "target shape",
            lambda: ((lambda h, wt, t: (h, wt, t[:3]))(*lin()), {}),
            (ValueError, "target"),
        ),
        lce("chunk_size 0", lambda: (lin(), dict(chunk_size=0)), (ValueError, "chunk_size")),
        lce("z_loss nan", lambda: (lin(), dict(z_loss=NAN)), (ValueError, "z_loss")),
    ]


def quant_cases() -> list[Case]:
    def qm(name, make, expect=OK, **kw):
        return Case(
            "quant_matmul", name, ops.quant_matmul, make, expect, ops.quant_matmul_ref, **kw
        )

    def w8(name, make, expect=OK, **kw):
        return Case("w8a8_matmul", name, ops.w8a8_matmul, make, expect, ref_w8a8, **kw)

    def weight(n=24, k=64, **fmt):
        return quantize_weight(torch.randn(n, k) / 8, **fmt)

    nf4 = dict(bits=4, scheme="nf4", group_size=32, double_quant=True)
    int4 = dict(bits=4, group_size=32)
    return [
        qm("int4, 3-D x, bias", lambda: ((rand(2, 3, 64), weight(**int4), rand(24)), {})),
        qm("nf4 double-quantized", lambda: ((rand(5, 64), weight(**nf4)), {})),
        qm(
            "fp32 bias (QuantLinear's)",
            lambda: ((rand(3, 64), weight(**int4), rand(24, dtype=F32)), {}),
        ),
        qm("int8, one row", lambda: ((rand(1, 64, dtype=F16), weight(bits=8)), {})),
        qm("M = 0", lambda: ((rand(0, 64), weight(**int4)), {})),
        qm("NaN row", lambda: ((rand(4, 64, nan_at=(2, 7)), weight(**nf4)), {})),
        qm(
            "fp32",
            lambda: ((rand(3, 64, dtype=F32), weight(bits=8)), {}),
            unavailable={"triton": "fp16/bf16"},
        ),
        qm("meta", lambda: ((rand(3, 64), weight(**int4)), {}), meta=True),
        qm("x features", lambda: ((rand(3, 60), weight(**int4)), {}), (ValueError, "x")),
        qm("qw a tensor", lambda: ((rand(3, 64), torch.randn(24, 64)), {}), (TypeError, "qw")),
        qm(
            "int bias",
            lambda: ((rand(3, 64), weight(**int4), torch.ones(24, dtype=torch.int32)), {}),
            (TypeError, "bias"),
        ),
        w8("odd shapes, bias", lambda: ((rand(5, 64), weight(bits=8), rand(24)), {})),
        w8("M = 0", lambda: ((rand(0, 64), weight(bits=8)), {})),
        w8("NaN row", lambda: ((rand(4, 64, nan_at=(1, 3)), weight(bits=8)), {})),
        w8("meta", lambda: ((rand(3, 64), weight(bits=8)), {}), meta=True),
        w8("4-bit weight", lambda: ((rand(3, 64), weight(**int4)), {}), (ValueError, "bits")),
        w8("x features", lambda: ((rand(3, 32), weight(bits=8)), {}), (ValueError, "x")),
    ]


def lora_cases() -> list[Case]:
    def case(name, make, expect=OK, **kw):
        return Case("lora_linear", name, lora_linear, make, expect, lora_linear_ref, **kw)

    def args(m=5, k=24, n=12, r=4, dtype=BF16, quantized=False, nan_at=None):
        w = quantize_weight(torch.randn(n, k) / 5, bits=8) if quantized else rand(n, k, dtype=dtype)
        return (
            rand(m, k, dtype=dtype, nan_at=nan_at),
            w,
            rand(n, dtype=dtype),
            rand(r, k, dtype=dtype) / 4,
            rand(n, r, dtype=dtype) / 4,
            0.5,
        )

    return [
        case("odd shapes", lambda: (args(), {})),
        case("quantized weight", lambda: (args(k=32, quantized=True), {})),
        case(
            "quantized weight, fp32 bias (QuantLinear's)",
            lambda: ((lambda *a: (*a[:2], a[2].float(), *a[3:]))(*args(k=32, quantized=True)), {}),
        ),
        case("M = 0", lambda: (args(m=0), {})),
        case("K = 0", lambda: (args(k=0), {})),
        case("NaN row", lambda: (args(nan_at=(3, 1)), {})),
        case("fp32", lambda: (args(dtype=F32), {}), unavailable={"triton": "fp16/bf16"}),
        case("meta", lambda: (args(), {}), meta=True),
        case(
            "rank mismatch",
            lambda: ((lambda *a: (*a[:4], a[4][:, :3], a[5]))(*args()), {}),
            (ValueError, "rank"),
        ),
        case(
            "x features",
            lambda: ((lambda *a: (a[0][:, :7], *a[1:]))(*args()), {}),
            (ValueError, "shapes"),
        ),
        case(
            "lora_b dtype",
            lambda: ((lambda *a: (*a[:4], a[4].half(), a[5]))(*args()), {}),
            (TypeError, "lora_b"),
        ),
        case("scale nan", lambda: ((*args()[:5], NAN), {}), (ValueError, "scale")),
        case("dropout_p -0.5", lambda: (args(), dict(dropout_p=-0.5)), (ValueError, "dropout_p")),
    ]


CASES: list[Case] = [
    *flash_cases(),
    *varlen_cases(),
    *sdpa_cases(),
    *kvcache_cases(),
    *norm_cases(ops.layer_norm, ops.layer_norm_ref),
    *norm_cases(ops.rms_norm, ops.rms_norm_ref),
    *rotary_cases(),
    *bias_act_cases(),
    *gemm_cases(),
    *loss_cases(),
    *quant_cases(),
    *lora_cases(),
]


# ---------------------------------------------------------------------------------------------
# Running a case.


def _map(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in ``obj`` (tuples, lists, dicts, QuantizedWeight)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, QuantizedWeight):
        fields = {f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        return QuantizedWeight(**fields)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _float_cast(dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    return lambda t: t.to(dtype) if t.is_floating_point() else t


def _first_float_dtype(args: tuple) -> torch.dtype:
    return next(a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point())


def _as_tuple(result: Any) -> tuple[Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


@dataclasses.dataclass
class Outcome:
    kind: str  # "ok", an exception's type name
    message: str = ""
    tensors: tuple[Tensor, ...] = ()

    def short(self) -> str:
        return self.kind


def run(case: Case, be: str, device: torch.device, inputs: tuple[tuple, dict]) -> Outcome:
    """``case`` on backend ``be`` with fresh copies of ``inputs`` moved to ``device``."""
    target = torch.device("meta") if case.meta else device
    # A tensor a case put on the meta device stays there: it stands for "another device".
    args, kwargs = _map(inputs, lambda t: t.clone().to(t.device if t.is_meta else target))
    try:
        with fastlm.use_backend(be):
            result = case.fn(*args, **kwargs)
    except (ValueError, TypeError, BackendUnavailable) as exc:
        return Outcome(type(exc).__name__, str(exc))
    tensors = case.collect(result, args, kwargs) if case.collect else _as_tuple(result)
    return Outcome(OK, tensors=tensors)


def backends(op: str, device: torch.device) -> list[str]:
    """The backends of ``op`` that can run on ``device`` here (cuda only on CUDA tensors
    with the extension built)."""
    names = backend.registered_ops()[op]
    if device.type != "cuda" or backend.cuda_extension_error() is not None:
        names = tuple(n for n in names if n != "cuda")
    return list(names)


def expected_kind(case: Case, be: str) -> str:
    if be in case.unavailable:
        return "BackendUnavailable"
    return OK if case.expect == OK else case.expect[0].__name__


def _compare(
    actual: Tensor, ref: Tensor, baseline: Tensor, label: str, scale: float | None
) -> None:
    """Same NaN places and infinities as the reference; the rest within the policy, its
    floor one ulp at ``scale`` (None: the reference's largest element)."""
    nan_got, nan_ref = actual.isnan(), ref.isnan()
    if not torch.equal(nan_got, nan_ref):
        raise AssertionError(
            f"{label}: NaN at {nan_got.nonzero().tolist()[:8]}, the float64 reference has "
            f"NaN at {nan_ref.nonzero().tolist()[:8]}"
        )
    inf = ref.isinf()
    if not torch.equal(actual[inf].double(), ref[inf]):
        raise AssertionError(
            f"{label}: {actual[inf].tolist()[:8]} where the reference has {ref[inf].tolist()[:8]}"
        )
    finite = torch.isfinite(ref)
    base = torch.where(torch.isfinite(baseline.double()), baseline.double(), ref)
    assert_policy(actual[finite], ref[finite], base[finite], label, scale=scale)


def check_case(case: Case, device: torch.device) -> dict[str, Outcome]:
    """Run ``case`` on every backend; assert the outcomes agree with each other and the
    table. Returns the outcome per backend."""
    inputs = case.make()
    outcomes = {be: run(case, be, device, inputs) for be in backends(case.op, device)}
    for be, got in outcomes.items():
        want = expected_kind(case, be)
        assert got.kind == want, f"{case.id} on {be}: {got.kind} {got.message!r}, expected {want}"
        if want == "BackendUnavailable":
            assert case.unavailable[be] in got.message, (be, got.message)
        elif want != OK:
            assert case.expect[1] in got.message, f"{case.id} on {be}: {got.message!r}"
    refused = {be: o.message for be, o in outcomes.items() if o.kind in ("ValueError", "TypeError")}
    assert len(set(refused.values())) <= 1, f"{case.id}: messages differ by backend: {refused}"
    served = {be: o.tensors for be, o in outcomes.items() if o.kind == OK}
    if not served:
        return outcomes
    if case.meta:
        cpu = run(dataclasses.replace(case, meta=False), "torch", torch.device("cpu"), inputs)
        want = [(tuple(t.shape), t.dtype) for t in cpu.tensors]
    else:
        want = None
    for be, tensors in served.items():
        got = [(tuple(t.shape), t.dtype) for t in tensors]
        if want is None:
            want = got
        assert got == want, f"{case.id} on {be}: outputs {got}, expected {want}"
        if case.meta:
            assert all(t.device.type == "meta" for t in tensors), f"{case.id} on {be}"
    if case.ref is None or case.meta:
        return outcomes
    args, kwargs = inputs
    reference = _as_tuple(case.ref(*_map(args, _float_cast(F64)), **_map(kwargs, _float_cast(F64))))
    # PyTorch's formula at the inputs' dtype is the baseline; at float32 for float64 inputs,
    # whose reference is the very same computation.
    dtype = _first_float_dtype(args)
    low = _float_cast(F32 if dtype == F64 else dtype)
    baseline = _as_tuple(case.ref(*_map(args, low), **_map(kwargs, low)))
    for be, tensors in served.items():
        for i, (got, ref, base) in enumerate(zip(tensors, reference, baseline, strict=True)):
            finite = ref[torch.isfinite(ref)]
            scale = None if case.floor_scale is None else case.floor_scale(args, kwargs, finite)
            _compare(got.cpu(), ref, base, f"{case.id} on {be}, output {i}", scale)
    return outcomes


# ---------------------------------------------------------------------------------------------
# Tests.


def test_every_registered_op_has_rows():
    covered = {case.op for case in CASES}
    missing = set(backend.registered_ops()) - covered
    assert not missing, f"ops with no conformance rows: {sorted(missing)}"
    public = {name for name in ops.__all__ if not name.endswith("_ref")} - {"attention_probs"}
    missing_fns = public - {case.fn.__name__ for case in CASES}
    assert not missing_fns, f"public ops with no conformance rows: {sorted(missing_fns)}"


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


# NumPy's note when the interpreter casts a NaN row's codes to int8 (w8a8_matmul: the row's
# NaN scale still makes its output NaN).
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_same_outcome_on_every_backend(case):
    check_case(case, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [c for c in CASES if not c.meta], ids=lambda c: c.id)
def test_same_outcome_on_every_backend_cuda(case):
    check_case(case, torch.device("cuda"))


# ---------------------------------------------------------------------------------------------
# The table, for reading: python tests/ops/test_conformance.py [cuda]


def table(device: torch.device) -> str:
    columns = ["torch", "triton", "cuda"]
    lines = ["| op | case | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    failures = []
    for case in CASES:
        try:
            outcomes = check_case(case, device)
            verdict = ""
        except AssertionError as exc:
            outcomes = {}
            verdict = "MISMATCH"
            failures.append(f"{case.id}: {exc}")
        cells = [
            outcomes[be].short() if be in outcomes else ("" if verdict == "" else verdict)
            for be in columns
        ]
        lines.append(f"| {case.op} | {case.id} | " + " | ".join(c or "-" for c in cells) + " |")
    return "\n".join(lines + [""] + failures)


if __name__ == "__main__":
    torch.manual_seed(0)
    print(table(torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
