"""LoRALinear over float and quantized bases: outputs, gradients, adapters, merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlm
from fastlm.nn import QuantLinear
from fastlm.nn.lora import LoRALinear
from fastlm.testing import assert_equal, assert_policy


def reference(layer: LoRALinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfused formula with an explicit float weight, in x's dtype."""
    name = layer.active_adapter
    a, b = layer.lora_A[name].weight.to(x.dtype), layer.lora_B[name].weight.to(x.dtype)
    base = nn.functional.linear(x, weight.to(x.dtype), layer.base_layer.bias.to(x.dtype))
    return base + layer.scaling[name] * (x @ a.T) @ b.T


def bases():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    return {
        "float": linear,
        "int4": QuantLinear.from_linear(linear, bits=4, group_size=64),
        "nf4": QuantLinear.from_linear(linear, bits=4, scheme="nf4"),
    }


@pytest.mark.parametrize("kind", ["float", "int4", "nf4"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_and_gradients_match_the_formula(kind, backend):
    base = bases()[kind]
    layer = LoRALinear(base, r=8, alpha=16)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    weight = base.weight if kind == "float" else base.dequantize().weight
    x = torch.randn(5, 128, requires_grad=True)
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    if kind == "float":
        layer.to(dtype)
    with fastlm.use_backend(backend if kind != "float" else None):
        y = layer(x.to(dtype))
    # The formula in float64, with PyTorch's own formula at the layer's dtype as the baseline.
    x_in = x.detach().to(dtype)
    ref = reference(layer, x_in.double(), weight.detach())
    assert_policy(y, ref, reference(layer, x_in, weight.detach()), "y")
    y.float().sum().backward()
    a = layer.lora_A["default"].weight
    assert a.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert x.grad is not None
    assert all(p.grad is None for p in layer.base_layer.parameters())  # frozen


def test_adapters_switch_and_fresh_ones_are_identity():
    layer = LoRALinear(nn.Linear(32, 16), r=4)
    x = torch.randn(3, 32)
    base_out = layer.base_layer(x)
    assert_equal(layer(x), base_out, "output", "B = 0: the update is exactly zero")
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.add_adapter("second", r=2, alpha=4, use_rslora=True)
    assert layer.active_adapter == "second" and layer.scaling["second"] == 4 / 2**0.5
    assert_equal(layer(x), base_out, "output", "a fresh adapter's B is zero")
    layer.set_adapter("default")
    assert not torch.allclose(layer(x), base_out)
    layer.set_adapter(None)
    assert_equal(layer(x), base_out, "output", "no adapter: the base layer alone")
    with pytest.raises(ValueError, match="no adapter 'third'"):
        layer.set_adapter("third")
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("second")


def test_merging_a_quantized_base_needs_requantize():
    layer = LoRALinear(bases()["int4"], r=4)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = torch.randn(4, 128)
    before = layer(x)
    with pytest.raises(ValueError, match="pass requantize=True"):
        layer.merge()
    layer.merge(requantize=True)
    assert isinstance(layer.base_layer, QuantLinear) and layer.active_adapter is None
    rel = (layer(x) - before).norm() / before.norm()
    assert rel < 0.1  # re-quantization error only


def test_bad_base():
    with pytest.raises(TypeError, match="base must be an nn.Linear or a QuantLinear"):
        LoRALinear(nn.Conv1d(4, 4, 1))
