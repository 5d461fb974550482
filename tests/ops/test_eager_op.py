"""EagerOp: the custom op where graphs, subclasses and modes need it, the same function
directly (or through an autograd.Function of the same backward) in plain eager mode."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.ops._common import EagerOp


def _scale(x: Tensor, w: Tensor, factor: float) -> tuple[Tensor, Tensor]:
    """(x * w * factor, an auxiliary output) — small enough to check by hand."""
    return x * w * factor, (x * w).sum(-1)


_op = torch.library.custom_op("fastlm_test::scale", _scale, mutates_args=())


@_op.register_fake
def _(x, w, factor):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


def _setup(ctx, inputs, output):
    x, w, factor = inputs
    ctx.save_for_backward(x, w)
    ctx.factor = factor


def _backward(ctx, dy, daux):
    x, w = ctx.saved_tensors
    dy = dy * ctx.factor + daux[..., None]
    return dy * w, (dy * x).sum(0), None


scale = EagerOp(_op, _scale, _setup, _backward)


def _dispatched(fn) -> bool:
    """Whether calling ``fn`` went through the dispatcher as fastlm_test::scale (recorded by
    the profiler; a dispatch mode would itself send EagerOp to the dispatcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("fastlm_test::scale" in e.name for e in prof.events())


def _inputs(requires_grad: bool):
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=requires_grad)
    w = torch.randn(5, dtype=torch.float64, requires_grad=requires_grad)
    return x, w


def test_plain_eager_calls_skip_the_dispatcher_and_match_the_op():
    x, w = _inputs(False)
    y, aux = scale(x, w, 2.0)
    y_op, aux_op = _op(x, w, 2.0)
    assert torch.equal(y, y_op) and torch.equal(aux, aux_op)
    assert not _dispatched(lambda: scale(x, w, 2.0))
    assert _dispatched(lambda: _op(x, w, 2.0))


@pytest.mark.parametrize("which", ["both", "x", "w"])
def test_gradients_through_the_eager_function_equal_the_custom_ops(which):
    x, w = _inputs(False)
    x.requires_grad_(which in ("both", "x"))
    w.requires_grad_(which in ("both", "w"))
    leaves = [t for t in (x, w) if t.requires_grad]
    dy, daux = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def grads(fn):
        y, aux = fn(x, w, 2.0)
        return torch.autograd.grad((y * dy).sum() + (aux * daux).sum(), leaves)

    eager, via_op = grads(scale), grads(_op)
    assert not _dispatched(lambda: grads(scale))
    for a, b in zip(eager, via_op, strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


def test_gradcheck_of_the_eager_function():
    x, w = _inputs(True)
    assert torch.autograd.gradcheck(lambda x, w: scale(x, w, 3.0), (x, w))


def test_no_grad_and_inference_mode_call_the_function_without_a_graph():
    x, w = _inputs(True)
    with torch.no_grad():
        y, _ = scale(x, w, 2.0)
    assert y.grad_fn is None
    with torch.inference_mode():
        y, _ = scale(x.detach(), w.detach(), 2.0)
    assert y.grad_fn is None


def test_compiled_calls_trace_the_custom_op_fullgraph():
    x, w = _inputs(True)
    compiled = torch.compile(
        lambda x, w: scale(x, w, 2.0)[0] * 2, fullgraph=True, backend="aot_eager"
    )
    got = torch.autograd.grad(compiled(x, w).sum(), (x, w))
    want = torch.autograd.grad((scale(x, w, 2.0)[0] * 2).sum(), (x, w))
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a - b).abs().max()


def test_dispatch_modes_and_subclasses_get_the_custom_op():
    x, w = _inputs(False)
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        scale(x, w, 2.0)
    assert any("fastlm_test.scale" in name for name in seen), seen

    class Tagged(Tensor):  # a plain subclass: EagerOp must not assume a plain Tensor
        pass

    assert _dispatched(lambda: scale(x.as_subclass(Tagged), w, 2.0))


def test_a_second_derivative_through_the_eager_function_raises():
    # fastlm's backwards run kernels with no autograd of their own (through the custom op a
    # second derivative reaches one and raises): the eager entrance must raise too, never
    # return a silently zero second derivative.
    x, w = _inputs(True)
    y, aux = scale(x, w, 2.0)
    (dx,) = torch.autograd.grad((y * y).sum() + aux.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        dx.sum().backward()
