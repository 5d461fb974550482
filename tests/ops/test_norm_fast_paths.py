"""The torch backend's fast paths of fastlm.ops.rms_norm / layer_norm: the composed RMSNorm
(one buffer, PyTorch's ops in PyTorch's order) must give F.rms_norm's bits, its autograd
Function must meet the float64 policy, neither may write into its inputs, and the eager
entrance of the custom op must compute what the dispatcher's does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import ops
from fastlm.ops import norm as norm_ops
from fastlm.testing import assert_equal, assert_policy, summand_scale


@pytest.fixture
def composed(monkeypatch):
    """Send every eligible RMSNorm (any size) down the composed path and count its calls,
    so small shapes test it and a test can tell it ran."""
    seen = []
    original = norm_ops._rms_norm_composed

    def spy(*args):
        seen.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(norm_ops, "_COMPOSED_MIN_NUMEL", 0)
    monkeypatch.setattr(norm_ops, "_FUNCTION_MIN_NUMEL", 0)
    monkeypatch.setattr(norm_ops, "_rms_norm_composed", spy)
    return seen


def _torch_rms(x, shape, w, eps, residual=None, out_dtype=None):
    """What the torch backend promises: F.rms_norm on x (+ residual), computed in the wider
    of the input and output dtypes, the weight cast as the backend casts it."""
    s = x if residual is None else x + residual
    out_dtype = s.dtype if out_dtype is None else out_dtype
    xs = s.to(torch.promote_types(s.dtype, out_dtype))
    w = norm_ops._torch_weight(w, xs.dtype)
    return F.rms_norm(xs, shape, w, eps).to(out_dtype), s


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (x shape, normalized_shape): odd sizes, a length-1 row, two normalized dims, 4-D input.
SHAPES = [((5, 37), (37,)), ((3, 1), (1,)), ((2, 3, 4, 6), (4, 6)), ((2, 1, 3, 65), (65,))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, normalized", SHAPES, ids=str)
def test_composed_forward_is_bit_identical_to_f_rms_norm(composed, dtype, shape, normalized):
    weights = {"none": None, "same": torch.randn(normalized, dtype=dtype)}
    if dtype.itemsize < 4:
        weights["float32"] = torch.randn(normalized)  # PyTorch's half-input parameter dtype
    for eps in (None, 1e-6, 0.0):
        for name, w in weights.items():
            x = 4 * torch.randn(shape, dtype=dtype)
            r = torch.randn(shape, dtype=dtype)
            composed.clear()
            y = ops.rms_norm(x, normalized, w, eps)
            y_res, s = ops.rms_norm(x, normalized, w, eps, residual=r)
            assert len(composed) == 2, "the composed path did not run"
            basis = f"F.rms_norm, {name} weight, eps={eps}"
            assert_equal(y, _torch_rms(x, normalized, w, eps)[0], "y", basis)
            expected, s_expected = _torch_rms(x, normalized, w, eps, r)
            assert_equal(y_res, expected, "y with residual", basis)
            assert_equal(s, s_expected, "s", "x + residual")


@pytest.mark.parametrize(
    "dtype, out_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float64),
    ],
    ids=str,
)
def test_composed_forward_with_out_dtype_and_mixed_residual(composed, dtype, out_dtype):
    x = torch.randn(7, 33, dtype=dtype)
    w = torch.randn(33, dtype=dtype)
    y = ops.rms_norm(x, 33, w, 1e-5, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert_equal(y, _torch_rms(x, (33,), w, 1e-5, out_dtype=out_dtype)[0], "y")
    r = torch.randn(7, 33, dtype=torch.float32)  # a float32 residual stream
    y, s = ops.rms_norm(x, 33, w, 1e-5, residual=r, out_dtype=out_dtype)
    expected, s_expected = _torch_rms(x, (33,), w, 1e-5, r, out_dtype)
    assert_equal(y, expected, "y")
    assert_equal(s, s_expected, "s")
    assert composed, "the composed path did not run"


def test_default_sizes_pick_the_paths(monkeypatch):
    seen = []
    original = norm_ops._rms_norm_composed
    monkeypatch.setattr(norm_ops, "_rms_norm_composed", lambda *a: seen.append(1) or original(*a))
    n = 257
    w = torch.randn(n, requires_grad=True)
    for rows, grad, composed in [
        (norm_ops._COMPOSED_MIN_NUMEL // n + 1, False, True),
        (norm_ops._FUNCTION_MIN_NUMEL // n + 1, True, True),  # autograd wins from here
        (norm_ops._FUNCTION_MIN_NUMEL // n + 1, False, False),
        (3, True, False),
    ]:
        seen.clear()
        x = torch.randn(rows, n)
        with torch.set_grad_enabled(grad):
            assert_equal(ops.rms_norm(x, n, w), F.rms_norm(x, (n,), w), "y")
        assert seen == ([1] if composed else []), (rows, grad)


def test_strided_input_takes_the_native_op(composed):
    # A transposed input could reduce in another order than a contiguous buffer.
    x = torch.randn(48, 6).t()
    w = torch.randn(48)
    assert_equal(ops.rms_norm(x, 48, w), F.rms_norm(x, (48,), w), "y")
    assert composed == []


@pytest.mark.parametrize("grad", ["no_grad", "grad_off_inputs", "autograd"])
def test_fast_paths_leave_inputs_unchanged(composed, grad):
    x = torch.randn(6, 40)
    r = torch.randn(6, 40)
    w = torch.randn(40)
    copies = [t.clone() for t in (x, r, w)]
    if grad == "autograd":
        x.requires_grad_()
        w.requires_grad_()
    context = torch.no_grad() if grad == "no_grad" else torch.enable_grad()
    with context:
        y = ops.rms_norm(x, 40, w, 1e-6)
        y2, s = ops.rms_norm(x, 40, w, 1e-6, residual=r)
        y3 = ops.rms_norm(s, 40, None, 1e-6)
    if grad == "autograd":
        (y.sum() + y2.sum() + y3.sum()).backward()
    for name, t, c in zip(("x", "residual", "weight"), (x, r, w), copies, strict=True):
        assert_equal(t.detach(), c, name, "unchanged by the call")
    assert_equal(s.detach(), copies[0] + copies[1], "s", "not overwritten by the norm after it")
    assert len({t.data_ptr() for t in (x, r, w, y, y2, s, y3)}) == 7
    assert len(composed) == 3


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize(
    "dtype, w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, None),
        (torch.float32, None),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape, normalized", [((4, 5, 97), (97,)), ((3, 4, 6, 5), (6, 5))])
def test_autograd_function_meets_the_float64_policy(composed, dtype, w_dtype, shape, normalized):
    x = (3 * torch.randn(shape)).to(dtype).requires_grad_()
    w = None if w_dtype is None else torch.randn(normalized, dtype=w_dtype, requires_grad=True)
    dy = torch.randn(shape, dtype=dtype)
    leaves = (x, w)
    y = ops.rms_norm(x, normalized, w, 1e-6)
    got = _grads((y * dy).float().sum(), leaves)
    assert composed, "the autograd Function did not run"
    base_leaves = [None if t is None else t.detach().requires_grad_() for t in leaves]
    y_base = F.rms_norm(base_leaves[0], normalized, base_leaves[1], 1e-6)
    base = _grads((y_base * dy).float().sum(), base_leaves)
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    y64 = ops.rms_norm_ref(leaves64[0], normalized, leaves64[1], 1e-6)
    ref = _grads((y64 * dy.double()).sum(), leaves64)
    assert_equal(y, y_base, "y", "the same forward as F.rms_norm")
    assert got[0].dtype == dtype
    assert_policy(got[0], ref[0], base[0], "dx")
    if w is not None:
        assert got[1].dtype == w_dtype
        dims = tuple(range(len(shape) - len(normalized)))
        xhat = F.rms_norm(leaves64[0].detach(), normalized, eps=1e-6)
        scale = summand_scale(dy.double() * xhat, dims)
        assert_policy(got[1], ref[1], base[1], "dweight", scale=scale)


@pytest.mark.parametrize("needs", ["x only", "weight only"])
def test_autograd_function_with_one_input_needing_grad(composed, needs):
    x = torch.randn(5, 64, requires_grad=needs == "x only")
    w = torch.randn(64, requires_grad=needs == "weight only")
    y = ops.rms_norm(x, 64, w)
    y.sum().backward()  # an expanded (stride 0) dy
    assert composed
    x_base, w_base = (t.detach().requires_grad_(t.requires_grad) for t in (x, w))
    F.rms_norm(x_base, (64,), w_base).sum().backward()
    x64, w64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, w))
    ops.rms_norm_ref(x64, (64,), w64).sum().backward()
    if needs == "x only":
        assert w.grad is None
        assert_policy(x.grad, x64.grad, x_base.grad, "dx")
    else:
        assert x.grad is None
        scale = summand_scale(F.rms_norm(x64.detach(), (64,)), 0)
        assert_policy(w.grad, w64.grad, w_base.grad, "dweight", scale=scale)


def test_autograd_function_residual_gradients(composed):
    x, r = (torch.randn(6, 50, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.randn(50, dtype=torch.bfloat16, requires_grad=True)
    dy, ds = (torch.randn(6, 50, dtype=torch.bfloat16) for _ in range(2))
    y, s = ops.rms_norm(x, 50, w, 1e-6, residual=r)
    got = _grads((y * dy).sum() + (s * ds).sum(), (x, r, w))
    assert composed
    xb, rb, wb = (t.detach().requires_grad_() for t in (x, r, w))
    sb = xb + rb
    yb = F.rms_norm(sb, (50,), wb, 1e-6)
    base = _grads((yb * dy).sum() + (sb * ds).sum(), (xb, rb, wb))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
    y64, s64 = ops.rms_norm_ref(leaves64[0], (50,), leaves64[2], 1e-6, leaves64[1])
    ref = _grads((y64 * dy.double()).sum() + (s64 * ds.double()).sum(), leaves64)
    assert_equal(y, yb, "y")
    xhat = F.rms_norm(s64.detach(), (50,), eps=1e-6)
    scales = (None, None, summand_scale(dy.double() * xhat, 0))
    for name, g, rf, bs, sc in zip(("dx", "dresidual", "dw"), got, ref, base, scales, strict=True):
        assert_policy(g, rf, bs, name, scale=sc)


def test_autograd_function_float64_gradcheck_and_gradgradcheck(composed):
    x = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.rms_norm(a, (2, 7), b), (x, w))
    assert torch.autograd.gradcheck(lambda a: ops.rms_norm(a, 7), (x,))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.rms_norm(a, 7, b[0], residual=c), (x, w, r))
    # create_graph: the backward differentiates PyTorch's own composition again.
    assert torch.autograd.gradgradcheck(lambda a, b: ops.rms_norm(a, (2, 7), b), (x, w))
    assert composed


def test_compiled_torch_backend_takes_the_native_op_and_matches(composed):
    """Under torch.compile the torch backend traces PyTorch's native op (no autograd Function,
    no in-place buffers in the graph), with the same numbers as eager."""
    x = torch.randn(4, 3, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)

    def fn(x, w):
        return ops.rms_norm(x, 24, w, 1e-6)

    eager = fn(x, w)
    grads_eager = torch.autograd.grad(eager.sum(), (x, w))
    calls_eager = len(composed)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
    grads = torch.autograd.grad(compiled.sum(), (x, w))
    assert calls_eager == 1 and len(composed) == 1
    assert_equal(compiled, eager, "y", "F.rms_norm traced, the same ops")
    for name, g, ge in zip(("dx", "dw"), grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge, msg=name)


# --- the custom op's two entrances ----------------------------------------------------------


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_eager_entrance_equals_the_dispatcher(rms):
    """norm_fwd(...) in plain eager skips the dispatcher; norm_fwd.op(...) goes through it
    (as torch.compile's graph does): same kernel (the interpreter), same bits, forward and
    backward."""
    x = torch.randn(3, 20, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(3, 20, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(20, requires_grad=True)
    b = None if rms else torch.randn(20, requires_grad=True)
    dy, ds = torch.randn(3, 20, dtype=torch.bfloat16), torch.randn(3, 20, dtype=torch.bfloat16)
    leaves = [t for t in (x, r, w, b) if t is not None]
    results = []
    for entrance in (norm_ops.norm_fwd, norm_ops.norm_fwd.op):
        y, s, _, rstd = entrance(x, w, b, r, [20], 1e-5, rms, torch.float32, "triton")
        grads = torch.autograd.grad((y * dy.float()).sum() + (s * ds).sum(), leaves)
        results.append((y, s, rstd, *grads))
    names = ("y", "s", "rstd", "dx", "dresidual", "dweight", "dbias")
    for name, eager, dispatched in zip(names, *results, strict=False):
        assert_equal(eager, dispatched, name, "the same impl through either entrance")


def test_compiled_custom_op_equals_eager():
    x = torch.randn(2, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)

    def fn(x, w):
        y, s = ops.rms_norm(x, 16, w, 1e-6, residual=x)
        return y * s

    with fastlm.use_backend("triton"):
        eager = fn(x, w)
        grads_eager = torch.autograd.grad(eager.sum(), (x, w))
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
        grads = torch.autograd.grad(compiled.sum(), (x, w))
    assert_equal(compiled, eager, "y * s", "the same custom op, compiled or not")
    for name, g, ge in zip(("dx", "dw"), grads, grads_eager, strict=True):
        assert_equal(g, ge, name, "the same backward op, compiled or not")


# --- small tensors: torch.rms_norm's own fused entry --------------------------------------------


@pytest.fixture
def fused_entry(monkeypatch):
    """Counts the calls that go straight to torch._fused_rms_norm."""
    seen = []
    original = norm_ops._fused_rms_norm
    monkeypatch.setattr(norm_ops, "_fused_rms_norm", lambda *a: seen.append(1) or original(*a))
    return seen


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_rms_norm_is_bit_identical_through_either_entry(fused_entry, dtype):
    weights = [None, torch.randn(37, dtype=dtype)]
    if dtype.itemsize < 4:
        weights.append(torch.randn(37))  # a mismatched weight: torch.rms_norm's composite
    expected_fused = 0
    for w in weights:
        for grad in (False, True):
            x = 4 * torch.randn(3, 5, 37, dtype=dtype)
            fused = w is None or w.dtype == dtype
            with torch.set_grad_enabled(grad):
                assert_equal(ops.rms_norm(x, 37, w, 1e-6), F.rms_norm(x, (37,), w, 1e-6), "y")
                expected_fused += fused
                assert len(fused_entry) == expected_fused
                # Under autograd: the fused entry where it records torch.rms_norm's own ops.
                xg = x.clone().requires_grad_()
                y = ops.rms_norm(xg, 37, w, 1e-6)
                assert_equal(y, F.rms_norm(x, (37,), w, 1e-6), "y")
                expected_fused += fused and (not grad or norm_ops._FUSED_DECOMPOSES)
                assert len(fused_entry) == expected_fused
                assert y.requires_grad == grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_small_rms_norm_under_autograd_gives_torch_gradients(fused_entry, dtype):
    """The fused entry under autograd (a module's weight needs grad): the same gradients and
    second derivatives as F.rms_norm's, bit for bit (the same ops recorded)."""
    x = 4 * torch.randn(3, 5, 37, dtype=dtype)
    w = torch.randn(37, dtype=dtype)
    dy = torch.randn_like(x)
    grads = []
    for norm in (
        lambda x, w: ops.rms_norm(x, 37, w, 1e-6),
        lambda x, w: F.rms_norm(x, (37,), w, 1e-6),
    ):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = norm(xg, wg)
        dx, dw = torch.autograd.grad(y, (xg, wg), dy, create_graph=True)
        (ddw,) = torch.autograd.grad((dx * dy).sum(), wg)
        grads.append((y, dx, dw, ddw))
    assert len(fused_entry) == int(norm_ops._FUSED_DECOMPOSES)
    for name, got, want in zip(("y", "dx", "dw", "d(dx.dy)/dw"), *grads, strict=True):
        assert_equal(got, want, name, "the same ops recorded")


def test_small_rms_norm_under_vmap_and_a_strided_input(fused_entry):
    w = torch.randn(16)
    x = torch.randn(4, 3, 16)
    got = torch.func.vmap(lambda rows: ops.rms_norm(rows, 16, w, 1e-6))(x)
    assert_equal(got, F.rms_norm(x, (16,), w, 1e-6), "y", "vmap of the same op")
    strided = torch.randn(16, 6).t()
    assert_equal(ops.rms_norm(strided, 16, w), F.rms_norm(strided, (16,), w), "y")
    assert fused_entry == []
