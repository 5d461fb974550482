"""FusedMLP and GatedMLP as drop-ins: the originals' state dicts load unchanged and give the
same outputs and gradients, on both backends."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastlm
from fastlm.nn import FusedMLP, GatedMLP
from fastlm.testing import assert_policy

BACKENDS_HERE = ["torch", "triton"]  # triton on CPU tensors = the interpreter


class TwoLinearMLP(torch.nn.Module):
    """The MLP FusedMLP replaces, laid out as timm's ``Mlp``: fc1, activation, dropout, fc2,
    dropout."""

    def __init__(self, d_in, hidden, d_out, act, bias=True):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden, bias=bias)
        self.act = act
        self.fc2 = torch.nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _compare(fast, original, x, be):
    """fastlm's module (at x's dtype, on backend ``be``) against the original in float64
    under the numerical policy, with the original at x's dtype as PyTorch's baseline:
    outputs, input gradient and every parameter gradient (matched by name)."""
    ref_module = copy.deepcopy(original).double()
    base_module = copy.deepcopy(original).to(x.dtype)

    def run(module, inp, backend=None):
        inp = inp.detach().requires_grad_()
        with fastlm.use_backend(backend):
            y = module(inp)
        dy = torch.ones_like(y)
        names, params = zip(*module.named_parameters(), strict=True)
        grads = torch.autograd.grad((y * dy).sum(), (inp, *params))
        return y, dict(zip(("x", *names), grads, strict=True))

    y_ref, g_ref = run(ref_module, x.double())
    y_base, g_base = run(base_module, x)
    y, g = run(fast, x, be)
    assert_policy(y, y_ref, y_base, "output")
    assert g.keys() == g_ref.keys()
    for name in g:
        assert_policy(g[name], g_ref[name], g_base[name], f"grad {name}")


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize(
    "activation, act",
    [("gelu", torch.nn.GELU()), ("gelu_tanh", torch.nn.GELU("tanh")), ("relu", torch.nn.ReLU())],
)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_mlp_loads_a_two_linear_mlp(be, activation, act, bias):
    original = TwoLinearMLP(24, 70, 17, act, bias)
    fast = FusedMLP(24, 70, 17, activation=activation, bias=bias, dtype=torch.bfloat16)
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict())
    _compare(fast, original, torch.randn(2, 5, 24, dtype=torch.bfloat16), be)


def _llama_mlp(hidden, inter, act, bias):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        hidden_act=act,
        mlp_bias=bias,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    return LlamaMLP(config)


@pytest.mark.parametrize("be", BACKENDS_HERE)
@pytest.mark.parametrize(
    "hf_act, activation", [("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh")]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_loads_hugging_face_llama_mlp(be, hf_act, activation, bias):
    original = _llama_mlp(32, 88, hf_act, bias)
    fast = GatedMLP(32, 88, activation=activation, bias=bias, dtype=torch.bfloat16)
    assert list(fast.state_dict()) == list(original.state_dict())
    fast.load_state_dict(original.state_dict())
    _compare(fast, original, torch.randn(3, 7, 32, dtype=torch.bfloat16), be)


def test_llama_mlp_loads_gated_mlp_back():
    fast = GatedMLP(16, 40)
    original = _llama_mlp(16, 40, "silu", False)
    original.load_state_dict(fast.state_dict())
    x = torch.randn(4, 16)
    torch.testing.assert_close(fast(x), original(x))


def test_dropout_is_seeded_by_torch_and_off_in_eval():
    mlp = FusedMLP(16, 32, dropout=0.5, dtype=torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with fastlm.use_backend("triton"):
        torch.manual_seed(0)
        a = mlp(x)
        torch.manual_seed(0)
        b = mlp(x)
        c = mlp(x)
        mlp.eval()
        d, e = mlp(x), mlp(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(d, e)
    # Eval is the plain MLP: against it in float64, with torch's modules in bf16 as PyTorch's.
    mlp64 = copy.deepcopy(mlp).double()
    reference = mlp64.fc2(F.gelu(mlp64.fc1(x.double())))
    assert_policy(d, reference, mlp.fc2(F.gelu(mlp.fc1(x))), "eval output")


def test_extra_repr_and_defaults():
    mlp = FusedMLP(8, 32)
    assert mlp.fc2.out_features == 8 and mlp.fc1.bias is not None
    assert "activation='gelu'" in repr(mlp) and "dropout=0.0" in repr(mlp)
    gated = GatedMLP(8, 32)
    assert gated.gate_proj.bias is None and "activation='silu'" in repr(gated)


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: FusedMLP(0, 8), "in_features"),
        (lambda: FusedMLP(8, 8.5), "hidden_features"),
        (lambda: FusedMLP(8, 8, -1), "out_features"),
        (lambda: FusedMLP(8, 8, activation="swish"), "activation"),
        (lambda: FusedMLP(8, 8, dropout=1.0), "dropout"),
        (lambda: GatedMLP(8, 0), "intermediate_size"),
        (lambda: GatedMLP(True, 8), "hidden_size"),
        (lambda: GatedMLP(8, 8, activation="tanh"), "activation"),
    ],
)
def test_bad_constructor_arguments(make, word):
    with pytest.raises(ValueError, match=word):
        make()
