"""fastlm.ops attention: the public functions, both backends, autograd, compile, bad input.

Numerics of the kernels themselves are in tests/kernels/test_attention.py; here the torch
backend (CPU default) and the Triton kernels (forced: the interpreter) must agree with the
reference and with each other through the public API.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend, ops

BACKENDS = ["torch", "triton"]
TOL = dict(rtol=3e-2, atol=3e-2)  # bf16 outputs against the fp64 reference


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
        out, lse = ops.flash_attention(q, k, v, causal=True, window=(6, -1), attn_bias=bias,
                                       alibi_slopes=slopes, return_lse=True)  # fmt: skip
        grads = torch.autograd.grad((out * do).sum(), (q, k, v, bias))
    ref_out, ref_lse, ref_grads = _ref_grads(q, k, v, do, bias, causal=True, window=(6, -1),
                                             alibi_slopes=slopes)  # fmt: skip
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-3, atol=1e-3)
    assert grads[3].shape == bias.shape  # summed over the broadcast dims
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL)


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
        leaves = [t[None, rows].detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = ops.attention_ref(*leaves, causal=True)
        ref_grads = torch.autograd.grad(ref.sum(), leaves)
        torch.testing.assert_close(out[rows].double(), ref[0], **TOL)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got[rows].double(), want[0], **TOL)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "mask_kind, is_causal, sq, sk",
    [("none", False, 9, 9), ("none", True, 7, 12), ("none", True, 12, 7), ("bool", False, 9, 11),
     ("float", False, 9, 11)],
)  # fmt: skip
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
        got = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=True)  # fmt: skip
    f32 = [t.float() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(
        *f32, attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.float(),
        is_causal=is_causal, enable_gqa=True,
    )  # fmt: skip
    if is_causal and sq > sk:  # rows that see no key: torch's math gives NaN, fastlm zeros
        want = want.nan_to_num(0.0)
    torch.testing.assert_close(got.float(), want, **TOL)


def test_multihead_attention_fast_path_uses_fastlm_sdpa(monkeypatch):
    calls = []
    real = ops.scaled_dot_product_attention
    monkeypatch.setattr(ops, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))  # fmt: skip
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
    fn = torch.compile(lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
                       fullgraph=True, backend="aot_eager")  # fmt: skip
    with fastlm.use_backend("triton"):
        torch.testing.assert_close(fn(q, k, v), ops.flash_attention(q, k, v, causal=True))


def test_opcheck_forward_op():
    q, k, v = _qkv(b=1, sq=5, sk=6, h=2, hkv=1, d=16, dtype=torch.float16)
    args = (q, k, v, None, None, None, None, 5, 6, True, 0.25, None, 0, 0.0, 0, "triton")
    torch.library.opcheck(torch.ops.fastlm.attention_fwd.default, args)


@pytest.mark.parametrize(
    "make, error, word",
    [
        (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "head_dim"),
        (lambda q, k, v: (q[:, :, :3], k, v), ValueError, "heads"),
        (lambda q, k, v: (q, k.float(), v), TypeError, "k"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v"),
        (lambda q, k, v: (q.expand(2, 13, 4, 32)[..., :1].repeat(1, 1, 1, 300), k, v),
         ValueError, "head_dim"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q"),
    ],
)  # fmt: skip
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
            out = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new,
                                             causal=causal)  # fmt: skip
        for i, n in enumerate(lengths.tolist()):
            assert torch.equal(k_cache[i, n : n + 2], k_new[i])
            assert torch.equal(v_cache[i, n : n + 2], v_new[i])
        results[be] = out
    torch.testing.assert_close(results["torch"], results["triton"], **TOL)


def test_kvcache_decode_step_compiles_fullgraph():
    q = torch.randn(2, 1, 4, 16, dtype=torch.float16)
    k_new, v_new = (torch.randn(2, 1, 2, 16, dtype=torch.float16) for _ in range(2))
    lengths = torch.tensor([3, 5], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new):
        return ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new,
                                          causal=True)  # fmt: skip

    caches = [torch.zeros(2, 8, 2, 16, dtype=torch.float16) for _ in range(4)]
    eager = step(q, caches[0], caches[1], k_new, v_new)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
        q, caches[2], caches[3], k_new, v_new
    )
    torch.testing.assert_close(compiled, eager)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
