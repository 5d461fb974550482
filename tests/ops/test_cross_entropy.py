"""fastlm.ops cross_entropy / linear_cross_entropy: both backends, every reduction's
gradients, chunking, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend, ops
from fastlm.ops.cross_entropy import MIN_CHUNK_ROWS, default_chunk_size
from fastlm.testing import assert_loss_policy, assert_policy, summand_scale

BACKENDS_HERE = ["torch", "triton"]  # triton on CPU tensors = the interpreter
REDUCTIONS = ["mean", "sum", "none"]
IGNORE = -100


def _targets(n, v, ignored=(1,)):
    t = torch.randint(0, v, (n,))
    t[list(ignored)] = IGNORE
    return t


def _grad_out(loss):
    # Non-uniform for "none": each row's gradient must be weighted by its own grad_output.
    return torch.rand_like(loss) + 0.5


def _grads(loss, leaves, g):
    return torch.autograd.grad(loss, leaves, g)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_loss_and_gradient(be, reduction, dtype):
    n, v, eps, z = 11, 301, 0.1, 1e-3
    x = (3 * torch.randn(n, v)).to(dtype).requires_grad_()
    t = _targets(n, v)
    with fastlm.use_backend(be):
        loss = ops.cross_entropy(x, t, IGNORE, eps, reduction, z)
    g = _grad_out(loss.float()).to(dtype)
    (dx,) = _grads(loss, [x], g)
    x64 = x.detach().double().requires_grad_()
    ref = ops.cross_entropy_ref(x64, t, IGNORE, eps, reduction, z)
    (ref_dx,) = _grads(ref, [x64], g.double())
    xb = x.detach().requires_grad_()
    base = F.cross_entropy(xb, t, ignore_index=IGNORE, reduction=reduction, label_smoothing=eps)
    zr = z * torch.logsumexp(xb, -1) ** 2 * (t != IGNORE)
    base = base + {"none": zr, "sum": zr.sum(), "mean": zr.sum() / (t != IGNORE).sum()}[
        reduction
    ].to(dtype)
    (base_dx,) = _grads(base, [xb], g)
    assert loss.dtype == dtype and loss.shape == ref.shape
    # Floor: each row's loss carries up to a unit of its own rounding, and a reduction adds
    # those up: the reduction length times the largest row's loss; "mean" divides that by
    # the length and rounds once more.
    largest = ops.cross_entropy_ref(x64.detach(), t, IGNORE, eps, "none", z).abs().max().item()
    loss_scale = None
    if reduction == "sum":
        loss_scale = int((t != IGNORE).sum()) * largest
    elif reduction == "mean":
        loss_scale = largest + ref.abs().item()
    assert_policy(loss, ref, base.detach(), "loss", scale=loss_scale)
    # Floor: an ulp of the terms (|dlogits| <= 2 |g|) and of the float32 lse the backward
    # reads (see grad_scale in tests/kernels/test_cross_entropy.py).
    big = torch.logsumexp(x64.detach(), -1).abs().max().item()
    assert_policy(dx, ref_dx, base_dx, "dlogits", scale=2.0 * g.abs().max().item() * (1 + big))


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_cross_entropy_equals_torch_without_z_loss(be):
    x = torch.randn(9, 50, requires_grad=True)
    t = _targets(9, 50, (0, 4))
    with fastlm.use_backend(be):
        got = ops.cross_entropy(x, t, label_smoothing=0.2)
    torch.testing.assert_close(got, F.cross_entropy(x, t, label_smoothing=0.2))


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(3, 10)
    t = torch.full((3,), IGNORE)
    for be in BACKENDS_HERE:
        with fastlm.use_backend(be):
            assert ops.cross_entropy(x, t).isnan()
    assert F.cross_entropy(x, t).isnan()


def test_cross_entropy_class_weight_torch_only():
    x, w = torch.randn(6, 8), torch.rand(8)
    t = _targets(6, 8)
    with fastlm.use_backend("torch"):
        got = ops.cross_entropy(x, t, weight=w, label_smoothing=0.1, z_loss=1e-2)
    ref = ops.cross_entropy_ref(x.double(), t, IGNORE, 0.1, "mean", 1e-2, weight=w.double())
    torch.testing.assert_close(got, ref.float())  # a float32 result
    torch.testing.assert_close(
        ops.cross_entropy_ref(x.double(), t, IGNORE, 0.1, "mean", 0.0, w.double()),
        F.cross_entropy(x.double(), t, w.double(), label_smoothing=0.1),
    )
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="weight"):
        ops.cross_entropy(x, t, weight=w)


def _linear_case(be, reduction, dtype, n, h, v, chunk, bias=True, eps=0.1, z=1e-3):
    hid = torch.randn(n, h).to(dtype).requires_grad_()
    w = (torch.randn(v, h) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_() if bias else None
    t = _targets(n, v, (0, n - 2))
    leaves = [p for p in (hid, w, b) if p is not None]
    with fastlm.use_backend(be):
        loss = ops.linear_cross_entropy(hid, w, t, b, IGNORE, eps, reduction, z, chunk)
    g = _grad_out(loss.float()).to(dtype)
    got = _grads(loss, leaves, g)

    def unfused(leaves_, reference):
        lin = F.linear(*leaves_)
        if reference:
            return ops.cross_entropy_ref(lin, t, IGNORE, eps, reduction, z)
        with fastlm.use_backend("torch"):
            return ops.cross_entropy(lin, t, IGNORE, eps, reduction, z)

    l64 = [p.detach().double().requires_grad_() for p in leaves]
    ref = unfused(l64, True)
    ref_g = _grads(ref, l64, g.double())
    lb = [p.detach().requires_grad_() for p in leaves]
    base = unfused(lb, False)
    base_g = _grads(base, lb, g)
    assert loss.dtype == dtype and loss.shape == ref.shape
    # A reduced loss adds one rounding per chunk's partial sum: one ulp of the total per chunk.
    chunks = -(-n // (chunk or n)) if reduction != "none" else 1
    loss_scale = chunks * summand_scale(ref.detach(), 0)
    assert_policy(loss, ref, base.detach(), "loss", scale=loss_scale)
    # Floors at the scale of the summed terms (|dlogits| <= 2 |g|): d_hidden sums over
    # classes, d_weight and d_bias over tokens.
    g2 = 2 * g.abs().max().item()
    scales = (
        g2 * summand_scale(l64[1].detach(), 0),
        g2 * summand_scale(l64[0].detach(), 0),
        g2 * n,
    )
    for name, a, r, bs, sc in zip(
        ("dhidden", "dweight", "dbias"), got, ref_g, base_g, scales, strict=False
    ):
        assert a.dtype == dtype
        assert_policy(a, r, bs, name, scale=sc)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_cross_entropy_matches_unfused(be, reduction, bias):
    _linear_case(be, reduction, torch.float32, n=37, h=24, v=203, chunk=8, bias=bias)


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_linear_cross_entropy_bf16(be):
    _linear_case(be, "mean", torch.bfloat16, n=19, h=32, v=130, chunk=6)


@pytest.mark.parametrize("chunk", [1, 5, 64, None])
def test_linear_cross_entropy_chunking_does_not_change_the_result(chunk):
    hid, w = torch.randn(23, 16), torch.randn(97, 16)
    t = _targets(23, 97)
    one = ops.linear_cross_entropy(hid, w, t, chunk_size=23)
    got = ops.linear_cross_entropy(hid, w, t, chunk_size=chunk)
    # The same float32 math in other GEMM shapes and summation orders: against the float64
    # run, from the rounding error of float32 logits.
    ref = ops.linear_cross_entropy(hid.double(), w.double(), t, chunk_size=23)
    logits, logits64 = F.linear(hid, w), F.linear(hid.double(), w.double())
    assert_loss_policy(got, ref, logits, logits64, f"loss, chunk {chunk}")
    assert_loss_policy(one, ref, logits, logits64, "loss, one chunk")


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_linear_cross_entropy_fp32_loss_from_bf16(be):
    h = torch.randn(37, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50, 24, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    with fastlm.use_backend(be):
        rounded = ops.linear_cross_entropy(h, w, t)
        exact = ops.linear_cross_entropy(h, w, t, out_dtype=torch.float32)
        grads = torch.autograd.grad(exact, (h, w))
        rounded_grads = torch.autograd.grad(rounded, (h, w))
    assert rounded.dtype == torch.bfloat16 and exact.dtype == torch.float32
    assert exact.to(torch.bfloat16) == rounded  # the same fp32 sum, rounded or not
    for a, b in zip(grads, rounded_grads, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="out_dtype"):
        ops.linear_cross_entropy(h, w, t, out_dtype=torch.int32)


def test_linear_cross_entropy_default_chunk_size():
    assert default_chunk_size(8192, 768, 32000) == 256
    assert default_chunk_size(1, 768, 32000) == MIN_CHUNK_ROWS  # one chunk: all rows
    assert default_chunk_size(508, 128, 50257) == MIN_CHUNK_ROWS


def test_linear_cross_entropy_no_grad():
    hid, w = torch.randn(7, 8, requires_grad=True), torch.randn(13, 8, requires_grad=True)
    t = _targets(7, 13)
    with torch.no_grad():
        a = ops.linear_cross_entropy(hid, w, t)
    torch.testing.assert_close(a, F.cross_entropy(F.linear(hid, w), t))


def test_linear_cross_entropy_float64_gradcheck():
    hid = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = _targets(5, 7)
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda h_, w_, b_, r=reduction: ops.linear_cross_entropy(
                h_, w_, t, b_, label_smoothing=0.1, reduction=r, z_loss=1e-2, chunk_size=2
            ),
            (hid, w, b),
        )


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_torch_compile_fullgraph(be):
    torch.compiler.reset()
    hid, w = torch.randn(9, 8, requires_grad=True), torch.randn(17, 8, requires_grad=True)
    t = _targets(9, 17)

    def f(hid, w):
        logits = hid @ w.t()
        return ops.cross_entropy(logits, t, z_loss=1e-3) + ops.linear_cross_entropy(
            hid, w, t, chunk_size=4
        )

    with fastlm.use_backend(be):
        eager = f(hid, w)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(hid, w)
        got = torch.autograd.grad(compiled, [hid, w])
        want = torch.autograd.grad(f(hid, w), [hid, w])
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_errors_name_the_argument():
    x, t = torch.randn(4, 6), _targets(4, 6)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        ops.cross_entropy(torch.randn(2, 3, 4), t)
    with pytest.raises(TypeError, match="logits must be a floating"):
        ops.cross_entropy(torch.ones(4, 6, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="target must hold integer"):
        ops.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="target must have shape"):
        ops.cross_entropy(x, t[:3])
    with pytest.raises(ValueError, match=r"target\[2\] = 6 is outside"):
        ops.cross_entropy(x, torch.tensor([0, 1, 6, 2]))
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ops.cross_entropy(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        ops.cross_entropy(x, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="weight must be a"):
        ops.cross_entropy(x, t, weight=torch.ones(5))
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        ops.linear_cross_entropy(h[0], w, t)
    with pytest.raises(ValueError, match="weight must be"):
        ops.linear_cross_entropy(h, torch.randn(6, 4), t)
    with pytest.raises(TypeError, match="weight must have hidden.s dtype"):
        ops.linear_cross_entropy(h, w.double(), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear_cross_entropy(h, w, t, torch.randn(5))
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_cross_entropy(h, w, t, chunk_size=0)
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="float64"):
        ops.cross_entropy(x.double(), t)
