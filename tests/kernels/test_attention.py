"""Flash attention kernels against the float64 reference, under the numerical policy.

The interpreter runs the Triton kernels on the CPU; on a GPU the same tests run compiled.
PyTorch's own error (the policy's baseline) is ``F.scaled_dot_product_attention`` at the
test dtype, given the same masks and bias as one additive float mask.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import attention as kernels

from fastlm.ops.attention import attention_ref
from fastlm.testing import assert_policy, poisoned_outputs

DTYPES = [torch.float16, torch.bfloat16]


def _visible(seqlen_q, seqlen_k, causal, window, device):
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    diag = i + seqlen_k - seqlen_q
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible, diag - j


def _sdpa_baseline(q, k, v, causal, scale, window, bias, alibi):
    """PyTorch's SDPA at the inputs' dtype, (B, S, H, D) layout, with one additive mask."""
    visible, distance = _visible(q.shape[1], k.shape[1], causal, window, q.device)
    mask = torch.zeros(visible.shape, dtype=torch.float32, device=q.device)
    mask = mask.masked_fill(~visible, float("-inf"))
    if bias is not None:
        mask = mask + bias.float()
    if alibi is not None:
        mask = mask - alibi.float().reshape(-1, q.shape[2], 1, 1) * distance.abs()
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.to(q.dtype),
        scale=scale, enable_gqa=True,
    )  # fmt: skip
    return out.transpose(1, 2)


def _grad_scales(q, k, v, do, out, probs, scale):
    """Floors' scales for dq, dk, dv: the largest sums of |terms| each gradient adds up,
    ``dS = P * (dP - delta)`` then ``dq = scale * dS k``, ``dk = scale * dS^T q``,
    ``dv = P^T dO``. They cancel (a single key gives dq = 0 exactly), so one ulp of the
    terms, not of the result, is what rounding can cost."""
    group = q.shape[2] // k.shape[2]
    k, v = (t.double().repeat_interleave(group, dim=2) for t in (k, v))
    do, out = do.double(), out.double()
    dp = torch.einsum("bqhd,bkhd->bhqk", do, v).abs()
    delta = (do * out).sum(-1).transpose(1, 2).abs()[..., None]
    terms = probs * (dp + delta)  # (B, H, Sq, Sk)
    dq = scale * terms.sum(-1).max() * k.abs().max()
    dk = scale * terms.sum(-2).max() * q.double().abs().max()
    dv = (probs.sum(-2).max() * do.abs().max()).item()
    return dq.item(), dk.item(), dv


def run_case(device, b, sq, sk, h, hkv, d, dtype, causal=False, window=(-1, -1),
             bias_shape=None, alibi=False):  # fmt: skip
    """Forward and backward through the Triton kernels, checked against the reference."""
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, sk, hkv, d, dtype=dtype, device=device) for _ in range(2))
    do = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=dtype, device=device)
    slopes = torch.rand(h, device=device) if alibi else None
    scale = 1.0 / math.sqrt(d)
    args = kernels.AttentionArgs(causal, scale, kernels.window_bounds(window), 0.0, 0)
    bias4 = None if bias is None else bias.expand(b, h, sq, sk)
    slopes2 = None if slopes is None else slopes.expand(b, h)

    with poisoned_outputs():
        out, lse = kernels.attention_fwd(q, k, v, args, bias=bias4, alibi_slopes=slopes2)
        dq, dk, dv, dbias = kernels.attention_bwd(do, q, k, v, out, lse, args, bias=bias4,
                                                  bias_grad=bias is not None,
                                                  alibi_slopes=slopes2)  # fmt: skip

    def grads(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        b_ = None if bias is None else bias.detach().to(dt).requires_grad_()
        if dt == torch.float64:
            o, lse_ = attention_ref(*leaves, causal, scale, window, b_, slopes)
        else:
            o, lse_ = _sdpa_baseline(*leaves, causal, scale, window, b_, slopes), None
        wanted = leaves + ([b_] if b_ is not None else [])
        return o, lse_, torch.autograd.grad((o * do.to(dt)).sum(), wanted)

    ref_out, ref_lse, ref_grads = grads(torch.float64)
    base_out, _, base_grads = grads(dtype)
    eye = torch.eye(sk, dtype=torch.float64, device=device)[None, :, None, :].expand(b, sk, hkv, sk)
    probs = attention_ref(
        q.double(),
        k.double(),
        eye,
        causal,
        scale,
        window,
        None if bias is None else bias.double(),
        slopes,
    )[0].transpose(1, 2)
    scales = _grad_scales(q, k, v, do, ref_out, probs, scale)  # fmt: skip
    assert_policy(out, ref_out, base_out, "out")
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), visible), "rows with no visible key must be -inf"
    torch.testing.assert_close(lse[visible].double(), ref_lse[visible], rtol=0, atol=1e-5)
    for name, got, ref, base, floor_scale in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads,
                                                 base_grads, scales, strict=False):  # fmt: skip
        assert_policy(got, ref, base, name, scale=floor_scale)
    if bias is not None:
        reduce_dims = tuple(i for i, n in enumerate(bias.shape) if n == 1)
        got = dbias.sum(reduce_dims, keepdim=True) if reduce_dims else dbias
        assert_policy(got.to(dtype), ref_grads[3], base_grads[3], "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b, sq, sk, h, hkv, d",
    [
        (2, 37, 45, 4, 2, 40),  # GQA, odd lengths, head_dim not a power of two
        (1, 1, 1, 2, 2, 16),  # one token
        (2, 70, 33, 3, 1, 64),  # MQA, more queries than keys
        (1, 19, 130, 2, 2, 80),  # keys span several blocks
        (1, 9, 9, 2, 1, 96),
        (1, 5, 21, 1, 1, 160),
        (1, 6, 7, 1, 1, 256),
    ],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_matches_reference(device_backend, dtype, b, sq, sk, h, hkv, d, causal):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    run_case(device, b, sq, sk, h, hkv, d, dtype, causal=causal)


@pytest.mark.parametrize(
    "window, causal", [((5, 3), False), ((7, -1), True), ((0, 0), False), ((-1, 4), False)]
)
def test_sliding_window(device_backend, window, causal):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    run_case(device, 2, 33, 41, 4, 2, 32, torch.bfloat16, causal=causal, window=window)


@pytest.mark.parametrize("bias_shape", [(2, 4, 23, 29), (1, 4, 23, 29), (1, 1, 23, 29),
                                        (2, 1, 1, 29)])  # fmt: skip
def test_bias_and_its_gradient(device_backend, bias_shape):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    run_case(device, 2, 23, 29, 4, 2, 32, torch.float16, causal=True, bias_shape=bias_shape)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(device_backend, causal):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    run_case(device, 2, 31, 47, 4, 4, 32, torch.bfloat16, causal=causal, alibi=True)


def test_rows_with_no_visible_key_are_zero(device_backend):
    """Causal with more queries than keys: the first rows see nothing. Zeros, no NaN."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    q = torch.randn(1, 9, 2, 16, dtype=torch.float16, device=device, requires_grad=False)
    k, v = (torch.randn(1, 4, 2, 16, dtype=torch.float16, device=device) for _ in range(2))
    args = kernels.AttentionArgs(True, 0.25, (None, None), 0.0, 0)
    out, lse = kernels.attention_fwd(q, k, v, args)
    dq, dk, dv, _ = kernels.attention_bwd(torch.ones_like(out), q, k, v, out, lse, args)
    empty = slice(0, 5)  # query i sees keys j <= i - 5
    assert torch.all(out[:, empty] == 0) and torch.all(torch.isneginf(lse[:, :, empty]))
    assert torch.all(dq[:, empty] == 0)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


def _recover_dropout(device, seed, p, causal, bias=None):
    """Run with V = identity so the output rows are the dropped probabilities themselves."""
    b, s, h, d = 1, 32, 2, 32
    q, k = (torch.randn(b, s, h, d, device=device) for _ in range(2))
    eye = torch.eye(s, device=device)[None, :, None, :].expand(b, s, h, s).contiguous()
    args = kernels.AttentionArgs(causal, 1.0 / math.sqrt(d), (None, None), p, seed)
    out, lse = kernels.attention_fwd(q, k, eye, args, bias=bias)
    return q, k, eye, args, out, lse


def test_dropout_keep_rate_mask_and_gradients(device_backend):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    p = 0.3
    q, k, eye, args, out, lse = _recover_dropout(device, 1234, p, causal=False)
    keep = out.permute(0, 2, 1, 3) > 0  # (B, H, Sq, Sk); every probability here is > 0
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    ref_out, _ = attention_ref(q.double(), k.double(), eye.double(), dropout_mask=keep,
                               dropout_p=p)  # fmt: skip
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    do = torch.randn_like(out)
    dq, dk, dv, _ = kernels.attention_bwd(do, q, k, eye, out, lse, args)
    leaves = [t.double().requires_grad_() for t in (q, k, eye)]
    ref_out, _ = attention_ref(*leaves, dropout_mask=keep, dropout_p=p)
    ref = torch.autograd.grad((ref_out * do.double()).sum(), leaves)
    for got, want in zip((dq, dk, dv), ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dropout_with_bias_and_its_gradient(device_backend):
    """bias + dropout + causal: the backward regenerates the forward's mask, and dBias is the
    gradient of the kept, rescaled probabilities."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    p = 0.25
    bias = torch.randn(1, 2, 32, 32, device=device).expand(1, 2, 32, 32)
    q, k, eye, args, out, lse = _recover_dropout(device, 99, p, causal=True, bias=bias)
    keep = out.permute(0, 2, 1, 3) > 0
    do = torch.randn_like(out)
    dq, dk, dv, dbias = kernels.attention_bwd(do, q, k, eye, out, lse, args, bias=bias,
                                              bias_grad=True)  # fmt: skip
    leaves = [t.double().requires_grad_() for t in (q, k, eye, bias)]
    ref_out, _ = attention_ref(*leaves[:3], causal=True, attn_bias=leaves[3],
                               dropout_mask=keep, dropout_p=p)  # fmt: skip
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    ref = torch.autograd.grad((ref_out * do.double()).sum(), leaves)
    for got, want in zip((dq, dk, dv, dbias), ref, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_dropout_is_reproducible_by_seed(device_backend):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    first = _recover_dropout(device, 7, 0.5, causal=True)[4]
    again = _recover_dropout(device, 7, 0.5, causal=True)[4]
    other = _recover_dropout(device, 8, 0.5, causal=True)[4]
    assert torch.equal(first > 0, again > 0)
    assert not torch.equal(first > 0, other > 0)


def test_varlen_matches_per_sequence_dense(device_backend):
    """Packed sequences give what each sequence alone gives (causal, GQA, bias-free)."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("attention has no CUDA C++ kernel")
    lens_q, lens_k = [5, 1, 17, 0, 9], [7, 3, 17, 4, 2]
    h, hkv, d = 4, 2, 32
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lens_q), h, d, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(sum(lens_k), hkv, d, dtype=torch.bfloat16, device=device)
            for _ in range(2))  # fmt: skip
    do = torch.randn_like(q)
    args = kernels.AttentionArgs(True, 1.0 / math.sqrt(d), (None, None), 0.0, 0)
    packed = dict(cu_seqlens_q=cu_q.to(device), cu_seqlens_k=cu_k.to(device),
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))  # fmt: skip
    with poisoned_outputs():
        out, lse = kernels.attention_fwd(q, k, v, args, **packed)
        dq, dk, dv, _ = kernels.attention_bwd(do, q, k, v, out, lse, args, **packed)
    for i, lq in enumerate(lens_q):
        rows, cols = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lq == 0:
            continue
        leaves = [t[None, s].detach().double().requires_grad_()
                  for t, s in ((q, rows), (k, cols), (v, cols))]  # fmt: skip
        ref_out, ref_lse = attention_ref(*leaves, causal=True)
        ref = torch.autograd.grad((ref_out * do[None, rows].double()).sum(), leaves)
        tol = dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out[rows].double(), ref_out[0], **tol)
        visible = torch.isfinite(ref_lse[0])
        torch.testing.assert_close(lse[:, rows][visible].double(), ref_lse[0][visible], **tol)
        for got, want in zip((dq[rows], dk[cols], dv[cols]), ref, strict=True):
            torch.testing.assert_close(got.double(), want[0], **tol)
