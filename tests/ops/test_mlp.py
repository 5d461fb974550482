"""fastlm.ops linear_act / gated_linear / fused_mlp / gated_mlp: both backends, gradients,
what the backward keeps, dropout, torch.compile, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import activation as act_kernels

import fastlm
from fastlm import ops
from fastlm.backend import BackendUnavailable
from fastlm.ops.activation import ACTIVATIONS, bias_act_ref
from fastlm.testing import assert_policy

BACKENDS_HERE = ["torch", "triton"]  # triton on CPU tensors = the interpreter
LEAD = (2, 3)  # leading dims of x: (batch, sequence)


def _params(shapes, dtype, bias_at=()):
    """Weights (scaled like nn.Linear's init) for ``shapes`` (out, in), biases at the given
    positions of the returned list (None elsewhere)."""
    out = []
    for i, shape in enumerate(shapes):
        if isinstance(shape, int):
            out.append(torch.randn(shape, dtype=dtype) if i in bias_at else None)
        else:
            out.append(torch.randn(*shape, dtype=dtype) / shape[1] ** 0.5)
    return out


def _check_grads(fn, tensors, be, dtype):
    """Output and every gradient of ``fn`` on backend ``be`` within the numerical policy of
    the float64 reference, against torch's own result at ``dtype``."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]
    dy = torch.randn_like(fn(*leaves).float())

    def run(ts, backend):
        with fastlm.use_backend(backend):
            y = fn(*ts)
        present = [t for t in ts if t is not None]
        return y, torch.autograd.grad((y * dy.to(y.dtype)).sum(), present)

    ref = run(
        [None if t is None else t.detach().double().requires_grad_() for t in leaves], "torch"
    )
    base = run([None if t is None else t.detach().requires_grad_() for t in leaves], "torch")
    got = run(leaves, be)
    assert_policy(got[0], ref[0], base[0], "y")
    for i, (g, r, b) in enumerate(zip(got[1], ref[1], base[1], strict=True)):
        assert_policy(g, r, b, f"grad {i}")


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_act(be, activation, dtype):
    w, b = _params([(37, 24), 37], dtype, bias_at=(1,))
    x = torch.randn(*LEAD, 24)
    _check_grads(lambda x, w, b: ops.linear_act(x, w, b, activation), [x, w, b], be, dtype)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_linear(be, activation, with_bias):
    params = _params(
        [(45, 32), (45, 32), 45, 45], torch.bfloat16, bias_at=(2, 3) if with_bias else ()
    )
    x = torch.randn(*LEAD, 32)
    _check_grads(
        lambda x, wg, wu, bg, bu: ops.gated_linear(x, wg, wu, activation, bg, bu),
        [x, *params],
        be,
        torch.bfloat16,
    )


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("activation", ["gelu", "relu", "identity"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_mlp(be, activation, with_bias):
    params = _params(
        [(70, 24), 70, (19, 70), 19], torch.bfloat16, bias_at=(1, 3) if with_bias else ()
    )
    x = torch.randn(*LEAD, 24)
    _check_grads(lambda x, *p: ops.fused_mlp(x, *p, activation), [x, *params], be, torch.bfloat16)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_mlp(be, activation, with_bias):
    params = _params(
        [(40, 24), (40, 24), (24, 40), 40, 40, 24],
        torch.bfloat16,
        bias_at=(3, 4, 5) if with_bias else (),
    )
    x = torch.randn(*LEAD, 24)
    _check_grads(
        lambda x, *p: ops.gated_mlp(x, *p[:3], activation, *p[3:]), [x, *params], be, torch.bfloat16
    )


def test_fp16_gradients_under_the_policy_too():
    params = _params([(40, 24), (40, 24), (24, 40)], torch.float16)
    _check_grads(
        lambda x, *p: ops.gated_mlp(x, *p), [torch.randn(5, 24), *params], "triton", torch.float16
    )


# --- dropout -------------------------------------------------------------------------------


def test_fused_mlp_dropout_forward_and_backward_follow_the_kernel_masks():
    """With dropout, the Triton path is checked against the MLP built from the very masks its
    kernels draw (hidden: seed, output: seed + 1), under the numerical policy."""
    m, d_in, hidden, d_out, p, seed = 12, 16, 48, 20, 0.3, 1234

    def mask(rows, cols, s):
        ones = torch.ones(rows, cols, dtype=torch.float32)
        return act_kernels.bias_act_fwd(ones, None, "identity", p, s)

    keep1, keep2 = mask(m, hidden, seed), mask(m, d_out, seed + 1)

    def masked_mlp(x, w1, b1, w2, b2):
        h = bias_act_ref(F.linear(x, w1, b1), None, "gelu") * keep1.to(x.dtype)
        return F.linear(h, w2, b2) * keep2.to(x.dtype)

    def fused(x, w1, b1, w2, b2):
        if x.dtype == torch.float64:  # the reference, from the masks
            return masked_mlp(x, w1, b1, w2, b2)
        with fastlm.use_backend("triton"):
            return ops.fused_mlp(x, w1, b1, w2, b2, "gelu", p, seed)

    params = _params([(hidden, d_in), hidden, (d_out, hidden), d_out], torch.bfloat16, (1, 3))
    x = torch.randn(m, d_in, dtype=torch.bfloat16)
    leaves = [t.requires_grad_() for t in (x, *params)]
    y = fused(*leaves)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = masked_mlp(*ref_leaves)
    ref_grads = torch.autograd.grad((ref * dy.double()).sum(), ref_leaves)
    base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    base = masked_mlp(*base_leaves)
    base_grads = torch.autograd.grad((base * dy).sum(), base_leaves)
    assert_policy(y, ref, base, "y")
    for i, (g, r, b) in enumerate(zip(grads, ref_grads, base_grads, strict=True)):
        assert_policy(g, r, b, f"grad {i}")


@pytest.mark.parametrize("be", BACKENDS_HERE)
def test_dropout_reproducible_by_seed(be):
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    w1, w2 = _params([(64, 32), (32, 64)], torch.bfloat16)
    with fastlm.use_backend(be):
        a, b = (ops.fused_mlp(x, w1, None, w2, None, "relu", 0.5, seed=3) for _ in range(2))
        c = ops.fused_mlp(x, w1, None, w2, None, "relu", 0.5, seed=4)
        d = ops.linear_act(x, w1, None, "relu", 0.5, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.3 < (d == 0).float().mean().item() < 0.95  # relu zeros plus dropped ones


# --- what the backward keeps -----------------------------------------------------------------


def _saved_activation_elements(fn, params) -> int:
    """Elements of the tensors autograd keeps for the backward, parameters excluded."""
    param_ptrs = {p.data_ptr() for p in params if p is not None}
    saved = []

    def pack(t):
        if t.data_ptr() not in param_ptrs:
            saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_fused_mlp_keeps_x_and_one_hidden_tensor_where_eager_keeps_two():
    m, d_in, hidden = 10, 24, 64
    x = torch.randn(m, d_in, dtype=torch.bfloat16, requires_grad=True)
    shapes = [(hidden, d_in), hidden, (d_in, hidden), d_in]
    w1, b1, w2, b2 = (t.requires_grad_() for t in _params(shapes, torch.bfloat16, (1, 3)))

    def run(be):
        def call():
            with fastlm.use_backend(be):
                return ops.fused_mlp(x, w1, b1, w2, b2, "gelu")

        return call

    fused = _saved_activation_elements(run("triton"), [w1, b1, w2, b2])
    eager = _saved_activation_elements(run("torch"), [w1, b1, w2, b2])
    assert fused == m * d_in + m * hidden
    assert eager >= m * d_in + 2 * m * hidden


def test_gated_mlp_keeps_two_hidden_tensors_where_eager_keeps_four():
    m, d, inter = 10, 24, 64
    x = torch.randn(m, d, dtype=torch.bfloat16, requires_grad=True)
    params = [
        t.requires_grad_() for t in _params([(inter, d), (inter, d), (d, inter)], torch.bfloat16)
    ]

    def run(be):
        def call():
            with fastlm.use_backend(be):
                return ops.gated_mlp(x, *params)

        return call

    assert _saved_activation_elements(run("triton"), params) == m * d + 2 * m * inter
    assert _saved_activation_elements(run("torch"), params) >= m * d + 4 * m * inter


def test_inference_keeps_nothing_and_backward_without_saved_pre_recomputes_it():
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    y, pre = torch.ops.fastlm.linear_act(x, w, None, "gelu", 0.0, 0, False)
    assert pre.numel() == 0
    # The op called without saving, then differentiated: the backward recomputes pre.
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y, _ = torch.ops.fastlm.linear_act(xg, wg, None, "gelu", 0.0, 0, False)
    grads = torch.autograd.grad(y.float().sum(), (xg, wg))

    def reference(dtype):
        with fastlm.use_backend("torch"):
            leaves = [t.to(dtype).requires_grad_() for t in (x, w)]
            out = ops.linear_act(*leaves, None, "gelu").sum()
            return torch.autograd.grad(out, leaves)

    for name, *results in zip(
        ("dx", "dw"), grads, reference(torch.float64), reference(x.dtype), strict=True
    ):
        assert_policy(*results, name)


# --- compile, opcheck, dispatch --------------------------------------------------------------


def test_compiles_fullgraph_with_the_custom_ops():
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    wg, wu, wd = (
        t.requires_grad_() for t in _params([(24, 16), (24, 16), (16, 24)], torch.bfloat16)
    )

    def fn(x):
        return ops.gated_mlp(x, wg, wu, wd).sum() + ops.linear_act(x, wg, None, "relu").sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend("triton"):
        eager = fn(x)
        got = compiled(x)
        torch.autograd.grad(got.float().sum(), (x, wg))
    torch.testing.assert_close(got, eager)


@pytest.mark.parametrize(
    "op, args",
    [
        ("linear_act", lambda x, w, b: (x, w, b, "gelu", 0.0, 0, True)),
        ("gated_linear", lambda x, w, b: (x, w, w.clone(), b, b.clone(), "silu", True)),
        ("fused_mlp", lambda x, w, b: (x, w, b, w.T.contiguous(), None, "gelu_tanh", 0.0, 0, True)),
        (
            "gated_mlp",
            lambda x, w, b: (x, w, w.clone(), w.T.contiguous(), None, None, None, "silu", True),
        ),
    ],
)
def test_opcheck(op, args):
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(16, 16, dtype=torch.bfloat16) / 4).requires_grad_()
    b = torch.randn(16, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.fastlm, op).default, args(x, w, b))


def test_fp32_runs_the_torch_backend_and_forcing_triton_says_why():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    torch.testing.assert_close(ops.linear_act(x, w, None, "silu"), F.silu(x @ w.T))
    with fastlm.use_backend("triton"), pytest.raises(BackendUnavailable, match="fp16/bf16"):
        ops.linear_act(x, w, None, "silu")


# --- bad input -------------------------------------------------------------------------------


_X = torch.randn(2, 8, dtype=torch.bfloat16)
_W = torch.randn(4, 8, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    "call, error, word",
    [
        (lambda: ops.linear_act(_X, _W, activation="swish"), ValueError, "activation"),
        (lambda: ops.linear_act(_X, _W[:, :5]), ValueError, "weight"),
        (lambda: ops.linear_act(_X, _W.float()), TypeError, "weight"),
        (lambda: ops.linear_act(_X, _W, torch.ones(3, dtype=torch.bfloat16)), ValueError, "bias"),
        (lambda: ops.linear_act(_X, _W, dropout_p=1.0), ValueError, "dropout_p"),
        (lambda: ops.linear_act(_X.long(), _W), TypeError, "x"),
        (lambda: ops.gated_linear(_X, _W, _W[:3]), ValueError, "w_up"),
        (lambda: ops.gated_linear(_X, _W, _W, bias_gate=_W[0, :4]), ValueError, "bias_up"),
        (lambda: ops.fused_mlp(_X, _W, None, _W, None), ValueError, "fc2_weight"),
        (lambda: ops.fused_mlp(_X, _W, None, _W.T, _W[0, :2]), ValueError, "fc2_bias"),
        (lambda: ops.fused_mlp(_X, _W, None, _W.T, torch.ones(8)), TypeError, "fc2_bias"),
        (lambda: ops.gated_mlp(_X, _W, _W, _W), ValueError, "down_weight"),
        (lambda: ops.gated_mlp(_X, _W, _W, _W.T.float()), TypeError, "down_weight"),
    ],
)
def test_bad_input(call, error, word):
    with pytest.raises(error, match=word):
        call()


# ---------------------------------------------------------------------------------------------
# The torch path's in-place fast paths and the Triton path's eager entrance.


def _plain_expressions(x, w1, b1, w2, b2, w3, act):
    """Each op against the plain PyTorch expression it replaces."""
    f = {
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
        "silu": F.silu,
        "identity": lambda t: t,
    }[act]
    return {
        "linear_act": (
            lambda: ops.linear_act(x, w1, b1, act),
            lambda: f(F.linear(x, w1, b1)),
        ),
        "gated_linear": (
            lambda: ops.gated_linear(x, w1, w2, act, b1, b2),
            lambda: f(F.linear(x, w1, b1)) * F.linear(x, w2, b2),
        ),
        "fused_mlp": (
            lambda: ops.fused_mlp(x, w1, b1, w3, None, act),
            lambda: F.linear(f(F.linear(x, w1, b1)), w3),
        ),
        "gated_mlp": (
            lambda: ops.gated_mlp(x, w1, w2, w3, act, b1, b2),
            lambda: F.linear(f(F.linear(x, w1, b1)) * F.linear(x, w2, b2), w3),
        ),
    }


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_path_is_the_plain_expression_bit_for_bit(activation, dtype, grad):
    # In place or not, the torch path runs the plain expression's operations: the same bits,
    # forward and backward, and the caller's tensors are left as they were.
    x = torch.randn(*LEAD, 24, dtype=dtype)
    w1, b1, w2, b2, w3 = _params([(40, 24), 40, (40, 24), 40, (24, 40)], dtype, bias_at=(1, 3))
    leaves = [t.requires_grad_(grad) for t in (x, w1, b1, w2, b2, w3)]
    before = [(t.detach().clone(), t._version) for t in leaves]
    for name, (fast, plain) in _plain_expressions(*leaves, activation).items():
        got, want = fast(), plain()
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert got.requires_grad == want.requires_grad == grad, name
        if grad:
            dy = torch.randn_like(want)
            g_got = torch.autograd.grad(got, leaves, dy, allow_unused=True)
            g_want = torch.autograd.grad(want, leaves, dy, allow_unused=True)
            for i, (a, b) in enumerate(zip(g_got, g_want, strict=True)):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), (name, i)
    for t, (value, version) in zip(leaves, before, strict=True):
        assert t._version == version and torch.equal(t.detach(), value)


_EAGER_VS_COMPILED = {
    "linear_act": lambda x, w1, w2, w3, b1, b2: ops.linear_act(x, w1, b1, "gelu_tanh"),
    "gated_linear": lambda x, w1, w2, w3, b1, b2: ops.gated_linear(x, w1, w2, "silu", b1, b2),
    "fused_mlp": lambda x, w1, w2, w3, b1, b2: ops.fused_mlp(x, w1, b1, w3, None, "gelu"),
    "gated_mlp": lambda x, w1, w2, w3, b1, b2: ops.gated_mlp(x, w1, w2, w3, "silu", b1, b2),
}


@pytest.mark.parametrize("name", list(_EAGER_VS_COMPILED))
def test_eager_entrance_equals_the_compiled_custom_op(name):
    # Plain eager runs the kernels' functions directly (an autograd.Function when grads are
    # needed); torch.compile runs the registered custom op. Same functions, same numbers.
    fn = _EAGER_VS_COMPILED[name]
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    params = _params([(24, 16), (24, 16), (16, 24), 24, 24], torch.bfloat16, bias_at=(3, 4))
    leaves = [x, *(p.requires_grad_() for p in params)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with fastlm.use_backend("triton"):
        eager = fn(*leaves)
        got = compiled(*leaves)
        dy = torch.randn_like(eager)
        g_eager = torch.autograd.grad(eager, leaves, dy, allow_unused=True)
        g_got = torch.autograd.grad(got, leaves, dy, allow_unused=True)
    assert torch.equal(got, eager)
    for i, (a, b) in enumerate(zip(g_got, g_eager, strict=True)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), i


def test_a_known_signature_still_checks_dropout_and_a_failure_is_never_kept():
    """linear_act's, gated_linear's, fused_mlp's and gated_mlp's metadata checks are
    memoized per signature: dropout is still checked on a known one, and a failing signature
    raises every time."""
    x, w, b = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16)
    w_up, w_down = torch.randn(16, 8), torch.randn(8, 16)
    ops.linear_act(x, w, b, "gelu")  # these signatures pass (and are remembered)
    ops.gated_mlp(x, w, w_up, w_down, "silu")
    ops.gated_linear(x, w, w_up, "silu")
    ops.fused_mlp(x, w, b, w_down, None, "gelu")
    for call in (ops.linear_act, ops.fused_mlp):
        args = (x, w, b) if call is ops.linear_act else (x, w, b, w_down, None)
        with pytest.raises(ValueError, match="dropout_p"):
            call(*args, "gelu", dropout_p=1.0)
        with pytest.raises(TypeError, match="seed"):
            call(*args, "gelu", dropout_p=0.5, seed=1.5)
    for _ in range(2):  # never remembered as a pass
        with pytest.raises(ValueError, match="bias must have shape"):
            ops.linear_act(x, w, b[:4], "gelu")
        with pytest.raises(TypeError, match="weight dtype"):
            ops.linear_act(x, w.double(), b, "gelu")
        with pytest.raises(ValueError, match="down_weight"):
            ops.gated_mlp(x, w, w_up, w_down[:, :4], "silu")
        with pytest.raises(ValueError, match="gate_bias and up_bias"):
            ops.gated_mlp(x, w, w_up, w_down, "silu", gate_bias=b)
        with pytest.raises(ValueError, match="activation"):
            ops.gated_mlp(x, w, w_up, w_down, "swish")
        with pytest.raises(ValueError, match="bias_gate and bias_up"):
            ops.gated_linear(x, w, w_up, "silu", bias_up=b)
        with pytest.raises(ValueError, match="fc2_weight"):
            ops.fused_mlp(x, w, b, w_down[:, :4], None, "gelu")
        with pytest.raises(TypeError, match="fc2_bias"):
            ops.fused_mlp(x, w, b, w_down, b[:8].double(), "gelu")
    y = ops.gated_mlp(x, w, w_up, w_down, "silu")
    want = F.linear(F.silu(F.linear(x, w)) * F.linear(x, w_up), w_down)
    torch.testing.assert_close(y, want, rtol=0, atol=0)  # the plain expression, bit for bit
