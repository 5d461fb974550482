"""QuantLinear and quantize_: construction, round trips, state dicts, whole models."""

from __future__ import annotations

import logging
import os

import pytest
import safetensors.torch
import torch
from torch import nn

import fastlm
from fastlm.models import create
from fastlm.nn import QuantLinear
from fastlm.quant import dequantize_weight, quantize_, quantize_weight
from fastlm.testing import assert_equal

FORMATS = {
    "int8": dict(bits=8),
    "int4-g128": dict(bits=4, group_size=128),
    "int4-sym-g32": dict(bits=4, group_size=32, symmetric=True),
    "nf4": dict(bits=4, scheme="nf4"),
    "nf4-dq": dict(bits=4, scheme="nf4", double_quant=True),
    "w8a8": dict(bits=8, act_bits=8),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_from_linear_forward_and_dequantize(fmt):
    linear = nn.Linear(256, 40)
    layer = QuantLinear.from_linear(linear, **FORMATS[fmt])
    x = torch.randn(3, 256)
    w = layer.dequantize().weight
    kw = {k: v for k, v in FORMATS[fmt].items() if k != "act_bits"}
    assert_equal(
        w, dequantize_weight(quantize_weight(linear.weight, **kw)), "weight", "one quantization"
    )
    y = layer(x)
    rel = (y - linear(x)).norm() / linear(x).norm()
    assert rel < (0.02 if FORMATS[fmt]["bits"] == 8 else 0.15), rel
    if "act_bits" not in FORMATS[fmt]:
        assert_equal(y, layer.dequantize()(x), "y", "the CPU path is exactly that")
    assert torch.equal(layer.bias, linear.bias)
    assert "in_features=256, out_features=40" in repr(layer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trips_through_safetensors_without_floats(fmt, tmp_path):
    layer = QuantLinear.from_linear(nn.Linear(512, 64, bias=False), **FORMATS[fmt])
    path = tmp_path / "q.safetensors"
    safetensors.torch.save_model(layer, str(path))
    stored = safetensors.torch.load_file(str(path))
    assert "weight" not in stored and {"qweight", "scales"} <= set(stored)
    assert stored["qweight"].dtype in (torch.int8, torch.uint8)
    fresh = QuantLinear(512, 64, bias=False, **FORMATS[fmt])  # empty buffers, no float weight
    safetensors.torch.load_model(fresh, str(path))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    x = torch.randn(2, 512)
    assert_equal(fresh(x), layer(x), "output", "the same buffers")


def test_stored_size_of_int4_g128_is_about_4_2_bits_per_weight(tmp_path):
    """On disk, with the safetensors header: int4 with group 128 costs 4 + 24/128 bits."""
    n, k = 1024, 4096
    layer = QuantLinear.from_linear(nn.Linear(k, n, bias=False), bits=4, group_size=128)
    path = tmp_path / "q.safetensors"
    safetensors.torch.save_model(layer, str(path))
    bits = 8 * os.path.getsize(path) / (n * k)
    assert 4.1 <= bits <= 4.25, bits
    float_path = tmp_path / "f.safetensors"
    safetensors.torch.save_model(nn.Linear(k, n, bias=False).half(), str(float_path))
    assert os.path.getsize(path) < 0.27 * os.path.getsize(float_path)


def test_quantized_checkpoint_loads_into_a_meta_model(tmp_path):
    """The load path never forms float weights: a model built on the meta device (no
    memory), quantized (empty layers of the right shapes), then assigned the file's tensors
    (untied embeddings and learned positions: no tensor is derived or shared)."""

    def build():
        return create("gpt2-tiny", vocab_size=300, tie_word_embeddings=False)

    model = build().eval()
    quantize_(model, bits=4, scheme="nf4", double_quant=True)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_model(model, str(path))
    with torch.device("meta"):
        skeleton = build()
        quantize_(skeleton, bits=4, scheme="nf4", double_quant=True)
    assert skeleton.blocks[0].mlp.fc1.qweight.is_meta
    skeleton.load_state_dict(safetensors.torch.load_file(str(path)), strict=True, assign=True)
    ids = torch.randint(0, 300, (2, 9))
    assert_equal(skeleton.eval()(ids).logits, model(ids).logits, "logits", "the same tensors")


def test_quantize_model_skips_with_reasons_and_matches_its_dequantized_self(caplog):
    model = create("gpt2-tiny", vocab_size=300, hidden_size=96, num_heads=2).eval()
    ids = torch.randint(0, 300, (2, 12))
    before = model(ids).logits
    with caplog.at_level(logging.WARNING, logger="fastlm.quant"):
        done = quantize_(model, bits=4, group_size=64)
    # fc2 reads the 384-wide hidden layer: 384 = 6 x 64, quantized; the 96-wide inputs are
    # not multiples of 64: skipped and logged.
    assert done and all(n.endswith("fc2") for n in done)
    assert "qkv left unquantized: in_features 96 is not a multiple of group_size 64" in caplog.text
    assert type(model.lm_head) is nn.Linear  # excluded by default
    after = model(ids).logits
    assert (after - before).norm() / before.norm() < 0.1
    # The quantized model is exactly the float model holding the dequantized weights.
    for name in done:
        parent, _, attr = name.rpartition(".")
        layer = model.get_submodule(name)
        setattr(model.get_submodule(parent), attr, layer.dequantize())
    assert_equal(model(ids).logits, after, "logits", "the CPU path dequantizes, then F.linear")


@pytest.mark.parametrize("name", ["llama-tiny", "bert-tiny"])
def test_quantize_include_exclude_and_fused_blocks(name):
    model = create(name, vocab_size=300).eval()
    ids = torch.randint(0, 300, (2, 10))
    before = model(ids).logits
    done = quantize_(model, bits=8, exclude=("lm_head", "blocks.0.*"))
    assert any(".blocks.1." in f".{n}" for n in done)
    assert not any(".blocks.0." in f".{n}" for n in done)
    only = quantize_(create(name, vocab_size=300), bits=8, include=("*.o",))
    assert len(only) == 2 and all(n.endswith(".attn.o") for n in only)
    after = model(ids).logits
    assert (after - before).norm() / before.norm() < 0.02
    with fastlm.use_backend("triton"):  # the Triton kernels inside a model, bf16
        out = model.to(torch.bfloat16)(ids).logits
    assert (out.float() - after).norm() / after.norm() < 0.05


def test_bad_arguments():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(ValueError, match="group_size 128 does not divide K = 96"):
        QuantLinear.from_linear(nn.Linear(96, 8), bits=4, group_size=128)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantLinear(128, 8, bits=2)
    with pytest.raises(ValueError, match="act_bits=8 .* needs bits=8"):
        QuantLinear(128, 8, bits=4, act_bits=8)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_(nn.Sequential(nn.Linear(128, 8)), scheme="fp8")
    with pytest.raises(TypeError, match="not a str"):
        quantize_(nn.Sequential(nn.Linear(128, 8)), exclude="lm_head")


def test_forward_rebuilds_its_kept_weight_when_a_buffer_is_replaced():
    """forward keeps the QuantizedWeight it builds from the buffers; a buffer replaced (by
    assignment, load_state_dict(assign=True), .to()) or written in place shows in the next
    call, as the plain op on the layer's current quantized_weight gives it."""
    layer = QuantLinear.from_linear(nn.Linear(32, 8), bits=8)
    x = torch.randn(3, 32)

    def want():
        return fastlm.ops.quant_matmul(x, layer.quantized_weight, layer.bias)

    assert_equal(layer(x), want())
    layer.scales = layer.scales * 2  # a new tensor in the buffer table
    assert_equal(layer(x), want())
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["qweight"] = -state["qweight"]
    layer.load_state_dict(state, assign=True)
    assert_equal(layer(x), want())
    with torch.no_grad():
        layer.scales.mul_(0.5)  # in place: the kept weight holds the same tensor
    assert_equal(layer(x), want())
    layer.double()
    assert layer(x.double()).dtype == torch.float64
    assert_equal(
        layer(x.double()), fastlm.ops.quant_matmul(x.double(), layer.quantized_weight, layer.bias)
    )
