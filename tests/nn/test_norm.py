"""fastlm.nn.LayerNorm / RMSNorm drop in for torch's: constructor, state_dict, outputs, patch."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fastlm
from fastlm.testing import assert_equal, assert_policy, assert_policy_norm, summand_scale

LAYER_NORM_KWARGS = [
    dict(normalized_shape=24),
    dict(normalized_shape=(3, 8), eps=1e-3),
    dict(normalized_shape=24, elementwise_affine=False),
    dict(normalized_shape=24, bias=False),
    dict(normalized_shape=24, dtype=torch.bfloat16),
]
RMS_NORM_KWARGS = [
    dict(normalized_shape=24),
    dict(normalized_shape=[3, 8], eps=1e-6),
    dict(normalized_shape=24, elementwise_affine=False),
    dict(normalized_shape=24, eps=None, dtype=torch.float16),
]
PAIRS = [(torch.nn.LayerNorm, fastlm.nn.LayerNorm, kw) for kw in LAYER_NORM_KWARGS] + [
    (torch.nn.RMSNorm, fastlm.nn.RMSNorm, kw) for kw in RMS_NORM_KWARGS
]
PAIR_IDS = [f"{a.__name__}-{i}" for i, (a, _, _) in enumerate(PAIRS)]


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.mark.parametrize("torch_cls, fast_cls, kwargs", PAIRS, ids=PAIR_IDS)
def test_same_parameters_state_dict_and_repr(torch_cls, fast_cls, kwargs):
    ref, ours = torch_cls(**kwargs), fast_cls(**kwargs)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for key in ref_sd:
        assert our_sd[key].shape == ref_sd[key].shape and our_sd[key].dtype == ref_sd[key].dtype
        torch.testing.assert_close(our_sd[key], ref_sd[key])  # same initialisation
    assert repr(ours) == repr(ref)
    assert isinstance(ours, torch_cls)


def test_meta_device_construction():
    ln = fastlm.nn.LayerNorm(16, device="meta")
    assert ln.weight.device.type == "meta" and ln.bias.device.type == "meta"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("torch_cls, fast_cls, kwargs", PAIRS, ids=PAIR_IDS)
def test_loads_torch_state_dict_and_matches_outputs_and_grads(torch_cls, fast_cls, kwargs, backend):
    ref = _randomize(torch_cls(**kwargs))
    ours = fast_cls(**kwargs)
    ours.load_state_dict(ref.state_dict())
    dtype = kwargs.get("dtype", torch.float32)
    shape = ref.normalized_shape
    x = torch.randn(2, 5, *shape, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 5, *shape, dtype=dtype)

    with fastlm.use_backend(backend):
        y = ours(x)
        (y * dy).sum().backward()
    y_ref = ref(x)
    x_grad, x.grad = x.grad, None
    (y_ref * dy).sum().backward()

    ref64 = torch_cls(**{**kwargs, "dtype": torch.float64})
    ref64.load_state_dict(ref.state_dict())
    x64 = x.detach().double().requires_grad_()
    if isinstance(ref, torch.nn.RMSNorm) and ref.eps is None:
        ref64.eps = fastlm.ops.norm.default_rms_eps(dtype)  # the half-precision module's eps
    y64 = ref64(x64)
    (y64 * dy.double()).sum().backward()

    assert_policy(y, y64, y_ref, "y")
    assert_policy(x_grad, x64.grad, x.grad, "dx")
    # dweight sums dy * xhat over the batch, dbias sums dy: the floors' scales.
    with torch.no_grad():
        if isinstance(ref, torch.nn.RMSNorm):
            xhat = torch.nn.functional.rms_norm(x64, shape, eps=ref64.eps)
        else:
            xhat = torch.nn.functional.layer_norm(x64, shape, eps=ref64.eps)
    summands = {"weight": dy.double() * xhat, "bias": dy.double()}
    for (name, p), p_ref, p64 in zip(
        ours.named_parameters(), ref.parameters(), ref64.parameters(), strict=True
    ):
        assert_policy(
            p.grad, p64.grad, p_ref.grad, name, scale=summand_scale(summands[name], (0, 1))
        )


def test_residual_forward():
    ln = _randomize(fastlm.nn.RMSNorm(12))
    x, r = torch.randn(3, 12), torch.randn(3, 12)
    y, s = ln(x, residual=r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x + r, (12,), ln.weight))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.GELU())
            for _ in range(2)
        )
        self.final = torch.nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.final(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patch_swaps_norms_in_place(dtype):
    model = _Model().to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm | torch.nn.RMSNorm):
            _randomize(m)
    params = {name: p for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    x = torch.randn(4, 8, dtype=dtype)
    before = model(x)
    hooked = []
    model.final.register_forward_hook(lambda *_: hooked.append(True))

    assert fastlm.patch(model) is model

    assert type(model.blocks[0][0]) is fastlm.nn.LayerNorm
    assert type(model.final) is fastlm.nn.RMSNorm
    assert type(model.embed) is torch.nn.Linear
    assert list(model.state_dict()) == keys
    for name, p in model.named_parameters():
        assert p is params[name]  # same Parameter objects: optimizers keep working
    after = model(x)
    assert hooked == [True]
    assert_equal(after, before, "output", "the torch backend runs F.layer_norm / F.rms_norm")
    with fastlm.use_backend("triton"):
        kernels = model(x)
    # Against the float64 model, with torch's modules at this dtype as PyTorch's own result
    # (in 2-norm: five rounded layers, 64 elements).
    reference = copy.deepcopy(model).double()(x.double())
    assert_policy_norm(kernels, reference, before, "output")


def test_patch_leaves_subclasses_and_rejects_non_modules():
    class CustomNorm(torch.nn.LayerNorm):
        pass

    model = torch.nn.Sequential(CustomNorm(4), torch.nn.LayerNorm(4))
    fastlm.patch(model)
    assert type(model[0]) is CustomNorm and type(model[1]) is fastlm.nn.LayerNorm
    root = fastlm.patch(torch.nn.RMSNorm(4))
    assert type(root) is fastlm.nn.RMSNorm
    with pytest.raises(TypeError, match="model"):
        fastlm.patch("not a model")


def _hf_gemma_norms():
    transformers = pytest.importorskip("transformers")
    del transformers
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    return {"gemma": GemmaRMSNorm, "gemma2": Gemma2RMSNorm}


@pytest.mark.parametrize("name", ["gemma", "gemma2"])
def test_gemma_rms_norm_constructor_state_dict_and_repr(name):
    hf_cls = _hf_gemma_norms()[name]
    ref, ours = hf_cls(24, eps=1e-5), fastlm.nn.GemmaRMSNorm(24, eps=1e-5)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    assert_equal(ours.weight, ref.weight, "zeros")  # the scale is 1 + weight: zeros = identity
    assert ours.eps == ref.eps and ours.extra_repr() == ref.extra_repr()
    assert fastlm.nn.GemmaRMSNorm(8).eps == hf_cls(8).eps  # the same default
    theirs = [(p.name, p.default) for p in inspect.signature(hf_cls).parameters.values()]
    ours = [
        (p.name, p.default) for p in inspect.signature(fastlm.nn.GemmaRMSNorm).parameters.values()
    ]
    assert ours[: len(theirs)] == theirs  # ours adds device and dtype after them


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["gemma", "gemma2"])
@pytest.mark.parametrize(
    "w_dtype, x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]
)
def test_gemma_rms_norm_loads_transformers_state_dict(name, backend, w_dtype, x_dtype):
    hf_cls = _hf_gemma_norms()[name]
    ref = _randomize(hf_cls(40)).to(w_dtype)
    ours = fastlm.nn.GemmaRMSNorm(40, dtype=w_dtype)
    ours.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(2, 5, 40)).to(x_dtype).requires_grad_()
    dy = torch.randn(2, 5, 40, dtype=x_dtype)
    with fastlm.use_backend(backend):
        y = ours(x)
        (y * dy).sum().backward()
    y_ref = ref(x)
    x_grad, x.grad = x.grad, None
    (y_ref * dy).sum().backward()
    ref64 = copy.deepcopy(ref).double()
    x64 = x.detach().double().requires_grad_()
    # The plain formula in float64 (transformers' norm would compute float64 in float32).
    y64 = fastlm.ops.rms_norm_ref(x64, (40,), ref64.weight, ref.eps, offset=1.0)
    (y64 * dy.double()).sum().backward()
    assert y.dtype == y_ref.dtype and ours.weight.grad.dtype == w_dtype
    if backend == "torch":
        assert_equal(y, y_ref, "y")  # the same float32 operations, rounded once
    assert_policy(y, y64, y_ref, "y")
    assert_policy(x_grad, x64.grad, x.grad, "dx")
    xhat = torch.nn.functional.rms_norm(x64.detach(), (40,), eps=ref.eps)
    scale = summand_scale(dy.double() * xhat, (0, 1))
    assert_policy(ours.weight.grad, ref64.weight.grad, ref.weight.grad, "dweight", scale=scale)


@pytest.fixture
def composed_rms(monkeypatch):
    """Every RMSNorm down the torch backend's composed path (its size gates at zero)."""
    from fastlm.ops import norm as norm_ops

    seen = []
    original = norm_ops._rms_norm_composed
    monkeypatch.setattr(norm_ops, "_COMPOSED_MIN_NUMEL", 0)
    monkeypatch.setattr(norm_ops, "_FUNCTION_MIN_NUMEL", 0)
    monkeypatch.setattr(norm_ops, "_rms_norm_composed", lambda *a: seen.append(1) or original(*a))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", RMS_NORM_KWARGS[:3], ids=["default", "2-d eps", "no weight"])
def test_rms_norm_module_bit_identical_on_the_composed_path(composed_rms, dtype, kwargs):
    ref = _randomize(torch.nn.RMSNorm(**kwargs, dtype=dtype))
    ours = fastlm.nn.RMSNorm(**kwargs, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, *ref.normalized_shape, dtype=dtype)
    r = torch.randn_like(x)
    with torch.no_grad():
        assert_equal(ours(x), ref(x), "y", "torch.nn.RMSNorm's ops, in one buffer")
        y, s = ours(x, r)
        assert_equal(y, ref(x + r), "y with residual")
        assert_equal(s, x + r, "s")
    x.requires_grad_()
    assert_equal(ours(x), ref(x), "y under autograd", "the autograd Function's forward")
    assert len(composed_rms) == 3


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_rms_norm_bit_identical_on_the_composed_path(composed_rms, w_dtype):
    hf_cls = _hf_gemma_norms()["gemma"]
    ref = _randomize(hf_cls(40)).to(w_dtype)
    ours = fastlm.nn.GemmaRMSNorm(40, dtype=w_dtype)
    ours.load_state_dict(ref.state_dict())
    x = (3 * torch.randn(2, 5, 40)).to(torch.bfloat16)
    with torch.no_grad():
        assert_equal(ours(x), ref(x), "y", "transformers' float32 ops, rounded once")
    assert_equal(ours(x.requires_grad_()), ref(x), "y under autograd")
    assert len(composed_rms) == 2
