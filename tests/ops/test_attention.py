"""fastlm.ops attention: the public functions, both backends, autograd, compile, bad input.

Numerics of the kernels themselves are in tests/kernels/test_attention.py; here the torch
backend (CPU default) and the Triton kernels (forced: the interpreter) must agree with the
reference and with each other through the public API.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend, ops
from fastlm.ops import attention as attention_ops
from fastlm.ops._common import SIGNATURES_KEPT
from fastlm.testing import (
    assert_attention_policy,
    assert_lse,
    assert_policy,
    assert_within,
    attention_grad_scales,
)

BACKENDS = ["torch", "triton"]


def _qkv(b=2, sq=13, sk=17, h=4, hkv=2, d=32, dtype=torch.bfloat16, grad=True):
    q = torch.randn(b, sq, h, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, requires_grad=grad)
    return q, k, v


def _ref_grads(q, k, v, do, bias=None, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    out, lse = ops.attention_ref(*leaves, attn_bias=b64, **kw)
    wanted = leaves + ([b64] if b64 is not None else [])
    return out, lse, torch.autograd.grad((out * do.double()).sum(), wanted)


@pytest.mark.parametrize("be", BACKENDS)
def test_flash_attention_all_features_with_gradients(be):
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 1, 17, dtype=torch.bfloat16, requires_grad=True)
    slopes = torch.rand(4)
    do = torch.randn(2, 13, 4, 32, dtype=torch.bfloat16)
    with fastlm.use_backend(be):
        out, lse = ops.flash_attention(
            q,
            k,
            v,
            causal=True,
            window=(6, -1),
            attn_bias=bias,
            alibi_slopes=slopes,
            return_lse=True,
        )
        grads = torch.autograd.grad((out * do).sum(), (q, k, v, bias))
    assert grads[3].shape == bias.shape  # summed over the broadcast dims
    masks = dict(causal=True, window=(6, -1))
    assert_attention_policy(out, grads, q, k, v, do, bias=bias, alibi=slopes, **masks)
    assert_lse(lse, q.detach(), k.detach(), bias=bias.detach(), alibi=slopes, **masks)


@pytest.mark.parametrize("be", BACKENDS)
def test_dropout_is_reproducible_by_seed(be):
    q, k, v = _qkv(grad=False)
    with fastlm.use_backend(be):
        a = ops.flash_attention(q, k, v, dropout_p=0.4, seed=3)
        b = ops.flash_attention(q, k, v, dropout_p=0.4, seed=3)
        c = ops.flash_attention(q, k, v, dropout_p=0.4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("be", BACKENDS)
def test_varlen_equals_dense_per_sequence(be):
    lens = [3, 11, 1, 6]
    cu = torch.tensor([0, 3, 14, 15, 21], dtype=torch.int32)
    q = torch.randn(21, 4, 16, dtype=torch.float16, requires_grad=True)
    k = torch.randn(21, 2, 16, dtype=torch.float16, requires_grad=True)
    v = torch.randn(21, 2, 16, dtype=torch.float16, requires_grad=True)
    with fastlm.use_backend(be):
        out = ops.flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    for i in range(len(lens)):
        rows = slice(cu[i], cu[i + 1])
        seq = [t[None, rows] for t in (q, k, v)]
        seq_grads = [g[None, rows] for g in grads]
        ones = torch.ones_like(seq[0])  # the gradient of out.sum()
        assert_attention_policy(out[None, rows], seq_grads, *seq, ones, causal=True)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "mask_kind, is_causal, sq, sk",
    [
        ("none", False, 9, 9),
        ("none", True, 7, 12),
        ("none", True, 12, 7),
        ("bool", False, 9, 11),
        ("float", False, 9, 11),
    ],
)
def test_sdpa_matches_torch(be, mask_kind, is_causal, sq, sk):
    """Same semantics as F.scaled_dot_product_attention, top-left causal included."""
    q = torch.randn(2, 4, sq, 32, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, sk, 32, dtype=torch.bfloat16) for _ in range(2))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, sq, sk) > 0.3
        mask[..., 0] = True  # no fully masked row: torch gives NaN there, fastlm zeros
    elif mask_kind == "float":
        mask = torch.randn(1, 4, sq, sk, dtype=torch.bfloat16)
    with fastlm.use_backend(be):
        got = ops.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
        )

    def torch_sdpa(dtype):
        floats = mask is not None and mask.dtype != torch.bool
        out = F.scaled_dot_product_attention(
            *(t.to(dtype) for t in (q, k, v)),
            attn_mask=mask.to(dtype) if floats else mask,
            is_causal=is_causal,
            enable_gqa=True,
        )
        # Rows that see no key: torch's math gives NaN, fastlm zeros.
        return out.nan_to_num(0.0) if is_causal and sq > sk else out

    assert_policy(got, torch_sdpa(torch.float64), torch_sdpa(q.dtype))


def test_multihead_attention_fast_path_uses_fastlm_sdpa(monkeypatch):
    calls = []
    real = ops.scaled_dot_product_attention
    monkeypatch.setattr(
        ops, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    mha = fastlm.nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    mha(x, x, x, need_weights=False)
    assert calls == [1]


def test_cpu_default_is_torch_and_triton_is_forceable():
    q, k, v = _qkv(grad=False)
    assert backend.select("attention", q.device, ops.attention._support(q)) == "torch"
    with fastlm.use_backend("triton"):
        assert backend.select("attention", q.device, ops.attention._support(q)) == "triton"
    with fastlm.use_backend("cuda"), pytest.raises(backend.BackendUnavailable):
        ops.flash_attention(q, k, v)
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="fp16"):
        ops.flash_attention(*(t.float() for t in (q, k, v)))


def test_torch_compile_fullgraph_with_custom_op():
    q, k, v = _qkv(grad=False)
    fn = torch.compile(
        lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
        fullgraph=True,
        backend="aot_eager",
    )
    with fastlm.use_backend("triton"):
        torch.testing.assert_close(fn(q, k, v), ops.flash_attention(q, k, v, causal=True))


@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_opcheck_forward_op(softcap):
    q, k, v = _qkv(b=1, sq=5, sk=6, h=2, hkv=1, d=16, dtype=torch.float16)
    args = (q, k, v, None, None, None, None, 5, 6, True, 0.25, None, 0, 0.0, 0, softcap, None)
    args = (*args, "triton")
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "head_dim"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "heads"),
        (lambda q, k, v: (q, k.float(), v), TypeError, "k"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v"),
        (
            lambda q, k, v: (q.expand(2, 13, 4, 32)[..., :1].repeat(1, 1, 1, 300), k, v),
            ValueError,
            "head_dim",
        ),
        (lambda q, k, v: (q[0], k, v), ValueError, "q"),
    ],
)
def test_bad_input_names_the_argument(make, error, word):
    q, k, v = _qkv(grad=False)
    with pytest.raises(error, match=word):
        ops.flash_attention(*make(q, k, v))


def test_bad_bias_alibi_dropout_and_cu_seqlens():
    q, k, v = _qkv(grad=False)
    with pytest.raises(ValueError, match="attn_bias"):
        ops.flash_attention(q, k, v, attn_bias=torch.randn(3, 4, 13, 17))
    with pytest.raises(ValueError, match="alibi_slopes"):
        ops.flash_attention(q, k, v, alibi_slopes=torch.rand(3))
    with pytest.raises(ValueError, match="dropout_p"):
        ops.flash_attention(q, k, v, dropout_p=1.0)
    packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    cu_q = torch.tensor([0, 13, 25], dtype=torch.int32)  # 25 != 26 packed query rows
    cu_k = torch.tensor([0, 17, 34], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ops.flash_attention_varlen(*packed, cu_q, cu_k, 13, 17)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_backends_agree_and_append_in_place(causal):
    b, s_max, h, hkv, d = 3, 40, 4, 2, 32
    lengths = torch.tensor([0, 7, 33], dtype=torch.int32)
    q = torch.randn(b, 2, h, d, dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, 2, hkv, d, dtype=torch.bfloat16) for _ in range(2))
    results = {}
    for be in BACKENDS:
        k_cache, v_cache = (torch.zeros(b, s_max, hkv, d, dtype=torch.bfloat16) for _ in "kv")
        with fastlm.use_backend(be):
            out = ops.attention_with_kvcache(
                q, k_cache, v_cache, lengths, k_new, v_new, causal=causal
            )
        for i, n in enumerate(lengths.tolist()):
            assert torch.equal(k_cache[i, n : n + 2], k_new[i])
            assert torch.equal(v_cache[i, n : n + 2], v_new[i])
        results[be] = out
    # Both round an fp32 result to bf16 once: they may differ by one bf16 ulp.
    ulp = torch.finfo(torch.bfloat16).eps * results["torch"].abs().max().item()
    assert_within(results["triton"], results["torch"], ulp, "out", "one bf16 ulp of max |out|")


def test_kvcache_decode_step_compiles_fullgraph():
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16)
    k_new, v_new = (torch.randn(2, 1, 2, 16, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([3, 5], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new):
        return ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new, causal=True)

    caches = [torch.zeros(2, 8, 2, 16, dtype=torch.float16) for _ in range(4)]
    eager = step(q, caches[0], caches[1], k_new, v_new)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
        q, caches[2], caches[3], k_new, v_new
    )
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


# --- issue 16: one contract, checked before the backend ----------------------------------------


@pytest.mark.parametrize("be", BACKENDS)
def test_kvcache_refuses_what_the_torch_backend_used_to_accept(be):
    """The issue's reproductions: each was accepted by the torch backend (a k_new written at
    slot 6 from a negative length, a batch row dropped, a q batch ignored, int64 output)."""
    q = torch.randn(2, 1, 2, 16, dtype=torch.bfloat16)
    kc, vc = torch.randn(2, 8, 2, 16, dtype=torch.bfloat16), torch.randn(2, 8, 2, 16).bfloat16()
    kn, vn = torch.randn(2, 1, 2, 16).bfloat16(), torch.randn(2, 1, 2, 16).bfloat16()
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    with fastlm.use_backend(be):
        with pytest.raises(ValueError, match="cache_seqlens must be >= 0, got -2"):
            ops.attention_with_kvcache(q, kc, vc, torch.tensor([-2, 5], dtype=torch.int32), kn, vn)
        with pytest.raises(ValueError, match=r"cache_seqlens must have shape \(batch,\) = \(2,\)"):
            ops.attention_with_kvcache(q, kc, vc, torch.tensor([3], dtype=torch.int32))
        with pytest.raises(ValueError, match="k_cache has batch 2 but q has 3"):
            ops.attention_with_kvcache(torch.randn(3, 1, 2, 16).bfloat16(), kc, vc, lengths)
        with pytest.raises(TypeError, match="q must be a floating-point tensor"):
            ops.attention_with_kvcache(q.long(), kc.long(), vc.long(), lengths)
        with pytest.raises(ValueError, match="no room"):
            ops.attention_with_kvcache(q, kc, vc, torch.tensor([3, 8], dtype=torch.int32), kn, vn)


@pytest.mark.parametrize("be", BACKENDS)
def test_varlen_refuses_decreasing_offsets_and_short_max_seqlen(be):
    q = torch.randn(6, 2, 16, dtype=torch.float16)
    cu = torch.tensor([0, 4, 2, 6], dtype=torch.int32)  # torch gave 8 rows, Triton 6
    good = torch.tensor([0, 4, 4, 6], dtype=torch.int32)
    with fastlm.use_backend(be):
        with pytest.raises(ValueError, match=r"non-decreasing, got cu_seqlens_q\[1\] = 4 > "):
            ops.flash_attention_varlen(q, q, q, cu, good, 4, 4)
        with pytest.raises(ValueError, match="max_seqlen_k = 3 is less than the longest"):
            ops.flash_attention_varlen(q, q, q, good, good, 4, 3)
        assert ops.flash_attention_varlen(q, q, q, good, good, 4, 4).shape == q.shape


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["alibi", "bias", "varlen alibi"])
def test_fp32_bias_and_alibi_keep_their_precision(be, dtype, kind):
    """Seqlen_q 64 > seqlen_k 16, non-causal: the ALiBi distances reach 63, and an fp32 bias
    rounded to bf16 before SDPA adds it gave 4x PyTorch's error (issue 16)."""
    _check_bias_precision(be, dtype, kind)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["alibi", "bias"])
def test_mask_rounded_to_the_query_dtype_keeps_the_precision(monkeypatch, dtype, kind):
    """Where SDPA takes only a mask of the query's dtype (CUDA's memory-efficient kernel),
    the torch backend shifts each row by its largest entry before rounding: that branch,
    taken on the CPU."""
    monkeypatch.setattr(attention_ops, "_sdpa_takes_wider_mask", lambda device: False)
    _check_bias_precision("torch", dtype, kind)


def _check_bias_precision(be, dtype, kind):
    """Against the float64 reference; the baseline is PyTorch's own SDPA at this dtype,
    given the fp32 bias."""
    b, sq, sk, h, d = 2, 64, 16, 4, 32
    q = torch.randn(b, sq, h, d, dtype=dtype)
    k, v = torch.randn(b, sk, h, d, dtype=dtype), torch.randn(b, sk, h, d, dtype=dtype)
    slopes = torch.rand(h) if "alibi" in kind else None
    # A large common offset: rounding it alone would move every score by up to 0.06 in bf16.
    bias = 3 * torch.randn(b, h, sq, sk) + 20 if kind == "bias" else None
    with fastlm.use_backend(be):
        if kind == "varlen alibi":
            cu_q, cu_k = (torch.arange(0, b * s + 1, s, dtype=torch.int32) for s in (sq, sk))
            out = ops.flash_attention_varlen(
                *(t.flatten(0, 1) for t in (q, k, v)), cu_q, cu_k, sq, sk, alibi_slopes=slopes
            ).view(q.shape)
        else:
            out = ops.flash_attention(q, k, v, attn_bias=bias, alibi_slopes=slopes)
    ref, _ = ops.attention_ref(
        q.double(),
        k.double(),
        v.double(),
        attn_bias=None if bias is None else bias.double(),
        alibi_slopes=slopes,
    )
    if bias is None:
        distance = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs()
        bias = -slopes[:, None, None] * distance
    baseline = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias.float()
    ).transpose(1, 2)
    assert_policy(out, ref, baseline, f"{kind} out")


@pytest.mark.parametrize("be", BACKENDS)
def test_nan_query_gives_nan_where_the_row_sees_a_key(be):
    """PyTorch's fused CPU kernel gave a NaN query row zeros; NaN in must give NaN out, and a
    row that sees no key (causal, Sq > Sk) still zeros."""
    q, k, v = _qkv(b=1, sq=6, sk=3, h=2, hkv=2, d=16, grad=False)
    q[0, 0, 1, 4] = q[0, 5, 0, 2] = float("nan")  # row 0 sees no key, row 5 sees all
    with fastlm.use_backend(be):
        out = ops.flash_attention(q, k, v, causal=True)
        lse_out, lse = ops.flash_attention(q, k, v, causal=True, return_lse=True)
        decode = ops.attention_with_kvcache(
            q[:, 5:], k.clone(), v.clone(), torch.tensor([3], dtype=torch.int32)
        )
    for o in (out, lse_out):
        assert o[0, 5, 0].isnan().all() and not o[0, 5, 1].isnan().any()
        assert (o[0, 0] == 0).all()
    assert lse[0, 0, 5].isnan() and lse[0, 1, 0] == float("-inf")
    assert decode[0, 0, 0].isnan().all() and not decode[0, 0, 1].isnan().any()


@pytest.mark.parametrize(
    "call, word",
    [
        (lambda q, k, v: ops.flash_attention(q, k, v, softmax_scale=float("nan")), "softmax_scale"),
        (lambda q, k, v: ops.flash_attention(q, k, v, softmax_scale="0.1"), "softmax_scale"),
        (
            lambda q, k, v: ops.scaled_dot_product_attention(
                *(t.transpose(1, 2) for t in (q, k, v)), scale=float("inf"), enable_gqa=True
            ),
            "scale",
        ),
        (lambda q, k, v: ops.flash_attention(q[..., :0], k[..., :0], v[..., :0]), "head_dim"),
    ],
)
@pytest.mark.parametrize("be", BACKENDS)
def test_non_finite_scale_and_empty_head_dim_are_refused(call, word, be):
    q, k, v = _qkv(grad=False)
    with fastlm.use_backend(be), pytest.raises((ValueError, TypeError), match=word):
        call(q, k, v)


def test_meta_tensors_give_meta_outputs_under_autocast():
    q, k, v = (t.to("meta") for t in _qkv(grad=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.flash_attention(q, k, v, causal=True)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == q.dtype


def test_sdpa_on_cpu_is_torchs_own_dropout_stream_included():
    """The contract validates dropout_p without drawing from torch's generator."""
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    torch.manual_seed(3)
    ours = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, dropout_p=0.3))


# --- flash-attn's softcap and return_attn_probs ------------------------------------------------


def _assert_capped(out, grads, q, k, v, do, softcap, bias=None, lse=None, **opts):
    """``out`` and ``grads`` ((dq, dk, dv), then dbias) for ``(out * do).sum()`` against the
    float64 reference with the cap; PyTorch's own error is the same formula at q's dtype
    (eager Gemma 2's way). ``lse`` (B, H, Sq) within 64 float32 ulps of the largest |lse|."""

    def run(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        b = None if bias is None else bias.detach().to(dtype).requires_grad_()
        kw = dict(opts)
        if kw.get("alibi_slopes") is not None:
            kw["alibi_slopes"] = kw["alibi_slopes"].to(dtype)
        o, lse_ = ops.attention_ref(*leaves, attn_bias=b, softcap=softcap, **kw)
        wanted = leaves + ([b] if b is not None else [])
        return o, lse_, torch.autograd.grad((o * do.to(dtype)).sum(), wanted)

    (ref, ref_lse, ref_grads), (base, _, base_grads) = run(torch.float64), run(q.dtype)
    b64 = None if bias is None else bias.detach().double()
    probs, _ = ops.attention_probs(
        q.detach().double(), k.detach().double(), attn_bias=b64, softcap=softcap, **opts
    )
    scale = opts.get("softmax_scale") or q.shape[-1] ** -0.5
    scales = (*attention_grad_scales(q, k, v, do, ref, probs, scale), None)
    assert_policy(out, ref, base, "out")
    for name, got, r, b_, floor in zip(
        ("dq", "dk", "dv", "dbias"), grads, ref_grads, base_grads, scales, strict=False
    ):
        assert_policy(got, r, b_, name, scale=floor)
    if lse is not None:
        seen = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), seen), "lse finite where rows see a key"
        allowed = 64 * torch.finfo(torch.float32).eps * ref_lse[seen].abs().max().item()
        assert_within(lse[seen], ref_lse[seen], allowed, "lse", "64 fp32 ulps of max |lse|")


@pytest.mark.parametrize("be", BACKENDS)
def test_softcap_all_features_with_gradients(be):
    q, k, v = (2 * t.detach() for t in _qkv())  # scores of a few units: the cap bends them
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    bias = torch.randn(1, 4, 1, 17, dtype=torch.bfloat16, requires_grad=True)
    slopes = torch.rand(4)
    do = torch.randn(2, 13, 4, 32, dtype=torch.bfloat16)
    masks = dict(causal=True, window=(6, -1), alibi_slopes=slopes)
    with fastlm.use_backend(be):
        out, lse = ops.flash_attention(
            q, k, v, attn_bias=bias, softcap=2.5, return_lse=True, **masks
        )
        grads = torch.autograd.grad((out * do).sum(), (q, k, v, bias))
    _assert_capped(out, grads, q, k, v, do, 2.5, bias=bias, lse=lse, **masks)


@pytest.mark.parametrize("be", BACKENDS)
def test_softcap_varlen_per_sequence(be):
    # Lengths: queries 3, 11, 0, 6; keys 5, 11, 2, 9.
    cu_q = torch.tensor([0, 3, 14, 14, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 16, 18, 27], dtype=torch.int32)
    q = (3 * torch.randn(20, 4, 16)).half().requires_grad_()
    k, v = (torch.randn(27, 2, 16, dtype=torch.float16, requires_grad=True) for _ in "kv")
    do = torch.randn_like(q)
    with fastlm.use_backend(be):
        out = ops.flash_attention_varlen(q, k, v, cu_q, cu_k, 11, 11, causal=True, softcap=1.5)
        grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    for i in (0, 1, 3):
        rows, cols = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        seq = [t[None, s] for t, s in ((q, rows), (k, cols), (v, cols))]
        seq_grads = [g[None, s] for g, s in zip(grads, (rows, cols, cols), strict=True)]
        _assert_capped(out[None, rows], seq_grads, *seq, do[None, rows], 1.5, causal=True)


def test_softcap_torch_path_chunks_rows_and_recomputes(monkeypatch):
    """fp32 on the torch backend, in chunks of 5 query rows (16 rows, 4 chunks): the chunks
    meet exactly, and backward recomputes each chunk (nothing but the inputs is saved)."""
    monkeypatch.setattr(attention_ops, "_CHUNK_SCORES", 5 * 2 * 4 * 23)
    q = 3 * torch.randn(2, 16, 4, 24)
    k, v = torch.randn(2, 23, 2, 24), torch.randn(2, 23, 2, 24)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(2, 16, 4, 24)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.flash_attention(q, k, v, causal=True, window=(7, 2), softcap=4.0)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    _assert_capped(out, grads, q, k, v, do, 4.0, causal=True, window=(7, 2))
    # Without recomputation, tanh, exp and the masks save (B, H, rows, Sk) score tiles.
    shapes = [tuple(t.shape) for t in saved]
    assert not [s for s in shapes if len(s) == 4 and s[1] == 4 and s[3] == 23], shapes


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["sdpa", "softcap"])
def test_long_sequence_on_the_torch_path(softcap):
    """3072 keys against the last 1024 queries (causal, bottom-right): SDPA without the cap,
    the chunked explicit path (two chunks) with it, both within the policy."""
    q = 4 * torch.randn(1, 1024, 2, 32, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3072, 2, 32, dtype=torch.bfloat16) for _ in "kv")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(1, 1024, 2, 32, dtype=torch.bfloat16)
    out = ops.flash_attention(q, k, v, causal=True, softcap=softcap)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    if softcap:
        _assert_capped(out, grads, q, k, v, do, softcap, causal=True)
    else:
        assert_attention_policy(out, grads, q, k, v, do, causal=True)


def _check_s_dmask(out, grads, s_dmask, q, k, v, do, p, softcap, **masks):
    """flash-attn's test pattern: the keep pattern read from S_dmask's signs (a dropped zero
    is -0.0) keeps ~1 - p of the entries, S_dmask's magnitudes are the probabilities, and out
    and the gradients are the reference's given that very pattern."""
    keep = ~s_dmask.signbit()
    n = keep.numel()
    rate = keep.double().mean().item()
    bound = 5 * math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) <= bound, f"keep rate {rate:.4f}, 1 - p = {1 - p} +- {bound:.4f}"

    def run(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, _ = ops.attention_ref(*leaves, dropout_mask=keep, dropout_p=p, softcap=softcap, **masks)
        probs = ops.attention_probs(*leaves[:2], softcap=softcap, **masks)[0]
        return o, probs, torch.autograd.grad((o * do.to(dtype)).sum(), leaves)

    (ref, ref_probs, ref_grads), (base, base_probs, base_grads) = run(torch.float64), run(q.dtype)
    assert_policy(s_dmask.abs(), ref_probs, base_probs, "|S_dmask|")
    assert_policy(out, ref, base, "out")
    scale = q.shape[-1] ** -0.5
    kept = ref_probs * keep / (1 - p)
    floors = attention_grad_scales(q, k, v, do, ref, kept, scale)
    names = ("dq", "dk", "dv")
    for name, *results, floor in zip(names, grads, ref_grads, base_grads, floors, strict=True):
        assert_policy(*results, name, scale=floor)


@pytest.mark.parametrize("be", BACKENDS)
def test_return_attn_probs_dropout_pattern_out_and_backward(be):
    q, k, v = _qkv(b=1, sq=24, sk=40, h=2, hkv=1, d=16)
    do = torch.randn(1, 24, 2, 16, dtype=torch.bfloat16)
    p = 0.3
    with fastlm.use_backend(be):
        out, lse, s_dmask = ops.flash_attention(
            q, k, v, causal=True, dropout_p=p, seed=11, softcap=2.0, return_attn_probs=True
        )
        grads = torch.autograd.grad((out * do).sum(), (q, k, v))
        again = ops.flash_attention(q, k, v, causal=True, dropout_p=p, seed=11, softcap=2.0)
    assert s_dmask.shape == (1, 2, 24, 40) and s_dmask.dtype == torch.float32
    assert lse.shape == (1, 2, 24)
    assert torch.equal(again, out)  # the same seed, the same pattern without S_dmask
    _check_s_dmask(out, grads, s_dmask, q, k, v, do, p, 2.0, causal=True)


@pytest.mark.parametrize("be", BACKENDS)
def test_return_attn_probs_varlen_pads_and_matches_each_sequence(be):
    # Lengths: queries 7, 0, 12; keys 9, 3, 12.
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in ([0, 7, 7, 19], [0, 9, 12, 24]))
    q = torch.randn(19, 2, 16, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(24, 2, 16, dtype=torch.float16, requires_grad=True) for _ in "kv")
    do = torch.randn_like(q)
    p = 0.25
    with fastlm.use_backend(be):
        out, lse, s_dmask = ops.flash_attention_varlen(
            q, k, v, cu_q, cu_k, 12, 12, dropout_p=p, seed=2, return_attn_probs=True
        )
        grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    assert s_dmask.shape == (3, 2, 12, 12) and lse.shape == (2, 19)
    assert (s_dmask[0, :, 7:] == 0).all() and (s_dmask[0, :, :, 9:] == 0).all()
    assert (s_dmask[1] == 0).all()
    for b, (lq, lk) in enumerate(((7, 9), (12, 12))):
        b = 2 * b  # sequences 0 and 2
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = [t[None, s] for t, s in ((q, rows), (k, cols), (v, cols))]
        seq_grads = [g[None, s] for g, s in zip(grads, (rows, cols, cols), strict=True)]
        mask = s_dmask[b : b + 1, :, :lq, :lk]
        _check_s_dmask(out[None, rows], seq_grads, mask, *seq, do[None, rows], p, 0.0)


# --- paged K/V in flash_attention_varlen (flash-attn's block_table) ---------------------------


def _paged(lens_k, page_size, hkv=2, d=16, dtype=torch.bfloat16, spare=3):
    """Packed k/v of the given lengths, and the same keys scattered over shuffled pages of a
    cache (with ``spare`` unused NaN pages); unused block_table entries point nowhere (-1 or
    past the cache) and must never be read."""
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    k, v = (torch.randn(int(cu_k[-1]), hkv, d, dtype=dtype) for _ in "kv")
    counts = [-(-n // page_size) for n in lens_k]
    num_pages = sum(counts) + spare
    order = torch.randperm(num_pages).tolist()
    table = torch.full((len(lens_k), max(counts) + 1), -1, dtype=torch.int32)
    table[:, -1] = num_pages + 5
    k_cache, v_cache = (
        torch.full((num_pages, page_size, hkv, d), math.nan, dtype=dtype) for _ in "kv"
    )
    for b in range(len(lens_k)):
        for i in range(counts[b]):
            page = order.pop()
            table[b, i] = page
            rows = slice(
                int(cu_k[b]) + i * page_size,
                min(int(cu_k[b]) + (i + 1) * page_size, int(cu_k[b + 1])),
            )
            n_rows = rows.stop - rows.start
            k_cache[page, :n_rows], v_cache[page, :n_rows] = k[rows], v[rows]
    return k, v, k_cache, v_cache, table, cu_k


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "page_size, options",
    [(4, dict(causal=True)), (3, dict(softcap=2.0, window=(4, 1), alibi_slopes=torch.rand(4)))],
    ids=["causal", "softcap-window-alibi"],
)
def test_paged_varlen_equals_packed(be, page_size, options):
    """The same keys through pages give what packed k/v give, and the reference's numbers;
    a NaN in a spare page or slot past a sequence's keys never reaches the output."""
    cu_q = torch.tensor([0, 3, 3, 12, 17], dtype=torch.int32)  # queries 3, 0, 9, 5
    q = torch.randn(17, 4, 16, dtype=torch.bfloat16)
    k, v, k_cache, v_cache, table, cu_k = _paged([7, 2, 13, 5], page_size)
    with fastlm.use_backend(be):
        got = ops.flash_attention_varlen(
            q, k_cache, v_cache, cu_q, cu_k, 9, 13, block_table=table, **options
        )
        packed = ops.flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 13, **options)
        probs = [
            ops.flash_attention_varlen(
                *qkv, cu_q, cu_k, 9, 13, return_attn_probs=True, **kw, **options
            )[2]
            for qkv, kw in (((q, k_cache, v_cache), dict(block_table=table)), ((q, k, v), {}))
        ]
    assert torch.equal(got, packed)
    assert torch.equal(*probs)  # S_dmask through pages too
    for b in (0, 2, 3):
        rows, cols = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        seq = [t[None, s] for t, s in ((q, rows), (k, cols), (v, cols))]
        ref, _ = ops.attention_ref(*(t.double() for t in seq), **options)
        low = {k: t.to(q.dtype) if isinstance(t, torch.Tensor) else t for k, t in options.items()}
        base, _ = ops.attention_ref(*seq, **low)  # the formula at bf16
        assert_policy(got[None, rows], ref, base.to(q.dtype), f"sequence {b}")


@pytest.mark.parametrize("be", BACKENDS)
def test_paged_varlen_contract(be):
    q = torch.randn(17, 4, 16, dtype=torch.bfloat16)
    cu_q = torch.tensor([0, 3, 3, 12, 17], dtype=torch.int32)
    k, v, k_cache, v_cache, table, cu_k = _paged([7, 2, 13, 5], 4)
    call = lambda **kw: ops.flash_attention_varlen(  # noqa: E731
        *(kw.pop("qkv", (q, k_cache, v_cache))), cu_q, kw.pop("cu_k", cu_k), 9, 13, **kw
    )
    with fastlm.use_backend(be):
        with pytest.raises(TypeError, match="block_table must be an int32 tensor"):
            call(block_table=table.long())
        with pytest.raises(ValueError, match=r"block_table must be \(batch, max_pages\)"):
            call(block_table=table[:3])
        with pytest.raises(ValueError, match="k must be a paged cache"):
            call(qkv=(q, k, v), block_table=table)
        short = table[:, :2].contiguous()
        with pytest.raises(ValueError, match="sequence 2 has 13 keys in pages of 4: 4 pages"):
            call(block_table=short)
        bad = table.clone()
        bad[2, 1] = 99
        with pytest.raises(ValueError, match=r"block_table\[2, 1\] = 99 is not a page of k"):
            call(block_table=bad)
        # Under autograd the forward runs, as flash-attn's (its tests call it so); a backward
        # through it raises on every backend.
        with torch.no_grad():
            expected = call(qkv=(q, k_cache, v_cache), block_table=table)
        out = call(qkv=(q.clone().requires_grad_(), k_cache, v_cache), block_table=table)
        assert torch.equal(out.detach(), expected) and out.requires_grad
        with pytest.raises(RuntimeError, match="block_table: paged K/V attention has no backward"):
            out.sum().backward()


HEAD_DIMS = [59, 111, 160, 192, 224, 256]


@pytest.mark.parametrize(
    "be, d",
    [("torch", d) for d in HEAD_DIMS] + [("triton", 59), ("triton", 224)],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("softcap", [0.0, 5.0], ids=["plain", "softcap"])
def test_head_dims(be, d, softcap):
    """Every head_dim bucket flash-attn ships (odd ones included), forward and backward,
    with and without the cap (the torch backend: SDPA, or the explicit path; Triton: a
    small subset under the interpreter)."""
    q = 2 * torch.randn(2, 9, 2, d, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 13, 1, d, dtype=torch.bfloat16) for _ in "kv")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    do = torch.randn(2, 9, 2, d, dtype=torch.bfloat16)
    with fastlm.use_backend(be):
        out = ops.flash_attention(q, k, v, causal=True, softcap=softcap)
        grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    if softcap:
        _assert_capped(out, grads, q, k, v, do, softcap, causal=True)
    else:
        assert_attention_policy(out, grads, q, k, v, do, causal=True)


def test_torch_dropout_pattern_across_row_chunks(monkeypatch):
    """Chunks of 7 query rows (4 chunks) each draw their part of the keep pattern: out,
    gradients and S_dmask still agree, and the same seed repeats the pattern."""
    monkeypatch.setattr(attention_ops, "_CHUNK_SCORES", 7 * 2 * 40)
    q, k, v = _qkv(b=1, sq=24, sk=40, h=2, hkv=1, d=16)
    do = torch.randn(1, 24, 2, 16, dtype=torch.bfloat16)
    with fastlm.use_backend("torch"):
        out, _, s_dmask = ops.flash_attention(
            q, k, v, dropout_p=0.4, seed=5, softcap=3.0, return_attn_probs=True
        )
        grads = torch.autograd.grad((out * do).sum(), (q, k, v))
        again = ops.flash_attention(q, k, v, dropout_p=0.4, seed=5, softcap=3.0)
    assert torch.equal(again, out)
    _check_s_dmask(out, grads, s_dmask, q, k, v, do, 0.4, 3.0)


# --- issue 21: the fast paths answer as the full checks, and cost nothing in results ---------


def _t(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


# Calls that the fast paths see first: valid ones (their results must be bit-equal) and bad
# ones (the same error, word for word), each building fresh inputs.
_FLASH_CALLS = {
    "plain": lambda: ops.flash_attention(_t(2, 5, 4, 8), _t(2, 7, 2, 8), _t(2, 7, 2, 8)),
    "causal": lambda: ops.flash_attention(_t(1, 6, 2, 8), _t(1, 6, 2, 8), _t(1, 6, 2, 8), True),
    "k dtype": lambda: ops.flash_attention(_t(1, 3, 2, 8), _t(1, 3, 2, 8).double(), _t(1, 3, 2, 8)),
    "k dims": lambda: ops.flash_attention(_t(1, 3, 2, 8), _t(3, 2, 8), _t(3, 2, 8)),
    "head_dim": lambda: ops.flash_attention(_t(1, 3, 2, 8), _t(1, 3, 2, 4), _t(1, 3, 2, 4)),
    "v shape": lambda: ops.flash_attention(_t(1, 3, 2, 8), _t(1, 3, 2, 8), _t(1, 4, 2, 8)),
    "heads": lambda: ops.flash_attention(_t(1, 3, 3, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
    "batch": lambda: ops.flash_attention(_t(2, 3, 2, 8), _t(1, 3, 2, 8), _t(1, 3, 2, 8)),
    "empty head_dim": lambda: ops.flash_attention(_t(1, 3, 2, 0), _t(1, 3, 2, 0), _t(1, 3, 2, 0)),
    "long head_dim": lambda: ops.flash_attention(*(_t(1, 2, 1, 264) for _ in "qkv")),
    "int q": lambda: ops.flash_attention(*(torch.ones(1, 2, 1, 8, dtype=torch.int32),) * 3),
    "list q": lambda: ops.flash_attention([1.0], _t(1, 2, 1, 8), _t(1, 2, 1, 8)),
    "float window": lambda: ops.flash_attention(
        *(_t(1, 2, 1, 8) for _ in "qkv"), window=(-1.0, -1)
    ),
    "list window": lambda: ops.flash_attention(*(_t(1, 4, 1, 8) for _ in "qkv"), window=[1, 0]),
    "bool window": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), window=(True, 0)),
    "softcap int": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), softcap=0),
    "softcap inf": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), softcap=math.inf),
    "softcap < 0": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), softcap=-1.0),
    "dropout 1": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), dropout_p=1.0),
    "dropout int": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), dropout_p=0),
    "flag": lambda: ops.flash_attention(*(_t(1, 2, 1, 8) for _ in "qkv"), deterministic=1),
}
_SDPA_CALLS = {
    "plain": lambda: ops.scaled_dot_product_attention(
        _t(2, 4, 5, 8), _t(2, 4, 7, 8), _t(2, 4, 7, 8)
    ),
    "3-D": lambda: ops.scaled_dot_product_attention(_t(4, 5, 8), _t(4, 7, 8), _t(4, 7, 8)),
    "one kv head": lambda: ops.scaled_dot_product_attention(_t(2, 4, 5, 8), *(_t(2, 1, 7, 8),) * 2),
    "gqa": lambda: ops.scaled_dot_product_attention(
        _t(2, 4, 5, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 8), enable_gqa=True
    ),
    "gqa off": lambda: ops.scaled_dot_product_attention(_t(2, 4, 5, 8), *(_t(2, 2, 7, 8),) * 2),
    "gqa 3 of 4": lambda: ops.scaled_dot_product_attention(
        _t(2, 4, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8), enable_gqa=True
    ),
    "kv batch 1": lambda: ops.scaled_dot_product_attention(_t(2, 4, 5, 8), *(_t(1, 4, 7, 8),) * 2),
    "kv batch 3": lambda: ops.scaled_dot_product_attention(_t(2, 4, 5, 8), *(_t(3, 4, 7, 8),) * 2),
    "v seqlen": lambda: ops.scaled_dot_product_attention(
        _t(2, 4, 5, 8), _t(2, 4, 7, 8), _t(2, 4, 6, 8)
    ),
    "v heads": lambda: ops.scaled_dot_product_attention(
        _t(2, 4, 5, 8), _t(2, 4, 7, 8), _t(2, 2, 7, 8)
    ),
    "2-D": lambda: ops.scaled_dot_product_attention(_t(5, 8), _t(7, 8), _t(7, 8)),
    "dtype": lambda: ops.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 8).half(), _t(2, 7, 8)),
    "head_dim": lambda: ops.scaled_dot_product_attention(_t(2, 5, 0), _t(2, 7, 0), _t(2, 7, 0)),
    "k head_dim": lambda: ops.scaled_dot_product_attention(_t(2, 5, 8), _t(2, 7, 4), _t(2, 7, 8)),
    "dropout int": lambda: ops.scaled_dot_product_attention(*(_t(2, 3, 8),) * 3, dropout_p=0),
    "dropout bad": lambda: ops.scaled_dot_product_attention(*(_t(2, 3, 8),) * 3, dropout_p=1.5),
}


def _outcome(call):
    torch.manual_seed(0)
    try:
        return call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)


def _full_checks_only(monkeypatch):
    from fastlm.ops import attention_kvcache

    monkeypatch.setattr(attention_ops, "_qkv_plain", lambda *args: False)
    monkeypatch.setattr(attention_ops, "_sdpa_plain", lambda *args: False)
    monkeypatch.setattr(attention_kvcache, "_decode_step", lambda *args: None)
    monkeypatch.setattr(attention_kvcache, "_PASSED_STEPS", {})  # and its inline twin
    monkeypatch.setattr(attention_kvcache, "_new_step", lambda *args: None)


@pytest.mark.parametrize(
    "call", [*_FLASH_CALLS.values(), *_SDPA_CALLS.values()], ids=[*_FLASH_CALLS, *_SDPA_CALLS]
)
def test_fast_checks_answer_as_the_full_checks(monkeypatch, call):
    fast = _outcome(call)
    _full_checks_only(monkeypatch)
    full = _outcome(call)
    if isinstance(full, torch.Tensor):
        assert isinstance(fast, torch.Tensor) and torch.equal(fast, full), (fast, full)
    else:
        assert fast == full


def test_the_checked_calls_cover_both_answers():
    """The table above holds calls the contract takes and calls it refuses (else the
    agreement test could pass on errors alone)."""
    outcomes = [_outcome(c) for c in (*_FLASH_CALLS.values(), *_SDPA_CALLS.values())]
    accepted = sum(isinstance(o, torch.Tensor) for o in outcomes)
    assert 8 <= accepted <= len(outcomes) - 12, accepted
    # ... and the fast checks serve the usual calls.
    q = _t(2, 5, 4, 8)
    assert attention_ops._qkv_plain(q, _t(2, 7, 2, 8), _t(2, 7, 2, 8), 4)
    assert attention_ops._sdpa_plain(q, q, q, None, 0.0, False, None, False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_is_plain_sdpa_bit_for_bit(causal, dtype):
    """The torch path of flash_attention (Sq == Sk) and the drop-in SDPA are PyTorch's own
    SDPA call on the layout a user transposes to: the same bits, with and without grad."""
    q, k, v = (torch.randn(2, 19, 4, 16, dtype=dtype, requires_grad=True) for _ in "qkv")
    do = torch.randn(2, 19, 4, 16, dtype=dtype)
    ours = ops.flash_attention(q, k, v, causal=causal)
    plain = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    assert torch.equal(ours, plain)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            torch.autograd.grad(ours, (q, k, v), do),
            torch.autograd.grad(plain, (q, k, v), do),
            strict=True,
        )
    )
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))
    got = ops.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    assert torch.equal(got, F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))


@pytest.mark.parametrize("numel", [37, 5000, 3 * (1 << 14)])  # the equal, max and sum probes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nan_probe_never_misses_a_nan(numel, dtype):
    x = torch.randn(numel, dtype=dtype)
    assert not attention_ops._may_hold_nan(x)
    at = torch.randint(numel, (3,)).tolist()
    x[at[0]] = math.inf  # inf alone is no NaN; a probe may flag inf - inf, never miss NaN
    x[at[1]] = 6e4 if dtype == torch.float16 else 3e38  # sums past the largest finite value
    assert attention_ops._may_hold_nan(x) == x.isnan().any().item() or x.isinf().sum() > 1
    x[at[2]] = math.nan
    assert attention_ops._may_hold_nan(x)
    assert attention_ops._may_hold_nan(x.requires_grad_() if dtype == torch.float32 else x)
    assert not attention_ops._may_hold_nan(torch.empty(0, dtype=dtype))


def test_small_masks_are_kept_per_shape_and_never_shared_wrongly():
    """The cached visibility masks answer as freshly built ones for each shape, window and
    causal flag (and a bottom-right causal Sq < Sk call gives the reference's rows)."""
    from fastlm.ops.masks import visible

    for sq, sk, causal, window in [(3, 5, True, (None, None)), (5, 3, True, (1, None))]:
        for _ in range(2):
            got = attention_ops._visible(sq, sk, causal, window, torch.device("cpu"))
            assert torch.equal(got, visible(sq, sk, causal, window))
    q, k, v = _qkv(b=1, sq=3, sk=6, h=2, hkv=1, d=8, dtype=torch.float32, grad=False)
    out = ops.flash_attention(q, k, v, causal=True)
    ref, _ = ops.attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert_policy(out, ref, ops.attention_ref(q, k, v, causal=True)[0])


def test_eager_op_and_compiled_custom_op_agree_with_gradients(monkeypatch):
    """Forced Triton (the interpreter): plain eager runs the kernels through EagerOp's direct
    path (no dispatcher), torch.compile through the custom ops; same outputs and gradients,
    bit for bit (one kernel, one backward)."""
    q, k, v = _qkv(b=1, sq=5, sk=7, h=2, hkv=1, d=16, dtype=torch.float16)
    do = torch.randn(1, 5, 2, 16, dtype=torch.float16)

    def forward(q, k, v):
        return ops.flash_attention(q, k, v, causal=True)

    def run(fn):
        out = fn(q, k, v)
        return (out, *torch.autograd.grad(out, (q, k, v), do))

    dispatched = []
    real = attention_ops.attention_fwd.op
    monkeypatch.setattr(
        attention_ops.attention_fwd, "op", lambda *a: dispatched.append(1) or real(*a)
    )
    with fastlm.use_backend("triton"):
        eager = run(forward)
        assert dispatched == []  # plain eager: not through the dispatcher
        monkeypatch.undo()
        compiled = run(torch.compile(forward, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_sdpa_keeps_nan_rows_from_this_many_keys(dtype):
    """What lets the torch path skip its NaN-row fill from NAN_SAFE_KEYS keys on (no mask):
    PyTorch's own CPU SDPA then gives a NaN query row NaN, in every case below (row 0, the
    last row, GQA, causal with Sq == Sk, one query). If a PyTorch release changes that,
    this test fails, and the fill's key bound must go."""
    n = attention_ops.NAN_SAFE_KEYS
    for sk in (n, n + 1, 3 * n + 5, 600):
        for sq, causal, kv_heads in ((sk, False, 4), (sk, True, 2), (1, False, 1)):
            q = torch.randn(2, 4, sq, 16, dtype=dtype)
            k, v = (torch.randn(2, kv_heads, sk, 16, dtype=dtype) for _ in "kv")
            rows = sorted({0, sq - 1, int(torch.randint(sq, ()))})
            q[1, 2, rows, 5] = math.nan
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            assert out[1, 2, rows].isnan().all(), (sk, sq, causal, kv_heads)
            # ... and through fastlm (the fill skipped) the same.
            ours = ops.flash_attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal)
            assert ours.transpose(1, 2)[1, 2, rows].isnan().all()
            assert not ours.transpose(1, 2)[0].isnan().any()


@pytest.mark.parametrize("extra", ["bias", "alibi", "both"])
def test_causal_square_calls_with_a_bias_or_alibi_keep_the_triangle(extra):
    """Sq == Sk causal calls take SDPA's is_causal only when there is no explicit mask; with
    a (padding-style) bias or ALiBi the triangle goes into the mask (SDPA refuses both)."""
    q, k, v = _qkv(b=2, sq=5, sk=5, h=2, hkv=1, d=8, dtype=torch.float32, grad=True)
    bias = torch.randn(2, 1, 1, 5) if extra in ("bias", "both") else None
    slopes = torch.rand(2) if extra in ("alibi", "both") else None
    do = torch.randn(2, 5, 2, 8)
    out = ops.flash_attention(q, k, v, causal=True, attn_bias=bias, alibi_slopes=slopes)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    _assert_capped(out, grads, q, k, v, do, 0.0, bias, causal=True, alibi_slopes=slopes)


def test_signature_memo_never_passes_a_bad_call():
    """The metadata checks are remembered per signature: a signature that passed does not
    let a call with another shape, dtype or flag through, a failing one raises the same
    error every time, and a remembered one still takes the path its options ask for."""
    q, k, v = (torch.randn(1, 5, 2, 8, dtype=torch.float64) for _ in "qkv")
    # float64 against the float64 reference: a few roundings per term of 5-key sums.
    tol = dict(rtol=64 * torch.finfo(torch.float64).eps, atol=64 * torch.finfo(torch.float64).eps)
    attention_ops._PASSED_QKV.clear()
    first = ops.flash_attention(q, k, v, causal=True)
    assert len(attention_ops._PASSED_QKV) == 1
    out = ops.flash_attention(q, k, v, causal=True)  # answered from the memo
    assert torch.equal(out, first)
    ref, ref_lse = attention_ops.attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, **tol)
    # Same signature, other options: the lse asked for, soft-capped, not causal.
    got, lse = ops.flash_attention(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(got, ref, **tol)
    eps32 = torch.finfo(torch.float32).eps  # the lse is float32: one rounding each side
    torch.testing.assert_close(lse, ref_lse.float(), rtol=2 * eps32, atol=2 * eps32)
    capped = ops.flash_attention(q, k, v, causal=True, softcap=0.5)
    torch.testing.assert_close(
        capped, attention_ops.attention_ref(q, k, v, causal=True, softcap=0.5)[0], **tol
    )
    full = ops.flash_attention(q, k, v)
    torch.testing.assert_close(full, attention_ops.attention_ref(q, k, v)[0], **tol)
    for bad, err, match in [
        ((q, k[:, :, :1].expand(1, 5, 1, 8), v), ValueError, "same shape"),
        ((q, k.float(), v), TypeError, "k is torch.float32"),
        ((q, k, v[..., :4]), ValueError, "same shape|head_dim"),
        ((q[0], k, v), ValueError, "q must be"),
        ((q, None, v), TypeError, "k must be a torch.Tensor"),
    ]:
        for _ in range(2):  # never remembered as a pass
            with pytest.raises(err, match=match):
                ops.flash_attention(*bad, causal=True)
    assert len(attention_ops._PASSED_QKV) == 1
    with pytest.raises(TypeError, match="softmax_scale"):
        ops.flash_attention(q, k, v, softmax_scale="0.5")  # values are checked every call
    with pytest.raises(TypeError, match="return_attn_probs"):
        ops.flash_attention(q, k, v, return_attn_probs=1)


def test_sdpa_signature_memo_keeps_enable_gqa_and_value_checks():
    """A grouped-query signature remembered with enable_gqa=True still refuses the same
    shapes without it; dropout_p and scale are checked on every call."""
    q = torch.randn(1, 4, 3, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 3, 8, dtype=torch.float64) for _ in "kv")
    attention_ops._PASSED_SDPA.clear()
    for _ in range(2):
        got = ops.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        assert torch.equal(got, want)
    for _ in range(2):
        with pytest.raises(ValueError, match="enable_gqa=True"):
            ops.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="dropout_p"):
        ops.scaled_dot_product_attention(q, k, v, dropout_p=1.5, enable_gqa=True)
    with pytest.raises(ValueError, match="scale must be finite"):
        ops.scaled_dot_product_attention(q, k, v, scale=math.inf, enable_gqa=True)
    # A NaN query row after a NaN-free call of the same signature: still NaN.
    q[0, 1, 2, 3] = math.nan
    got = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert got[0, 1, 2].isnan().all() and not got[0, 0].isnan().any(), got[0, :, :, 0]


def test_signature_memo_is_bounded():
    x = [torch.randn(1, s, 1, 4) for s in range(1, SIGNATURES_KEPT + 3)]
    for t in x:
        ops.flash_attention(t, t, t)
    assert 0 < len(attention_ops._PASSED_QKV) <= SIGNATURES_KEPT
