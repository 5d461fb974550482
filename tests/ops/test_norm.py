"""fastlm.ops.layer_norm / rms_norm: dispatch, autograd, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend, ops
from fastlm.ops import norm as norm_ops
from fastlm.testing import assert_equal, assert_policy, summand_scale

BACKENDS_HERE = ["torch", "triton"]  # triton on CPU tensors = the interpreter


@pytest.fixture
def calls(monkeypatch):
    """Records which backend served each call: ("fwd"/"bwd", name) for the compiled
    backends' kernels, ("fwd", "torch") for PyTorch's native path (whose backward is
    PyTorch's own autograd)."""
    seen = []

    def spy(fn, kind, name):
        def wrapped(*args):
            seen.append((kind, name))
            return fn(*args)

        return wrapped

    for table, kind in ((norm_ops.FORWARD, "fwd"), (norm_ops.BACKWARD, "bwd")):
        for name, fn in list(table.items()):
            monkeypatch.setitem(table, name, spy(fn, kind, name))
    norm = norm_ops._norm

    def served(*args):
        # PyTorch's native path is what ran when no fastlm kernel did. (While Dynamo traces,
        # kernels run later, from the graph: nothing to tell then.)
        start = len(seen)
        out = norm(*args)
        if not seen[start:] and not torch.compiler.is_compiling():
            seen.append(("fwd", "torch"))
        return out

    monkeypatch.setattr(norm_ops, "_norm", served)
    return seen


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


# --- dispatch ------------------------------------------------------------------------------


def test_cpu_tensors_use_torch_backend(calls):
    x = torch.randn(4, 8, requires_grad=True)
    ops.layer_norm(x, 8).sum().backward()
    assert calls == [("fwd", "torch")]


def test_forcing_triton_on_cpu_runs_the_interpreter(calls):
    x = torch.randn(4, 8, requires_grad=True)
    with fastlm.use_backend("triton"):
        ops.rms_norm(x, 8).sum().backward()
    assert calls == [("fwd", "triton"), ("bwd", "triton")]


@pytest.fixture
def set_env(monkeypatch):
    """Set FASTLM_BACKEND and have fastlm read it again (it reads it once, at import)."""

    def set_value(value: str) -> None:
        monkeypatch.setenv("FASTLM_BACKEND", value)
        backend.read_environment()

    yield set_value
    monkeypatch.delenv("FASTLM_BACKEND", raising=False)
    backend.read_environment()


def test_env_var_forces_backend(calls, set_env):
    set_env("triton")
    ops.layer_norm(torch.randn(2, 8), 8)
    assert calls == [("fwd", "triton")]
    set_env("auto")
    ops.layer_norm(torch.randn(2, 8), 8)
    assert calls[-1] == ("fwd", "torch")


def test_env_var_is_read_at_import_and_on_request(calls, monkeypatch):
    # Changing os.environ alone does not reach a process that has imported fastlm (the
    # lookup would cost most of a microsecond per op); read_environment() takes it in.
    monkeypatch.setenv("FASTLM_BACKEND", "triton")
    ops.layer_norm(torch.randn(2, 8), 8)
    assert calls == [("fwd", "torch")]
    try:
        assert backend.read_environment() == "triton"
        ops.layer_norm(torch.randn(2, 8), 8)
        assert calls[-1] == ("fwd", "triton")
    finally:
        monkeypatch.delenv("FASTLM_BACKEND")
        assert backend.read_environment() is None


def test_context_manager_beats_env_and_nests(calls, set_env):
    set_env("triton")
    with fastlm.use_backend("torch"):
        ops.layer_norm(torch.randn(2, 8), 8)
        with fastlm.use_backend(None):  # back to the env / automatic choice
            ops.layer_norm(torch.randn(2, 8), 8)
    assert [name for _, name in calls] == ["torch", "triton"]


def test_bad_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"), fastlm.use_backend("cudnn"):
        pass
    monkeypatch.setenv("FASTLM_BACKEND", "tritonn")
    with pytest.raises(ValueError, match="FASTLM_BACKEND"):
        backend.read_environment()
    monkeypatch.delenv("FASTLM_BACKEND")
    assert backend.read_environment() is None


def test_forced_cuda_on_cpu_says_why():
    with fastlm.use_backend("cuda"), pytest.raises(backend.BackendUnavailable, match="CUDA"):
        ops.layer_norm(torch.randn(2, 8), 8)


def test_forced_triton_rejects_float64_with_reason():
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="float64"):
        ops.layer_norm(torch.randn(2, 8, dtype=torch.float64), 8)


def test_gpu_order_keeps_unverified_cuda_opt_in():
    assert backend.gpu_order("layer_norm")[0] == "triton"
    assert "cuda" not in backend.gpu_order("layer_norm")


@pytest.mark.gpu
def test_cuda_tensors_default_to_triton(calls):
    ops.layer_norm(torch.randn(4, 8, device="cuda"), 8)
    assert calls == [("fwd", "triton")]


# --- numerics through the public API ---------------------------------------------------------


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_multi_dim_shape_and_grads(be, dtype):
    shape = (4, 6)
    x = torch.randn(3, 5, *shape, dtype=dtype, requires_grad=True)
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    b = torch.randn(shape, dtype=dtype, requires_grad=True)
    dy = torch.randn(3, 5, *shape, dtype=dtype)
    with fastlm.use_backend(be):
        y = ops.layer_norm(x, shape, w, b, eps=1e-6)
        got = _grads((y * dy).sum(), (x, w, b))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref_y = ops.layer_norm_ref(leaves64[0], shape, leaves64[1], leaves64[2], eps=1e-6)
    ref = _grads((ref_y * dy.double()).sum(), leaves64)
    base_y = F.layer_norm(x, shape, w, b, eps=1e-6)
    base = _grads((base_y * dy).sum(), (x, w, b))
    assert_policy(y, ref_y, base_y, "y")
    xhat = F.layer_norm(leaves64[0].detach(), shape, eps=1e-6)
    scales = (None, summand_scale(dy * xhat, (0, 1)), summand_scale(dy, (0, 1)))
    for name, g, r, bs, scale in zip(("dx", "dw", "db"), got, ref, base, scales, strict=True):
        assert g.shape == r.shape
        assert_policy(g, r, bs, name, scale=scale)


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_fused_residual_gradients_reach_both_inputs(be):
    x, r = (torch.randn(6, 40, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    dy, ds = torch.randn(6, 40, dtype=torch.bfloat16), torch.randn(6, 40, dtype=torch.bfloat16)
    with fastlm.use_backend(be):
        y, s = ops.rms_norm(x, 40, w, eps=1e-6, residual=r)
        got = _grads((y * dy).sum() + (s * ds).sum(), (x, r, w))
    s_base = x + r
    y_base = F.rms_norm(s_base, (40,), w, eps=1e-6)
    base = _grads((y_base * dy).sum() + (s_base * ds).sum(), (x, r, w))
    leaves64 = [t.detach().double().requires_grad_() for t in (x, r, w)]
    y_ref, s_ref = ops.rms_norm_ref(leaves64[0], (40,), leaves64[2], eps=1e-6, residual=leaves64[1])
    ref = _grads((y_ref * dy.double()).sum() + (s_ref * ds.double()).sum(), leaves64)
    assert torch.equal(s, s_base)
    assert_policy(y, y_ref, y_base, "y")
    xhat = F.rms_norm(s_ref.detach(), (40,), eps=1e-6)
    scales = (None, None, summand_scale(dy * xhat, 0))
    for name, g, rf, bs, sc in zip(("dx", "dresidual", "dw"), got, ref, base, scales, strict=True):
        assert_policy(g, rf, bs, name, scale=sc)


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_only_residual_output_used(be):
    """Gradients flow when the normalized output is unused (dy is None in backward)."""
    x, r = (torch.randn(3, 16, requires_grad=True) for _ in range(2))
    with fastlm.use_backend(be):
        _, s = ops.layer_norm(x, 16, residual=r)
        s.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    torch.testing.assert_close(r.grad, torch.ones_like(r))


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_mixed_residual_dtype_promotes(be):
    """A float32 residual stream beside bf16 activations: the sum stays float32."""
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 32, dtype=torch.float32, requires_grad=True)
    with fastlm.use_backend(be):
        y, s = ops.layer_norm(x, 32, residual=r)
        (y.float().sum() + s.sum()).backward()
    assert s.dtype == torch.float32 and y.dtype == torch.float32
    assert_equal(s, x.float() + r, "s", "one float32 add, as torch's")
    assert x.grad.dtype == torch.bfloat16 and r.grad.dtype == torch.float32


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_out_dtype_float32_from_bf16(be):
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with fastlm.use_backend(be):
        y = ops.layer_norm(x, 64, out_dtype=torch.float32)
    ref = F.layer_norm(x.double(), (64,))
    assert y.dtype == torch.float32
    # No bf16 rounding on the way out: far tighter than a bf16 ulp.
    assert (y.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_non_contiguous_input(be):
    x = torch.randn(48, 5, 3).transpose(0, 2)  # (3, 5, 48), last dim strided
    w = torch.randn(48)
    with fastlm.use_backend(be):
        y = ops.rms_norm(x, 48, w)
    torch.testing.assert_close(y, F.rms_norm(x, (48,), w))


def test_rms_norm_default_eps_matches_torch():
    # PyTorch takes the eps of its compute dtype: float32's for half inputs.
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = torch.full((2, 4), 1e-4, dtype=dtype)
        torch.testing.assert_close(ops.rms_norm(x, 4), F.rms_norm(x, (4,)))


def test_float64_gradcheck_torch_backend():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: ops.layer_norm(a[0], 7, a[2], a[3], residual=a[1]), (x, r, w, b)
    )
    assert torch.autograd.gradcheck(lambda *a: ops.rms_norm(a[0], 7, a[1]), (x, w))


# --- torch.compile ---------------------------------------------------------------------------


class _PreNormBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = fastlm.nn.LayerNorm(d)
        self.fc = torch.nn.Linear(d, d)
        self.norm2 = fastlm.nn.RMSNorm(d)

    def forward(self, h):
        y = self.fc(self.norm1(h))
        y, h = self.norm2(y, residual=h)
        return y + h


def test_forced_backend_reaches_backward_on_another_thread(calls):
    """Autograd may run backward on its own threads, outside the caller's context."""
    x = torch.randn(3, 8, requires_grad=True)
    with fastlm.use_backend("triton"):
        y = ops.layer_norm(x, 8)
    y.sum().backward()  # outside the context
    assert calls == [("fwd", "triton"), ("bwd", "triton")]


@pytest.mark.parametrize("be", [None, "triton"], ids=["native", "custom-op"])
def test_torch_compile_fullgraph_forward_and_backward(be, calls):
    """On CPU the default is PyTorch's native path; forcing triton puts fastlm's custom ops
    (run by the interpreter) in the compiled graph, forward and backward."""
    model = _PreNormBlock(32)
    x = torch.randn(4, 32, requires_grad=True)
    with fastlm.use_backend(be):
        eager = model(x)
        eager.sum().backward()
        grads_eager = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        calls.clear()
        out = compiled(x)
        out.sum().backward()
    expected = "torch" if be is None else be
    assert {name for _, name in calls} <= {expected}
    torch.testing.assert_close(out, eager)
    for g, ge in zip((p.grad for p in model.parameters()), grads_eager, strict=True):
        torch.testing.assert_close(g, ge)


def test_torch_compile_inductor_no_graph_break():
    model = _PreNormBlock(16)
    x = torch.randn(2, 3, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_compiled_rms_norm_with_a_second_eps_keeps_one_graph():
    """Dynamo makes a float it has seen with two values symbolic in the next trace (two models
    of one process with different norm eps); the contract's finiteness check must not break
    the graph on it. Both the eps and Gemma's offset go through that check."""
    torch._dynamo.reset()
    x, w = torch.randn(3, 16), torch.randn(16)

    def norm(x, w, eps, offset):
        return ops.rms_norm(x, 16, w, eps, offset=offset), ops.layer_norm(x, 16, w, None, eps)

    compiled = torch.compile(norm, fullgraph=True, backend="eager")  # raises at a graph break
    try:
        for eps, offset in ((1e-6, 1.0), (1e-3, 0.5), (0.25, 2.0)):
            for got, want in zip(compiled(x, w, eps, offset), norm(x, w, eps, offset), strict=True):
                assert_equal(got, want)
    finally:
        torch._dynamo.reset()


def test_fake_impl_matches_real_outputs():
    """torch.library's opcheck: schema, fake (meta) impl and autograd registration agree."""
    x = torch.randn(3, 10, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(3, 10, dtype=torch.bfloat16)
    w = torch.randn(10, requires_grad=True)
    for rms in (False, True):
        args = (x, w, None if rms else w, r, [10], 1e-5, rms, torch.float32, "triton")
        torch.library.opcheck(torch.ops.fastlm.norm_fwd.default, args)


def _gemma_formula(x, w, eps, offset):
    # transformers' GemmaRMSNorm, the baseline: float32 math, (offset + w) in float32, one
    # rounding at the end.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.float())
    return y.to(x.dtype)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize(
    "dtype, w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
def test_rms_norm_offset_gemma_casting_and_grads(be, dtype, w_dtype):
    n, eps, offset = 37, 1e-6, 1.0
    x = (3 * torch.randn(5, n)).to(dtype).requires_grad_()
    w = torch.randn(n, dtype=w_dtype, requires_grad=True)
    dy = torch.randn(5, n, dtype=dtype)
    with fastlm.use_backend(be):
        y = ops.rms_norm(x, n, w, eps, offset=offset)
        got = _grads((y.float() * dy.float()).sum(), (x, w))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref_y = ops.rms_norm_ref(x64, (n,), w64, eps, offset=offset)
    ref = _grads((ref_y * dy.double()).sum(), (x64, w64))
    xb, wb = (t.detach().requires_grad_() for t in (x, w))
    base_y = _gemma_formula(xb, wb, eps, offset)
    base = _grads((base_y.float() * dy.float()).sum(), (xb, wb))
    assert y.dtype == dtype and got[1].dtype == w_dtype
    if be == "torch":
        # The same float32 operations as transformers' GemmaRMSNorm, rounded once.
        assert_equal(y, base_y, "y")
    assert_policy(y, ref_y, base_y, "y")
    xhat = F.rms_norm(x64.detach(), (n,), eps=eps)
    scales = (None, summand_scale(dy.double() * xhat, 0))
    for name, g, r, bs, scale in zip(("dx", "dw"), got, ref, base, scales, strict=True):
        assert_policy(g, r, bs, name, scale=scale)


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_rms_norm_offset_with_residual(be):
    x, r = (torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w = torch.randn(24, dtype=torch.bfloat16, requires_grad=True)
    with fastlm.use_backend(be):
        y, s = ops.rms_norm(x, 24, w, 1e-6, residual=r, offset=0.5)
        got = _grads(y.float().sum(), (x, r, w))
    leaves = [t.detach().double().requires_grad_() for t in (x, r, w)]
    ref_y, _ = ops.rms_norm_ref(leaves[0], (24,), leaves[2], 1e-6, leaves[1], offset=0.5)
    ref = _grads(ref_y.sum(), leaves)
    xb, rb, wb = (t.detach().requires_grad_() for t in (x, r, w))
    base_y = _gemma_formula(xb + rb, wb, 1e-6, 0.5)
    base = _grads(base_y.float().sum(), (xb, rb, wb))
    assert_equal(s, x.detach() + r.detach(), "s")
    assert_policy(y, ref_y, base_y, "y")
    xhat = F.rms_norm((leaves[0] + leaves[1]).detach(), (24,), eps=1e-6)
    scales = (None, None, summand_scale(xhat, 0))
    for name, g, rf, bs, scale in zip(("dx", "dr", "dw"), got, ref, base, scales, strict=True):
        assert_policy(g, rf, bs, name, scale=scale)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, word",
    [
        (lambda x: ops.layer_norm(x, 8, weight=torch.randn(7)), ValueError, "weight"),
        (lambda x: ops.layer_norm(x, 8, bias=torch.randn(8, 1)), ValueError, "bias"),
        (lambda x: ops.layer_norm(x.long(), 8), TypeError, "x"),
        (
            lambda x: ops.rms_norm(x, 8, weight=torch.ones(8, dtype=torch.int32)),
            TypeError,
            "weight",
        ),
        (
            lambda x: ops.layer_norm(x, 8, weight=torch.randn(8, device="meta")),
            ValueError,
            "weight",
        ),
        (lambda x: ops.rms_norm(x, 8, residual=torch.randn(4, 9)), ValueError, "residual"),
        (
            lambda x: ops.rms_norm(x, 8, residual=torch.randn(4, 8, device="meta")),
            ValueError,
            "residual",
        ),
        (lambda x: ops.layer_norm(x, 9), ValueError, "normalized_shape"),
        (lambda x: ops.layer_norm(x, (0,)), ValueError, "normalized_shape"),
        (lambda x: ops.layer_norm(x, 8, eps=-1.0), ValueError, "eps"),
        (lambda x: ops.layer_norm(x, 8, out_dtype=torch.int8), TypeError, "out_dtype"),
        (lambda x: ops.layer_norm([1.0], 1), TypeError, "x"),
        (lambda x: ops.rms_norm(x, 8, offset=1.0), ValueError, "offset"),
        (lambda x: ops.rms_norm(x, 8, torch.ones(8), offset=float("nan")), ValueError, "offset"),
        (lambda x: ops.rms_norm(x, 8, torch.ones(8), offset="1"), TypeError, "offset"),
        # The contract's inline fast checks hand every failure to the wording helpers.
        (lambda x: ops.rms_norm(x, (8.0,)), TypeError, "normalized_shape"),
        (lambda x: ops.rms_norm(x, True), TypeError, "normalized_shape"),
        (lambda x: ops.rms_norm(x, torch.Size([9])), ValueError, "normalized_shape"),
        (lambda x: ops.rms_norm(x[0, 0], 1), ValueError, "normalized_shape"),
        (lambda x: ops.rms_norm(x, (8,), weight=[1.0] * 8), TypeError, "weight"),
        (lambda x: ops.layer_norm(x, 8, bias=[0.0] * 8), TypeError, "bias"),
        (lambda x: ops.rms_norm(x, 8, residual=x.tolist()), TypeError, "residual"),
        (lambda x: ops.layer_norm(x, 8, eps=float("nan")), ValueError, "eps"),
        (lambda x: ops.layer_norm(x, 8, eps=True), TypeError, "eps"),
        (lambda x: ops.rms_norm(x, 8, eps=-1e-6), ValueError, "eps"),
    ],
)
def test_bad_input_names_the_argument(call, error, word):
    with pytest.raises(error, match=rf"\b{word}\b"):
        call(torch.randn(4, 8))
