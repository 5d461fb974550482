"""fastlm.nn.CrossEntropyLoss / LinearCrossEntropyLoss drop in for torch's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm import backend
from fastlm.nn.loss import CrossEntropyLoss, LinearCrossEntropyLoss

KWARGS = [
    dict(),
    dict(reduction="sum", ignore_index=3),
    dict(reduction="none", label_smoothing=0.1),
    dict(weight=torch.rand(17), label_smoothing=0.05),
]


@pytest.mark.parametrize("kwargs", KWARGS, ids=range(len(KWARGS)))
@pytest.mark.parametrize("be", ["torch", "triton"])
def test_cross_entropy_loss_matches_torch(kwargs, be):
    if be == "triton" and "weight" in kwargs:
        pytest.skip("class weights are torch-backend only (tested below)")
    ref, ours = torch.nn.CrossEntropyLoss(**kwargs), CrossEntropyLoss(**kwargs)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    x = torch.randn(10, 17, requires_grad=True)
    t = torch.randint(0, 17, (10,))
    t[2] = kwargs.get("ignore_index", -100)
    with fastlm.use_backend(be):
        got = ours(x, t)
    want = ref(x, t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(want)
    torch.testing.assert_close(
        torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0]
    )


def test_cross_entropy_loss_weight_rejected_on_triton():
    loss = CrossEntropyLoss(weight=torch.rand(5))
    with fastlm.use_backend("triton"), pytest.raises(backend.BackendUnavailable, match="weight"):
        loss(torch.randn(3, 5), torch.tensor([0, 1, 2]))


def test_cross_entropy_loss_z_loss_and_repr():
    loss = CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3)
    assert "z_loss=0.001" in repr(loss) and "label_smoothing=0.1" in repr(loss)
    x, t = torch.randn(4, 9), torch.randint(0, 9, (4,))
    want = F.cross_entropy(x, t, label_smoothing=0.1) + 1e-3 * (torch.logsumexp(x, -1) ** 2).mean()
    torch.testing.assert_close(loss(x, t), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_loss(reduction):
    module = LinearCrossEntropyLoss(reduction=reduction, label_smoothing=0.1, chunk_size=4)
    assert "chunk_size=4" in repr(module) and not list(module.parameters())
    lm_head = torch.nn.Linear(12, 31)
    h = torch.randn(11, 12, requires_grad=True)
    t = torch.randint(0, 31, (11,))
    t[0] = -100
    got = module(h, lm_head.weight, t, lm_head.bias)
    want = F.cross_entropy(lm_head(h), t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g = torch.rand_like(want)
    params = [h, lm_head.weight, lm_head.bias]
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
