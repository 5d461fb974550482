"""fastlm.ops cross_entropy / linear_cross_entropy: both backends, every reduction's
gradients, chunking, torch.compile, bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend, ops
from fastlm.ops._common import SIGNATURES_KEPT
from fastlm.ops.cross_entropy import (
    CPU_ROWS_PER_THREAD,
    MIN_CHUNK_ROWS,
    CrossEntropyOutput,
    cpu_chunk_size,
    default_chunk_size,
)
from fastlm.testing import assert_equal, assert_loss_policy, assert_policy, summand_scale

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


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_cross_entropy_torch_path_is_f_cross_entropy(reduction, target_dtype):
    """Without fastlm's own features the torch path is F.cross_entropy's native op itself:
    the same loss and gradient, bit for bit."""
    x = (3 * torch.randn(11, 50)).requires_grad_()
    t = _targets(11, 50, (3,)).to(torch.int64)
    t[3] = 7 if target_dtype is torch.uint8 else IGNORE  # uint8 cannot hold -100
    ii = 7 if target_dtype is torch.uint8 else IGNORE
    for eps in (0.0, 0.3):
        got = ops.cross_entropy(x, t.to(target_dtype), ii, eps, reduction)
        want = F.cross_entropy(x, t, ignore_index=ii, reduction=reduction, label_smoothing=eps)
        assert_equal(got, want, "loss", "the same native op")
        g = _grad_out(want.detach())
        assert_equal(_grads(got, [x], g)[0], _grads(want, [x], g)[0], "dlogits")


@pytest.mark.parametrize(
    "extra", [{}, {"z_loss": 1e-3}, {"softcap": 3.0}], ids=["plain", "z", "cap"]
)
@pytest.mark.parametrize("bad", [6, -3])
def test_cross_entropy_out_of_range_target_names_the_row(extra, bad):
    """On the CPU the torch path lets the native op's bounds check find a bad target and
    then names it as the contract does, before any result is returned."""
    x = torch.randn(4, 6)
    t = torch.tensor([0, IGNORE, bad, 2])
    for be in BACKENDS_HERE:
        with (
            fastlm.use_backend(be),
            pytest.raises(ValueError, match=rf"target\[2\] = {bad} is outside"),
        ):
            ops.cross_entropy(x, t, **extra)


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(3, 10)
    t = torch.full((3,), IGNORE)
    for be in BACKENDS_HERE:
        with fastlm.use_backend(be):
            assert ops.cross_entropy(x, t).isnan()
    assert F.cross_entropy(x, t).isnan()


def _ce_features_case(be, dtype, reduction, **features):
    """Loss and dlogits of ``cross_entropy`` with ``features`` (weight, softcap, smoothing,
    z-loss) against the float64 reference, the baseline being the same formula at
    ``dtype`` (F.cross_entropy has no soft cap)."""
    n, v = 13, 211
    x = (3 * torch.randn(n, v)).to(dtype).requires_grad_()
    t = _targets(n, v, (1, 7))
    with fastlm.use_backend(be):
        loss = ops.cross_entropy(x, t, IGNORE, reduction=reduction, **features)
    g = _grad_out(loss.float()).to(dtype)
    (dx,) = _grads(loss, [x], g)
    x64 = x.detach().double().requires_grad_()
    f64 = {k: (w.double() if isinstance(w, torch.Tensor) else w) for k, w in features.items()}
    ref = ops.cross_entropy_ref(x64, t, IGNORE, reduction=reduction, **f64)
    (ref_dx,) = _grads(ref, [x64], g.double())
    xb = x.detach().requires_grad_()
    fb = {k: (w.to(dtype) if isinstance(w, torch.Tensor) else w) for k, w in features.items()}
    base = ops.cross_entropy_ref(xb, t, IGNORE, reduction=reduction, **fb)
    (base_dx,) = _grads(base, [xb], g)
    assert loss.dtype == dtype and loss.shape == ref.shape
    # Floors as test_cross_entropy_loss_and_gradient, the rows' scale times the largest
    # class weight.
    rows = ops.cross_entropy_ref(x64.detach(), t, IGNORE, reduction="none", **f64)
    largest = rows.abs().max().item()
    loss_scale = {"none": None, "sum": int((t != IGNORE).sum()) * largest}.get(
        reduction, largest + ref.abs().max().item()
    )
    assert_policy(loss, ref, base.detach(), "loss", scale=loss_scale)
    w_max = features["weight"].abs().max().item() if "weight" in features else 1.0
    big = torch.logsumexp(x64.detach(), -1).abs().max().item()
    grad_scale = 2.0 * g.abs().max().item() * (1 + big) * w_max
    assert_policy(dx, ref_dx, base_dx, "dlogits", scale=grad_scale)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_class_weights(be, reduction):
    w = torch.rand(211) + 0.1
    _ce_features_case(be, torch.float32, reduction, weight=w, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_softcap(be, dtype):
    _ce_features_case(be, dtype, "mean", softcap=4.0, label_smoothing=0.1, z_loss=1e-3)


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_cross_entropy_softcap_and_weights_per_row(be):
    w = torch.rand(211) + 0.1
    _ce_features_case(be, torch.bfloat16, "none", weight=w, softcap=6.0, label_smoothing=0.2)


def test_class_weight_reference_is_torch():
    x, w = torch.randn(6, 8, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    t = _targets(6, 8)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(
            ops.cross_entropy_ref(x, t, IGNORE, 0.1, reduction, 0.0, w),
            F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1),
        )


def _linear_case(
    be,
    reduction,
    dtype,
    n,
    h,
    v,
    chunk,
    bias=True,
    eps=0.1,
    z=1e-3,
    weighted=False,
    softcap=None,
    ignored=True,
):
    hid = torch.randn(n, h).to(dtype).requires_grad_()
    w = (torch.randn(v, h) / h**0.5).to(dtype).requires_grad_()
    b = torch.randn(v).to(dtype).requires_grad_() if bias else None
    t = _targets(n, v, (0, n - 2) if ignored else ())
    cw = torch.rand(v) + 0.1 if weighted else None
    extra = dict(ce_weight=cw, softcap=softcap)
    leaves = [p for p in (hid, w, b) if p is not None]
    with fastlm.use_backend(be):
        loss = ops.linear_cross_entropy(hid, w, t, b, IGNORE, eps, reduction, z, chunk, **extra)
    g = _grad_out(loss.float()).to(dtype)
    got = _grads(loss, leaves, g)

    def unfused(leaves_, reference):
        lin = F.linear(*leaves_)
        if reference:
            cw64 = None if cw is None else cw.double()
            return ops.cross_entropy_ref(lin, t, IGNORE, eps, reduction, z, cw64, softcap)
        with fastlm.use_backend("torch"):
            return ops.cross_entropy(lin, t, IGNORE, eps, reduction, z, cw, softcap)

    l64 = [p.detach().double().requires_grad_() for p in leaves]
    ref = unfused(l64, True)
    ref_g = _grads(ref, l64, g.double())
    lb = [p.detach().requires_grad_() for p in leaves]
    base = unfused(lb, False)
    base_g = _grads(base, lb, g)
    assert loss.dtype == dtype and loss.shape == ref.shape
    # A reduced loss adds one rounding per chunk's partial sum, and the sum of a chunk's n
    # rows up to ceil(log2(n)) more (pairwise): one ulp of the total each.
    chunks = -(-n // (chunk or n)) if reduction != "none" else 1
    roundings = chunks + (math.ceil(math.log2(min(n, chunk or n))) if reduction != "none" else 0)
    loss_scale = roundings * summand_scale(ref.detach(), 0)
    assert_policy(loss, ref, base.detach(), "loss", scale=loss_scale)
    # Floors at the scale of the summed terms (|dlogits| <= 2 |g|): d_hidden sums over
    # classes, d_weight and d_bias over tokens.
    g2 = 2 * g.abs().max().item() * (1.0 if cw is None else cw.max().item())
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


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_class_weights_and_softcap(be, reduction):
    _linear_case(
        be, reduction, torch.float32, n=29, h=16, v=150, chunk=8, weighted=True, softcap=3.0
    )


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_linear_cross_entropy_softcap_bf16(be):
    _linear_case(be, "mean", torch.bfloat16, n=19, h=32, v=130, chunk=6, softcap=2.5)


# Each feature alone and all together, through the torch path's in-forward gradients ("mean",
# "sum") and its recomputing backward ("none"): the softmax factor, the one-hot, the smoothing
# column and the cap's derivative are separate in-place steps there.
_FEATURES = {
    "plain": dict(eps=0.0, z=0.0),
    "plain-no-ignored": dict(eps=0.0, z=0.0, ignored=False),
    "smoothing": dict(eps=0.2, z=0.0),
    "smoothing-no-ignored": dict(eps=0.2, z=0.0, ignored=False),
    "z-loss": dict(eps=0.0, z=1e-2),
    "weights": dict(eps=0.0, z=0.0, weighted=True),
    "weights-smoothing": dict(eps=0.2, z=0.0, weighted=True),
    "softcap": dict(eps=0.0, z=0.0, softcap=2.0),
    "all": dict(eps=0.2, z=1e-2, weighted=True, softcap=2.0),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("features", list(_FEATURES), ids=list(_FEATURES))
def test_linear_cross_entropy_torch_path_features(features, reduction):
    _linear_case(
        "torch", reduction, torch.float32, n=21, h=12, v=67, chunk=8, **_FEATURES[features]
    )


@pytest.mark.parametrize(
    "n, chunk",
    [(37, 1), (37, 8), (32, 8), (37, 37), (37, 64)],
    ids=["chunk-1", "ragged-last", "even", "one-exact", "under-one"],
)
def test_linear_cross_entropy_chunk_boundaries(n, chunk):
    _linear_case("torch", "mean", torch.float32, n=n, h=8, v=45, chunk=chunk)


def _largest_allocation(fn) -> int:
    """The largest single CPU allocation an op makes while ``fn`` runs (bytes)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "hidden+weight", "none"])
def test_linear_cross_entropy_computes_only_the_gradients_asked_for(needs):
    """The in-forward gradients are those of the inputs that require grad: equal to the
    ones an all-grad call gives (the same computation), and no (V, H) d_weight buffer when
    the weight needs none."""
    n, h, v = 24, 16, 509  # d_weight, V * H floats, is 4x the largest other buffer
    hid, w, b = torch.randn(n, h), torch.randn(v, h) / 4, torch.randn(v)
    t = _targets(n, v)
    full = [p.clone().requires_grad_() for p in (hid, w, b)]
    want = _grads(ops.linear_cross_entropy(full[0], full[1], t, full[2], chunk_size=8), full, None)
    some = [
        p.clone().requires_grad_(name in needs)
        for p, name in zip((hid, w, b), ("hidden", "weight", "bias"), strict=True)
    ]

    def call():
        return ops.linear_cross_entropy(some[0], some[1], t, some[2], chunk_size=8)

    biggest = _largest_allocation(call)
    dw_bytes = v * h * 4
    if "weight" in needs:
        assert biggest >= dw_bytes, biggest
    else:
        assert biggest < dw_bytes, f"a {biggest}-byte allocation; d_weight is {dw_bytes}"
    loss = call()
    assert_equal(loss, ops.linear_cross_entropy(hid, w, t, b, chunk_size=8), "loss")
    leaves = [p for p in some if p.requires_grad]
    assert loss.requires_grad == bool(leaves)
    if leaves:
        got = _grads(loss, leaves, None)
        expected = [g for g, p in zip(want, some, strict=True) if p.requires_grad]
        for a, e in zip(got, expected, strict=True):
            assert_equal(a, e, "gradient", "the same chunks, the same GEMMs")


def test_linear_cross_entropy_no_grad_forward_computes_no_gradient():
    n, h, v = 24, 16, 509
    hid = torch.randn(n, h, requires_grad=True)
    w = (torch.randn(v, h) / 4).requires_grad_()
    t = _targets(n, v)
    with torch.no_grad():
        biggest = _largest_allocation(lambda: ops.linear_cross_entropy(hid, w, t, chunk_size=8))
        loss = ops.linear_cross_entropy(hid, w, t, chunk_size=8)
    # The (chunk, V) logits buffer and nothing of d_weight's or d_hidden's size.
    assert biggest <= 8 * v * 4, biggest
    assert not loss.requires_grad
    # The same loss as the call that also computes the gradients.
    assert_equal(loss, ops.linear_cross_entropy(hid, w, t, chunk_size=8).detach(), "loss")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_backward_twice(reduction):
    """retain_graph: a second backward gives the same gradients (the saved in-forward ones
    are scaled out of place); without it, autograd's own error. A double backward
    (create_graph) is refused: the first-order gradients carry no graph."""
    hid, w = torch.randn(9, 8, requires_grad=True), torch.randn(17, 8, requires_grad=True)
    t = _targets(9, 17)
    loss = ops.linear_cross_entropy(hid, w, t, reduction=reduction, chunk_size=4, z_loss=1e-3)
    g = _grad_out(loss.detach())
    first = _grads(loss, [hid, w], g if reduction == "none" else None)
    loss2 = ops.linear_cross_entropy(hid, w, t, reduction=reduction, chunk_size=4, z_loss=1e-3)
    go = g if reduction == "none" else torch.ones_like(loss2)
    a = torch.autograd.grad(loss2, [hid, w], go, retain_graph=True)
    b = torch.autograd.grad(loss2, [hid, w], go)
    for x, y, z in zip(first, a, b, strict=True):
        assert_equal(y, z, "second backward", "the same saved tensors")
        assert_equal(x, y, "a fresh call's gradient", "the same computation")
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss2, [hid, w], go)
    loss3 = ops.linear_cross_entropy(hid, w, t, reduction=reduction, chunk_size=4)
    (dh,) = torch.autograd.grad(loss3, [hid], torch.ones_like(loss3), create_graph=True)
    assert not dh.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(dh.sum(), [hid])


def _capped(logits, softcap):
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_return_z_loss_and_token_accuracy(be, reduction, op):
    # Soft-capped: the argmax is of the capped logits (uncapped: the ties test, conformance).
    n, h, v, softcap = 23, 16, 97, 3.0
    hid, w = torch.randn(n, h), torch.randn(v, h) / 2
    cw = torch.rand(v) + 0.1
    logits64 = F.linear(hid.double(), w.double())
    top2 = _capped(logits64, softcap).topk(2, -1)
    # Half the rows aim at their argmax (accuracy 1 there), the rest at random classes.
    t = torch.where(torch.rand(n) < 0.5, top2.indices[:, 0], torch.randint(0, v, (n,)))
    t[[2, 5]] = IGNORE
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=softcap, reduction=reduction)
    flags = dict(return_z_loss=True, return_token_accuracy=True)
    with fastlm.use_backend(be):
        if op == "cross_entropy":
            out = ops.cross_entropy(F.linear(hid, w), t, IGNORE, weight=cw, **kw, **flags)
        else:
            out = ops.linear_cross_entropy(hid, w, t, chunk_size=8, ce_weight=cw, **kw, **flags)
        plain = ops.cross_entropy(F.linear(hid, w), t, IGNORE, weight=cw, **kw)
    assert isinstance(out, CrossEntropyOutput)
    ref = ops.cross_entropy_ref(logits64, t, IGNORE, weight=cw.double(), **kw, **flags)
    base = ops.cross_entropy_ref(F.linear(hid, w), t, IGNORE, weight=cw, **kw, **flags)
    assert out.loss.shape == out.z_loss.shape == ref.loss.shape
    assert out.z_loss.dtype == out.loss.dtype == torch.float32
    assert not out.z_loss.requires_grad and out.token_accuracy.dtype == torch.float32
    # The same loss as without the extras (cross_entropy: the very same computation).
    if op == "cross_entropy":
        assert_equal(out.loss, plain, "loss with extras")
    # z-loss rows are z * lse^2 * w_t: floor an ulp of the largest row times the rows summed.
    z_scale = n * (1e-2 * (torch.logsumexp(logits64, -1) ** 2).max().item() * cw.max().item())
    assert_policy(out.z_loss, ref.z_loss, base.z_loss, "z_loss", scale=z_scale)
    # Accuracy: exact, but for rows whose top two (capped) logits are too close for float32
    # to order (a float32 GEMM's rounding, h products of |hidden| |w|).
    valid = t != IGNORE
    tol = 64 * h * torch.finfo(torch.float32).eps * (hid.abs().max() * w.abs().max()).item()
    close = (top2.values[:, 0] - top2.values[:, 1]) <= tol
    want = ((top2.indices[:, 0] == t) & valid).float()
    if reduction == "none":
        keep = ~close
        assert_equal(out.token_accuracy[keep], want[keep], "accuracy per row")
        assert ((out.token_accuracy == 0) | (out.token_accuracy == 1)).all()
    else:
        lo = (want * ~close).sum() / valid.sum()
        hi = (want + (close & valid)).clamp(max=1).sum() / valid.sum()
        acc = out.token_accuracy.item()
        assert lo.item() - 1e-6 <= acc <= hi.item() + 1e-6, (acc, lo.item(), hi.item())


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("softcap", [None, 2.0], ids=["no-cap", "cap"])
def test_token_accuracy_ties_go_to_the_first_maximum(be, softcap):
    """Exact ties (small integers, exact in float32 and through a one-hot GEMM): the
    argmax is the first maximal index, as torch.argmax, so a target at a later tied
    index is a miss."""
    n, h, v = 6, 8, 300  # v > 256: the maximum may sit in the second column block
    hid = torch.eye(n, h)
    w = torch.randint(-2, 3, (v, h)).float()
    w[260, :n] = 9.0  # every row's maximum ties at 260 and 290: both in the second block
    w[290, :n] = 9.0
    w[5, 0] = 9.0  # row 0's first maximum is in the first block
    t = torch.tensor([260, 260, 290, 290, 260, IGNORE])
    logits = hid @ w.t()
    want = ((_capped(logits, softcap).argmax(-1) == t) & (t != IGNORE)).float()
    assert want.tolist() == [0, 1, 0, 0, 1, 0]
    with fastlm.use_backend(be):
        lin = ops.linear_cross_entropy(
            hid, w, t, reduction="none", softcap=softcap, return_token_accuracy=True
        )
        plain = ops.cross_entropy(
            logits, t, reduction="none", softcap=softcap, return_token_accuracy=True
        )
        mean = ops.cross_entropy(logits, t, softcap=softcap, return_token_accuracy=True)
    assert_equal(lin.token_accuracy, want, "linear_cross_entropy accuracy")
    assert_equal(plain.token_accuracy, want, "cross_entropy accuracy")
    assert mean.token_accuracy == torch.tensor(2 / 5) and mean.z_loss is None


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_only_the_fields_asked_for(be):
    hid, w = torch.randn(7, 8), torch.randn(13, 8)
    t = _targets(7, 13)
    with fastlm.use_backend(be):
        for fn, args in (
            (ops.cross_entropy, (F.linear(hid, w), t)),
            (ops.linear_cross_entropy, (hid, w, t)),
        ):
            z = fn(*args, z_loss=1e-3, return_z_loss=True)
            acc = fn(*args, return_token_accuracy=True)
            plain = fn(*args, z_loss=1e-3)
            assert z.token_accuracy is None and z.z_loss.shape == () and acc.z_loss is None
            assert 0 <= acc.token_accuracy <= 1 and isinstance(plain, torch.Tensor)
            assert_equal(z.loss, plain, f"{fn.__name__} loss")
            no_z = fn(*args, return_z_loss=True)
            assert no_z.z_loss == 0  # z_loss=0: the term is zero, and returned as asked


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


def test_linear_cross_entropy_cpu_chunk_size():
    rows = CPU_ROWS_PER_THREAD
    assert cpu_chunk_size(8192, 768, 32000, threads=1) == rows
    assert cpu_chunk_size(2048, 768, 32000, threads=1) == rows  # Liger's rule: 128
    assert cpu_chunk_size(8192, 768, 32000, threads=2) == 2 * rows
    # Never a logits chunk larger than d_weight, whatever the thread count.
    assert cpu_chunk_size(8192, 768, 32000, threads=64) == 768
    assert cpu_chunk_size(8192, 128, 50257, threads=8) == rows
    assert cpu_chunk_size(1 << 20, 4096, 1000, threads=1) == 4096  # Liger: all rows


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
    cw = torch.rand(7, dtype=torch.float64) + 0.1
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda h_, w_, b_, r=reduction: ops.linear_cross_entropy(
                h_, w_, t, b_, label_smoothing=0.1, reduction=r, z_loss=1e-2, chunk_size=2
            ),
            (hid, w, b),
        )
        # The hand-written gradient of the class weights and the soft cap (torch rows).
        assert torch.autograd.gradcheck(
            lambda h_, w_, b_, r=reduction: ops.linear_cross_entropy(
                h_,
                w_,
                t,
                b_,
                label_smoothing=0.1,
                reduction=r,
                z_loss=1e-2,
                chunk_size=2,
                ce_weight=cw,
                softcap=1.5,
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
    with pytest.raises(ValueError, match="ce_weight must be a"):
        ops.linear_cross_entropy(h, w, t, ce_weight=torch.ones(5))
    with pytest.raises(ValueError, match="softcap"):
        ops.linear_cross_entropy(h, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="softcap"):
        ops.cross_entropy(x, t, softcap=float("inf"))
    with pytest.raises(TypeError, match="return_z_loss"):
        ops.cross_entropy(x, t, return_z_loss=1)
    with pytest.raises(ValueError, match="ce_weight must not require grad"):
        ops.linear_cross_entropy(h, w, t, ce_weight=torch.ones(6, requires_grad=True))
    with pytest.raises(ValueError, match="weight must not require grad"):
        ops.cross_entropy(x, t, weight=torch.ones(6, requires_grad=True))
    with pytest.raises(TypeError, match="return_token_accuracy"):
        ops.linear_cross_entropy(h, w, t, return_token_accuracy="yes")
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="float64"):
        ops.cross_entropy(x.double(), t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_one_chunk_is_the_unfused_pair_bit_for_bit(reduction):
    # fp32 rows that fit one default chunk run as F.linear then the cross-entropy: the
    # same bits as the pair, gradients included; a chosen chunk_size keeps the fused path.
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(50, 24, requires_grad=True)
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[3] = -100
    got = ops.linear_cross_entropy(h, w, t, b, reduction=reduction, label_smoothing=0.1)
    want = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(got, want), (got - want).abs().max()
    dy = torch.randn_like(want)
    for g, r in zip(
        torch.autograd.grad(got, (h, w, b), dy),
        torch.autograd.grad(want, (h, w, b), dy),
        strict=True,
    ):
        assert torch.equal(g, r), (g - r).abs().max()
    chunked = ops.linear_cross_entropy(
        h, w, t, b, reduction=reduction, chunk_size=16, label_smoothing=0.1
    )
    assert chunked.grad_fn is not None and type(chunked.grad_fn) is not type(got.grad_fn)
    torch.testing.assert_close(chunked, want)


# The tensors' metadata checks are remembered per signature (type, shape, dtype, device):
# every other check must still run on every call, failures must never be remembered, and
# errors must come in the contract's order whether a signature is new or known.


def _ce_bad_calls(x, t):
    """Calls with the tensor signature of ``(x, t)`` but one bad argument, and the error."""
    bad_t = t.clone()
    bad_t[2] = x.shape[1]
    return [
        (lambda: ops.cross_entropy(x, bad_t), ValueError, r"target\[2\] = 6 is outside"),
        (lambda: ops.cross_entropy(x, -t - 1), ValueError, r"target\[0\] = -\d+ is outside"),
        (lambda: ops.cross_entropy(x, t, ignore_index=True), TypeError, "ignore_index"),
        (lambda: ops.cross_entropy(x, t, label_smoothing=1.5), ValueError, "label_smoothing"),
        (lambda: ops.cross_entropy(x, t, label_smoothing=False), TypeError, "label_smoothing"),
        (lambda: ops.cross_entropy(x, t, reduction="avg"), ValueError, "reduction"),
        (lambda: ops.cross_entropy(x, t, z_loss=-1.0), ValueError, "z_loss"),
        (lambda: ops.cross_entropy(x, t, weight=torch.ones(5)), ValueError, "weight must be a"),
        (
            lambda: ops.cross_entropy(x, t, weight=torch.ones(6, requires_grad=True)),
            ValueError,
            "weight must not require grad",
        ),
        (lambda: ops.cross_entropy(x, t, softcap=-1), ValueError, "softcap"),
        (lambda: ops.cross_entropy(x, t, softcap=False), TypeError, "softcap"),
        (lambda: ops.cross_entropy(x, t, return_z_loss=1), TypeError, "return_z_loss"),
        (
            lambda: ops.cross_entropy(x, t, return_token_accuracy=0),
            TypeError,
            "return_token_accuracy",
        ),
    ]


def test_cross_entropy_known_signature_still_checks_every_call():
    x, t = torch.randn(4, 6), torch.tensor([0, IGNORE, 5, 2])
    want = F.cross_entropy(x, t)
    assert_equal(ops.cross_entropy(x, t), want, "loss", "the native op")
    for call, error, words in _ce_bad_calls(x, t):
        for _ in range(2):  # the failure is not remembered either
            with pytest.raises(error, match=words):
                call()
        # and the good call of the same signature still passes, with the same answer
        assert_equal(ops.cross_entropy(x, t), want, "loss", "the native op")


def test_a_failing_tensor_signature_is_never_remembered(monkeypatch):
    module = importlib.import_module("fastlm.ops.cross_entropy")
    remembered = []
    remember = module.remember
    monkeypatch.setattr(
        module,
        "remember",
        lambda plans, key, plan: remembered.append(key) or remember(plans, key, plan),
    )
    x, t = torch.randn(4, 6), _targets(4, 6)
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    for call, error, words in [
        (lambda: ops.cross_entropy(x.long(), t), TypeError, "logits must be a floating"),
        (lambda: ops.cross_entropy(x, t.float()), TypeError, "target must hold integer"),
        (lambda: ops.cross_entropy(x, t[:3]), ValueError, "target must have shape"),
        (lambda: ops.cross_entropy(x[None], t), ValueError, "logits must be 2-D"),
        (lambda: ops.cross_entropy(x, t.tolist()), TypeError, "target must be a torch.Tensor"),
        (lambda: ops.cross_entropy(x.numpy(), t), TypeError, "logits must be a torch.Tensor"),
        (lambda: ops.linear_cross_entropy(h, w.double(), t), TypeError, "weight must have"),
        (lambda: ops.linear_cross_entropy(h, w[:, :2], t), ValueError, "weight must be"),
        (lambda: ops.linear_cross_entropy(h, w, t, w[0]), ValueError, "bias must have shape"),
        (lambda: ops.linear_cross_entropy(h, w, t[:3]), ValueError, "target must have shape"),
        (lambda: ops.linear_cross_entropy(h, w, t.int().float()), TypeError, "target must"),
    ]:
        for _ in range(3):
            with pytest.raises(error, match=words):
                call()
    assert remembered == [], "a failing signature was remembered"
    ops.cross_entropy(x, t)
    ops.linear_cross_entropy(h, w, t)
    assert len(remembered) <= 2  # (none if an earlier test used the same signatures)


def test_plans_stay_bounded():
    module = importlib.import_module("fastlm.ops.cross_entropy")

    t = torch.zeros(1, dtype=torch.long)
    for v in range(1, SIGNATURES_KEPT + 20):
        ops.cross_entropy(torch.zeros(1, v), t)
        assert len(module._ce_plans) <= SIGNATURES_KEPT
    # Cleared and refilled, still right.
    assert ops.cross_entropy(torch.zeros(1, 4), t) == math.log(4)


def test_linear_known_signature_still_checks_every_call_in_the_contracts_order():
    h, w, t = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, IGNORE, 5, 2])
    bad_t = torch.tensor([0, IGNORE, 6, 2])
    outside = r"target\[2\] = 6 is outside"
    want = F.cross_entropy(F.linear(h, w), t)
    cases = [
        (dict(target=bad_t), ValueError, outside),
        (dict(label_smoothing=2.0), ValueError, "label_smoothing"),
        (dict(ignore_index=1.0), TypeError, "ignore_index"),
        (dict(out_dtype=torch.int32), TypeError, "out_dtype"),
        (dict(ce_weight=torch.ones(5)), ValueError, "ce_weight must be a"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(return_z_loss="yes"), TypeError, "return_z_loss"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=True), ValueError, "chunk_size"),
        # Two bad arguments: the contract reports the target's classes first, also where the
        # native op's bounds check would otherwise find them.
        (dict(target=bad_t, softcap=-1.0), ValueError, outside),
        (dict(target=bad_t, chunk_size=0), ValueError, outside),
        (dict(target=bad_t, ce_weight=torch.ones(5)), ValueError, outside),
        # ... and a bad option before them.
        (dict(target=bad_t, reduction="avg"), ValueError, "reduction"),
    ]
    for kwargs in ({}, dict(bias=torch.randn(6))):
        for bad, error, words in cases:
            args = dict(kwargs, target=t) | bad
            for _ in range(2):
                with pytest.raises(error, match=words):
                    ops.linear_cross_entropy(h, w, **args)
        b = kwargs.get("bias")
        assert_equal(
            ops.linear_cross_entropy(h, w, t, b),
            F.cross_entropy(F.linear(h, w, b), t),
            "loss",
            "the unfused pair",
        )
    assert_equal(ops.linear_cross_entropy(h, w, t), want, "loss", "the unfused pair")
    # A parameter and a plain tensor of one shape: two signatures, one answer.
    wp = torch.nn.Parameter(w.clone())
    assert_equal(ops.linear_cross_entropy(h, wp, t).detach(), want, "loss", "the pair")
    # A forced backend that cannot run is still refused after a known signature passed, and
    # the contract's error (the classes) still comes before it.
    for _ in range(2):
        with fastlm.use_backend("triton"):
            with pytest.raises(backend.BackendUnavailable, match="float64"):
                ops.linear_cross_entropy(h.double(), w.double(), t)
            with pytest.raises(ValueError, match=outside):
                ops.linear_cross_entropy(h.double(), w.double(), bad_t)
            with pytest.raises(backend.BackendUnavailable, match="float64"):
                ops.cross_entropy(h.double() @ w.double().T, t)


def test_linear_default_chunk_follows_the_thread_count():
    # cpu_chunk_size(260, 600, 1800, threads): 256 rows at one thread (two chunks, the fused
    # path), 512 at two (one chunk: the unfused pair). The remembered plan must not keep the
    # first answer when the thread count changes.
    n, h, v = 260, 600, 1800
    assert cpu_chunk_size(n, h, v, 1) < n <= cpu_chunk_size(n, h, v, 2)
    hid = torch.randn(n, h, requires_grad=True)
    w = torch.randn(v, h) / h**0.5
    t = torch.randint(0, v, (n,))
    threads = torch.get_num_threads()
    try:
        kinds = []
        for k in (1, 2, 1):
            torch.set_num_threads(k)
            kinds.append(type(ops.linear_cross_entropy(hid, w, t).grad_fn).__name__)
    finally:
        torch.set_num_threads(threads)
    assert kinds[0] == kinds[2] != kinds[1] == "NllLossBackward0", kinds
