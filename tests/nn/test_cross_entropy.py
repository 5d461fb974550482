"""fastlm.nn.CrossEntropyLoss / LinearCrossEntropyLoss drop in for torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.nn.cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss
from fastlm.testing import assert_loss_policy, assert_policy

KWARGS = [
    dict(),
    dict(reduction="sum", ignore_index=3),
    dict(reduction="none", label_smoothing=0.1),
    dict(weight=torch.rand(17), label_smoothing=0.05),
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=range(len(KWARGS)))
@pytest.mark.parametrize("be", ["torch", "triton"])
def test_cross_entropy_loss_matches_torch(kwargs, be):
    ref, ours = torch.nn.CrossEntropyLoss(**kwargs), CrossEntropyLoss(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    x = torch.randn(10, 17, requires_grad=True)
    t = torch.randint(0, 17, (10,))
    t[2] = kwargs.get("ignore_index", -100)
    with fastlm.use_backend(be):
        got = ours(x, t)
    want = ref(x, t)
    # torch's loss in float64 is the reference, torch's in float32 PyTorch's own result.
    x64 = x.detach().double().requires_grad_()
    kwargs64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    want64 = torch.nn.CrossEntropyLoss(**kwargs64)(x64, t)
    rows = 9 if kwargs.get("reduction") == "sum" else 1  # t[2] is ignored
    assert_loss_policy(got, want64, x, x64, "loss", weight=2 * rows)
    g = torch.rand_like(want)
    dx, dx_torch, dx64 = (
        torch.autograd.grad(y, leaf, g.to(y.dtype))[0]
        for y, leaf in ((got, x), (want, x), (want64, x64))
    )
    # dx holds softmax(x) = exp(x - lse): one ulp of that argument is a relative error.
    ulps = (x64 - x64.logsumexp(-1, keepdim=True)).abs().max().item()
    assert_policy(dx, dx64, dx_torch, "dx", scale=ulps * dx64.abs().max().item())


@pytest.mark.parametrize("be", ["torch", "triton"])
def test_modules_expose_the_options(be):
    """The modules' options reach the ops unchanged: the same numbers as the op calls."""
    opts = dict(z_loss=1e-3, softcap=5.0, return_z_loss=True, return_token_accuracy=True)
    cw = torch.rand(31) + 0.1
    x, t = torch.randn(9, 31), torch.randint(0, 31, (9,))
    h, w = torch.randn(9, 12), torch.randn(31, 12)
    ce = CrossEntropyLoss(weight=cw, label_smoothing=0.1, **opts)
    lce = LinearCrossEntropyLoss(label_smoothing=0.1, ce_weight=cw, chunk_size=4, **opts)
    assert "softcap=5.0" in repr(ce) and "return_token_accuracy=True" in repr(lce)
    assert list(lce.state_dict()) == ["ce_weight"] and not list(lce.parameters())
    with fastlm.use_backend(be):
        got_ce, got_lce = ce(x, t), lce(h, w, t)
        want_ce = fastlm.ops.cross_entropy(x, t, label_smoothing=0.1, weight=cw, **opts)
        want_lce = fastlm.ops.linear_cross_entropy(
            h, w, t, label_smoothing=0.1, ce_weight=cw, chunk_size=4, **opts
        )
    for got, want in ((got_ce, want_ce), (got_lce, want_lce)):
        assert type(got) is type(want) and len(got) == 3
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)


def test_cross_entropy_loss_z_loss_and_repr():
    loss = CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    assert "z_loss=0.001" in repr(loss) and "label_smoothing=0.1" in repr(loss)
    x, t = torch.randn(4, 9), torch.randint(0, 9, (4,))
    x64 = x.double()
    want = F.cross_entropy(x64, t, label_smoothing=0.1) + 1e-3 * (x64.logsumexp(-1) ** 2).mean()
    # The z-loss adds 2e-3 |lse| to the absolute sum of the gradient in the logits.
    weight = 2 + 2e-3 * x64.logsumexp(-1).abs().max().item()
    assert_loss_policy(loss(x, t), want, x, x64, "loss", weight=weight)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss(reduction):
    module = LinearCrossEntropyLoss(reduction=reduction, label_smoothing=0.1, chunk_size=4)
    assert "chunk_size=4" in repr(module) and not list(module.parameters())
    lm_head = torch.nn.Linear(12, 31)
    h = torch.randn(11, 12, requires_grad=True)
    t = torch.randint(0, 31, (11,))
    t[0] = -100
    got = module(h, lm_head.weight, t, lm_head.bias)
    params = [h, lm_head.weight, lm_head.bias]
    params64 = [p.detach().double().requires_grad_() for p in params]
    logits, logits64 = lm_head(h), F.linear(*params64)
    want = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1)
    want64 = F.cross_entropy(logits64, t, reduction=reduction, label_smoothing=0.1)
    rows = 10 if reduction == "sum" else 1  # t[0] is ignored
    assert_loss_policy(got, want64, logits, logits64, "loss", weight=2 * rows)
    g = torch.rand_like(want)
    ours = torch.autograd.grad(got, params, g)
    *ref, dlogits = torch.autograd.grad(want64, [*params64, logits64], g.double())
    pytorch = torch.autograd.grad(want, params, g)
    # Floors at the scale of the summed terms (d_hidden sums over classes, d_weight and
    # d_bias over tokens), each of which holds softmax = exp(logits - lse): one ulp of that
    # argument is the relative error of a term, one more the sum's rounding.
    lse = logits64.detach().logsumexp(-1, keepdim=True)
    ulps = 1 + (logits64.detach() - lse).abs().max()
    dl = dlogits.abs()
    h64, w64 = (p.detach().abs() for p in params64[:2])
    scales = (ulps * (dl @ w64).max(), ulps * (dl.T @ h64).max(), ulps * dl.sum(0).max())
    names = ("dhidden", "dweight", "dbias")
    for name, *results, scale in zip(names, ours, ref, pytorch, scales, strict=True):
        assert_policy(*results, name, scale=scale.item())
