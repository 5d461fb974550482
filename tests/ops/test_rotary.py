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


# --- the torch path against the plain formula ----------------------------------------------


def _plain(x, cos, sin, interleaved, pos):
    """What a user writes: Hugging Face Llama's ``x * cos + rotate_half(x) * sin`` (GPT-J's
    every-two rotation when interleaved) on full-width tables gathered at ``pos`` (B, S),
    partial rotary as GPT-NeoX (the rest concatenated back)."""
    r2 = cos.shape[1]
    c, s = cos[pos][:, :, None], sin[pos][:, :, None]  # (B, S, 1, R/2)
    rot, rest = x[..., : 2 * r2], x[..., 2 * r2 :]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        swapped = torch.stack((-rot[..., 1::2], rot[..., ::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        swapped = torch.cat((-rot[..., r2:], rot[..., :r2]), -1)
    return torch.cat((rot * c + swapped * s, rest), -1)


def _positions_of(kind, b, s, max_pos):
    """(kwargs for apply_rotary, the (B, S) positions they mean)."""
    if kind == "offset":
        off = int(torch.randint(0, max_pos - s + 1, ()))
        return dict(offset=off), (torch.arange(s) + off).expand(b, s)
    if kind == "offsets":
        offs = torch.randint(0, max_pos - s + 1, (b,), dtype=torch.int32)
        return dict(offset=offs), offs[:, None].long() + torch.arange(s)
    ids = torch.randint(0, max_pos, (1, s))
    return dict(position_ids=ids), ids.expand(b, s)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("rot", [26, 38], ids=["partial", "full"])
@pytest.mark.parametrize("positions", ["offset", "offsets", "position_ids"])
@pytest.mark.parametrize("order", ["swapped copy", "half temporaries"])
def test_torch_path_is_the_plain_formula_bit_for_bit(
    interleaved, rot, positions, order, monkeypatch
):
    """float32: the same products and sums as the plain formula, so the same bits, forward
    (without grad, in both of the torch path's orders; with grad) and backward (its autograd
    against the torch path's transposed rotation). Odd sizes, grouped-query k, a strided q."""
    if order == "half temporaries":  # what large tensors get without grad
        monkeypatch.setattr(rotary_ops, "_HALVES_FROM", 0)
    b, s, hq, hk, d, max_pos = 3, 7, 5, 1, 38, 19
    q = torch.randn(b, hq, s, d).transpose(1, 2).requires_grad_()  # (B, S, H, D), strided
    k = torch.randn(b, s, hk, d, requires_grad=True)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), torch.rand(rot // 2) * 3)
    cos, sin = angles.cos(), angles.sin()
    kw, pos = _positions_of(positions, b, s, max_pos)
    q0, k0 = q.detach().clone(), k.detach().clone()
    with fastlm.use_backend("torch"):
        with torch.no_grad():
            no_grad_outputs = apply_rotary(q, k, cos, sin, interleaved, **kw)
        qr, kr = apply_rotary(q, k, cos, sin, interleaved, **kw)
    pq, pk = _plain(q, cos, sin, interleaved, pos), _plain(k, cos, sin, interleaved, pos)
    no_grad_q, no_grad_k = no_grad_outputs
    checks = (
        (qr, pq, "q"),
        (kr, pk, "k"),
        (no_grad_q, pq, "no-grad q"),
        (no_grad_k, pk, "no-grad k"),
    )
    for got, want, name in checks:
        diff = (got - want).abs().max().item()
        assert torch.equal(got, want), f"{name}_rot differs from the plain formula by {diff}"
    dq, dk = torch.randn_like(qr), torch.randn_like(kr)
    got = torch.autograd.grad((qr, kr), (q, k), (dq, dk))
    want = torch.autograd.grad((pq, pk), (q, k), (dq, dk))
    for g, w, name in zip(got, want, ("dq", "dk"), strict=True):
        assert torch.equal(g, w), f"{name} differs by {(g - w).abs().max().item()}"
    assert torch.equal(q, q0) and torch.equal(k, k0), "the out-of-place path wrote its inputs"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_torch_path_half_precision_meets_the_policy(dtype, interleaved):
    """Half precision computes in float32 and rounds once; against float64, within the
    policy's bound set by the plain formula at the input dtype. Gradients too."""
    b, s, hq, hk, d, rot, max_pos = 2, 9, 3, 2, 22, 18, 13
    q = torch.randn(b, s, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, s, hk, d, dtype=dtype, requires_grad=True)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), torch.rand(rot // 2) * 3)
    cos, sin = angles.cos(), angles.sin()
    kw, pos = _positions_of("position_ids", b, s, max_pos)
    with fastlm.use_backend("torch"):
        qr, kr = apply_rotary(q, k, cos, sin, interleaved, **kw)
    dq, dk = torch.randn_like(qr), torch.randn_like(kr)
    gq, gk = torch.autograd.grad((qr, kr), (q, k), (dq, dk))
    c64, s64 = cos.double(), sin.double()
    for got, x, dy, g, name in ((qr, q, dq, gq, "q"), (kr, k, dk, gk, "k")):
        x = x.detach()
        assert got.dtype == dtype
        ref = _plain(x.double(), c64, s64, interleaved, pos)
        assert_policy(got, ref, _plain(x, cos.to(dtype), sin.to(dtype), interleaved, pos), name)
        ref_g = _plain(dy.double(), c64, -s64, interleaved, pos)
        base_g = _plain(dy, cos.to(dtype), -sin.to(dtype), interleaved, pos)
        assert_policy(g, ref_g, base_g, f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_torch_inplace_equals_out_of_place(dtype, interleaved):
    q, k, cos, sin = _inputs(b=2, s=6, hq=3, hk=1, d=30, rot=22, dtype=dtype)
    expected = apply_rotary(q, k, cos, sin, interleaved, offset=5)
    with torch.no_grad():
        out = apply_rotary(q, k, cos, sin, interleaved, offset=5, inplace=True)
    assert out[0] is q and out[1] is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])


def test_only_one_output_used_gives_gradients_to_its_input():
    q, k, cos, sin = _inputs(dtype=torch.float64)
    q.requires_grad_(), k.requires_grad_()
    _, kr = apply_rotary(q, k, cos, sin, offset=2)
    gq, gk = torch.autograd.grad(kr.sum(), (q, k), allow_unused=True, materialize_grads=True)
    assert torch.equal(gq, torch.zeros_like(q))
    torch.testing.assert_close(gk, apply_rotary_ref(torch.ones_like(k), cos, -sin, offset=2))


def test_tables_rebuilt_after_in_place_changes():
    """The torch path reuses the tables it derived for the same cos/sin/positions; a change
    in place to any of them must not be missed."""
    q, k, cos, sin = _inputs()
    ids = torch.randint(0, 16, (1, 5))
    apply_rotary(q, k, cos, sin, position_ids=ids)
    for change in (lambda: cos.mul_(0.5), lambda: sin.neg_(), lambda: ids.fill_(3)):
        change()
        qr, kr = apply_rotary(q, k, cos, sin, position_ids=ids)
        torch.testing.assert_close(qr, apply_rotary_ref(q, cos, sin, position_ids=ids))
        torch.testing.assert_close(kr, apply_rotary_ref(k, cos, sin, position_ids=ids))


def test_position_range_checked_again_after_in_place_changes():
    """The range check remembers the min/max of a position tensor; a change in place must
    reach it."""
    q, k, cos, sin = _inputs()
    ids = torch.randint(0, 16, (2, 5))
    offsets = torch.tensor([0, 3])
    apply_rotary(q, k, cos, sin, position_ids=ids)
    apply_rotary(q, k, cos, sin, offset=offsets)
    ids[1, 2] = 16
    offsets[0] = 12
    with pytest.raises(ValueError, match="position_ids"):
        apply_rotary(q, k, cos, sin, position_ids=ids)
    with pytest.raises(ValueError, match="offset"):
        apply_rotary(q, k, cos, sin, offset=offsets)


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
