"""The ops remember which argument signatures passed their metadata checks
(``fastlm.ops._common.remember``). Whatever a caller passes, an op must answer the same
with that memo warm (a plain call of the same shapes and dtypes made first) as cold (the
first call in a process): the same output bits, or the same error. Each argument of each op
is replaced in turn by a hostile twin with the plain argument's shape and dtype where it
can have them: a view with other strides, a Parameter, a tensor that requires grad, NaN and
inf values, a sparse or meta tensor, an expanded or negative view, an inference tensor, a
complex one."""

from __future__ import annotations

import pytest
import torch

from fastlm import ops
from fastlm.ops._common import forget_signatures


def _twins(t: torch.Tensor):
    """(name, tensor) hostile twins of ``t``, built fresh."""
    yield "plain", t
    if t.dim() >= 2:
        yield "strided", t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if t.is_floating_point():
        yield "parameter", torch.nn.Parameter(t.clone())
        yield "requires_grad", t.clone().requires_grad_()
        for value in (float("nan"), float("inf")):
            u = t.clone()
            u.view(-1)[0] = value
            yield f"holds {value}", u
        yield "complex", torch.complex(t.float(), t.float())
        yield "negative view", torch._neg_view(t)
    else:
        yield "parameter", torch.nn.Parameter(t.clone(), requires_grad=False)
        yield "negative view", t.neg()
    yield "sparse", t.to_sparse()
    if t.dim() >= 1 and t.shape[-1] > 1:
        yield "expanded", t[..., :1].expand(t.shape)
    with torch.inference_mode():
        yield "inference", t.clone()
    yield "meta", t.to("meta")


def _outcome(call):
    try:
        out = call()
    except Exception as e:  # the error is the outcome compared
        return f"{type(e).__name__}: {e}"
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach().clone() if isinstance(o, torch.Tensor) else o for o in outs]


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and bits (NaN equal to NaN); meta tensors by metadata."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.device.type == "meta":
        return True
    return torch.equal(torch.nan_to_num(a.double(), 1e300), torch.nan_to_num(b.double(), 1e300))


def _differs(cold, warm) -> bool:
    if isinstance(cold, str) or isinstance(warm, str):
        return cold != warm
    return any(
        not _same_tensor(a, b) if isinstance(a, torch.Tensor) else a != b
        for a, b in zip(cold, warm, strict=True)
    )


def _randn(*shape):
    return torch.randn(*shape)


def _labels(n, classes):
    return torch.randint(0, classes, (n,))


# op name -> (call, argument builder); the builder returns fresh plain arguments (the
# KV cache op writes its caches in place).
CASES = {
    "flash_attention": (
        lambda q, k, v: ops.flash_attention(q, k, v, causal=True),
        lambda: [_randn(1, 4, 2, 16) for _ in range(3)],
    ),
    "scaled_dot_product_attention": (
        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda: [_randn(1, 2, 4, 16) for _ in range(3)],
    ),
    "attention_with_kvcache": (
        lambda q, kc, vc, lengths, kn, vn: ops.attention_with_kvcache(
            q, kc, vc, lengths, kn, vn, causal=True
        ),
        lambda: [
            _randn(2, 1, 2, 16),
            torch.zeros(2, 16, 2, 16),
            torch.zeros(2, 16, 2, 16),
            torch.full((2,), 5, dtype=torch.int32),
            _randn(2, 1, 2, 16),
            _randn(2, 1, 2, 16),
        ],
    ),
    "cross_entropy": (ops.cross_entropy, lambda: [_randn(4, 16), _labels(4, 16)]),
    "linear_cross_entropy": (
        ops.linear_cross_entropy,
        lambda: [_randn(4, 8), _randn(16, 8), _labels(4, 16)],
    ),
    "bias_act": (lambda x, b: ops.bias_act(x, b, "gelu"), lambda: [_randn(4, 8), _randn(8)]),
    "linear_act": (
        lambda x, w, b: ops.linear_act(x, w, b, "gelu"),
        lambda: [_randn(4, 8), _randn(6, 8), _randn(6)],
    ),
    "gated_mlp": (ops.gated_mlp, lambda: [_randn(4, 8), _randn(6, 8), _randn(6, 8), _randn(8, 6)]),
    "lora_linear": (
        lambda x, w, b, a, lb: ops.lora_linear(x, w, b, a, lb, 2.0),
        lambda: [_randn(4, 8), _randn(6, 8), _randn(6), _randn(2, 8), _randn(6, 2)],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_warm_memo_answers_every_argument_as_a_cold_one(name):
    op, build = CASES[name]
    base = build()
    mismatches = []
    for i in range(len(base)):
        for twin, _ in _twins(base[i]):

            def call(i=i, twin=twin):
                args = [a.clone() for a in base]
                args[i] = dict(_twins(args[i]))[twin]
                return op(*args)

            forget_signatures()
            cold = _outcome(call)
            forget_signatures()
            _outcome(lambda: op(*[a.clone() for a in base]))  # the plain signature remembered
            warm = _outcome(call)
            if _differs(cold, warm):
                shown = [o if isinstance(o, str) else "a result" for o in (cold, warm)]
                mismatches.append(f"argument {i} {twin}: cold {shown[0]!r}, warm {shown[1]!r}")
    assert not mismatches, f"{name}: " + "; ".join(mismatches)
