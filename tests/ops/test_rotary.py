"""fastlm.ops.apply_rotary: dispatch, autograd, torch.compile, bad input."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm.backend import BackendUnavailable
from fastlm.ops import rotary as rotary_ops
from fastlm.ops.rotary import apply_rotary, apply_rotary_ref
from fastlm.testing import assert_policy

BACKENDS_HERE = ["torch", "triton"]  # triton on CPU tensors = the interpreter


@pytest.fixture
def calls(monkeypatch):
    """Records which backend served each call: "triton" per kernel launch (one per tensor),
    "torch" per call of the PyTorch path (it rotates q and k together)."""
    seen = []

    def spy(fn, name):
        def wrapped(*args):
            seen.append(name)
            return fn(*args)

        return wrapped

    monkeypatch.setitem(rotary_ops.FORWARD, "triton", spy(rotary_ops.FORWARD["triton"], "triton"))
    monkeypatch.setattr(rotary_ops, "_torch_rotary", spy(rotary_ops._torch_rotary, "torch"))
    return seen


def _inputs(b=2, s=5, hq=4, hk=2, d=32, rot=24, max_pos=16, dtype=torch.float32):
    q = torch.randn(b, s, hq, d, dtype=dtype)
    k = torch.randn(b, s, hk, d, dtype=dtype)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), torch.rand(rot // 2) * 3)
    return q, k, angles.cos(), angles.sin()


# --- dispatch ------------------------------------------------------------------------------


def test_cpu_tensors_use_torch_backend(calls):
    q, k, cos, sin = _inputs()
    apply_rotary(q, k, cos, sin)
    assert calls == ["torch"]


def test_forcing_triton_on_cpu_runs_the_interpreter(calls):
    q, k, cos, sin = _inputs()
    q.requires_grad_()
    with fastlm.use_backend("triton"):
        qr, kr = apply_rotary(q, k, cos, sin)
    qr.sum().backward()  # the backward runs on the forward's backend, outside the block
    assert calls == ["triton"] * 4


def test_forced_triton_refuses_float64():
    q, k, cos, sin = _inputs(dtype=torch.float64)
    with pytest.raises(BackendUnavailable, match="float64"), fastlm.use_backend("triton"):
        apply_rotary(q, k, cos, sin)


# --- numerics and autograd -----------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS_HERE)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("positions", ["offset", "offsets", "position_ids"])
def test_forward_and_gradients_match_reference(name, interleaved, positions):
    q, k, cos, sin = _inputs(dtype=torch.bfloat16)
    b, s = q.shape[:2]
    kw = {
        "offset": dict(offset=3),
        "offsets": dict(offset=torch.tensor([0, 11], dtype=torch.int32)),
        "position_ids": dict(position_ids=torch.randint(0, 16, (1, s))),
    }[positions]
    q.requires_grad_(), k.requires_grad_()
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    with fastlm.use_backend(name):
        qr, kr = apply_rotary(q, k, cos, sin, interleaved, **kw)
        gq, gk = torch.autograd.grad((qr, kr), (q, k), (dq, dk))
    leaves = [t.detach().double().requires_grad_() for t in (q, k)]
    refs = [apply_rotary_ref(t, cos.double(), sin.double(), interleaved, **kw) for t in leaves]
    ref_grads = torch.autograd.grad(refs, leaves, (dq.double(), dk.double()))
    for got, ref, x, sn in ((qr, refs[0], q, "q"), (kr, refs[1], k, "k")):
        base = apply_rotary_ref(x.detach(), cos, sin, interleaved, **kw)
        assert got.dtype == torch.bfloat16
        assert_policy(got, ref, base, f"{sn}_rot")
    for got, ref, dy, sn in ((gq, ref_grads[0], dq, "dq"), (gk, ref_grads[1], dk, "dk")):
        base = apply_rotary_ref(dy, cos, -sin, interleaved, **kw)
        assert_policy(got, ref, base, sn)


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_inplace(name):
    q, k, cos, sin = _inputs()
    expected = apply_rotary(q, k, cos, sin, True, offset=2)
    with fastlm.use_backend(name), torch.no_grad():
        out = apply_rotary(q, k, cos, sin, True, offset=2, inplace=True)
    assert out[0] is q and out[1] is k
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])


def test_inplace_under_autograd_copies_back():
    q, k, cos, sin = _inputs()
    q0 = torch.randn_like(q, requires_grad=True)
    qa, kb = q0 * 1, k.clone()
    expected = apply_rotary(qa.detach(), kb, cos, sin)
    with fastlm.use_backend("triton"):
        qr, _ = apply_rotary(qa, kb, cos, sin, inplace=True)
    assert qr is qa
    torch.testing.assert_close(qa.detach(), expected[0])
    (g,) = torch.autograd.grad(qr.sum(), q0)
    torch.testing.assert_close(g, apply_rotary_ref(torch.ones_like(q), cos, -sin))


def test_gradcheck_float64_torch_backend():
    q, k, cos, sin = _inputs(b=1, s=3, hq=1, hk=1, d=8, rot=6, dtype=torch.float64)
    q.requires_grad_(), k.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: apply_rotary(a, b, cos.double(), sin.double(), offset=1), (q, k)
    )


@pytest.mark.parametrize("name", BACKENDS_HERE)
def test_torch_compile_fullgraph(name):
    q, k, cos, sin = _inputs()
    q.requires_grad_()
    ids = torch.randint(0, 16, (2, 5))

    def f(q, k):
        qr, kr = apply_rotary(q, k, cos, sin, position_ids=ids)
        return qr.sum() + kr.sum()

    with fastlm.use_backend(name):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(q, k)
        (g,) = torch.autograd.grad(out, q)
        torch.testing.assert_close(out, f(q, k))
    torch.testing.assert_close(g, apply_rotary_ref(torch.ones_like(q), cos, -sin, position_ids=ids))


# --- bad input -----------------------------------------------------------------------------


def _bad(**override):
    q, k, cos, sin = _inputs()
    args = dict(q=q, k=k, cos=cos, sin=sin)
    args.update(override)
    return args


@pytest.mark.parametrize(
    "override, error, match",
    [
        (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
        (dict(k=torch.ones(2, 5, 2, 32, dtype=torch.int64)), TypeError, "k must be"),
        (dict(q=torch.randn(5, 4, 32)), ValueError, "q must be 4-D"),
        (dict(k=torch.randn(2, 6, 2, 32)), ValueError, "k must be"),
        (dict(cos=torch.randn(16)), ValueError, "cos must be"),
        (dict(sin=torch.randn(16, 4)), ValueError, "sin must have"),
        (dict(cos=torch.randn(16, 20), sin=torch.randn(16, 20)), ValueError, "rotary_dim"),
        (dict(offset=12), ValueError, "offset"),
        (dict(offset=-1), ValueError, "offset"),
        (dict(offset=1.5), TypeError, "offset"),
        (dict(offset=torch.tensor([0, 12])), ValueError, "offset"),
        (dict(offset=torch.tensor([0])), ValueError, "offset"),
        (dict(offset=torch.tensor([0.0, 1.0])), TypeError, "offset"),
        (dict(position_ids=torch.full((2, 5), 16)), ValueError, "position_ids"),
        (dict(position_ids=torch.zeros(3, 5, dtype=torch.int64)), ValueError, "position_ids"),
        (dict(position_ids=torch.zeros(2, 5)), TypeError, "position_ids"),
        (dict(position_ids=torch.zeros(2, 5, dtype=torch.int64), offset=1), ValueError, "offset"),
    ],
)
def test_bad_input_names_the_argument(override, error, match):
    with pytest.raises(error, match=match):
        apply_rotary(**_bad(**override))


def test_inplace_with_strided_last_dim_is_refused_by_triton():
    q, k, cos, sin = _inputs()
    q = torch.randn(2, 5, 4, 64)[..., ::2]
    refused = pytest.raises(BackendUnavailable, match="unit stride")
    with refused, fastlm.use_backend("triton"), torch.no_grad():
        apply_rotary(q, k, cos, sin, inplace=True)


def test_strided_last_dim_out_of_place_is_copied():
    _, k, cos, sin = _inputs()
    q = torch.randn(2, 5, 4, 64)[..., ::2]
    with fastlm.use_backend("triton"):
        qr, _ = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(qr, apply_rotary_ref(q, cos, sin))
