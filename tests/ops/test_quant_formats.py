"""Quantization formats: layouts, round-trip error bounds, SQNR, stored size."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.ops.quant_formats import (
    NF4_CODE,
    dequantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)

FORMATS = {
    "int8": dict(bits=8, group_size=None),
    "int4-g32": dict(bits=4, group_size=32),
    "int4-g128": dict(bits=4, group_size=128),
    "int4-sym-g64": dict(bits=4, group_size=64, symmetric=True),
    "nf4-g64": dict(bits=4, group_size=64, scheme="nf4"),
    "nf4-g64-dq": dict(bits=4, group_size=64, scheme="nf4", double_quant=True),
}


def weights(kind: str, n: int = 96, k: int = 512) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, k) * 0.02
    # Heavy tails (Student-t, 3 degrees of freedom): the outliers LLM weights have.
    return torch.distributions.StudentT(3.0).sample((n, k)) * 0.02


def sqnr_db(w: torch.Tensor, d: torch.Tensor) -> float:
    return 10 * math.log10(w.pow(2).mean() / (w - d).pow(2).mean())


def test_int4_packing_layout():
    q = torch.randint(0, 16, (3, 10))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    for j in range(5):  # even k in the low nibble, odd k in the high one
        assert torch.equal(packed[:, j].int() & 15, q[:, 2 * j].int())
        assert torch.equal(packed[:, j].int() >> 4, q[:, 2 * j + 1].int())
    assert torch.equal(unpack_int4(packed).long(), q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_bound(fmt):
    """Each weight is within half a quantization step of its group's grid: |w - w'| <=
    s / 2 for the symmetric integer formats (s the stored scale) and s for asymmetric int4
    (rounding the zero point shifts the grid by up to s / 2, so a group's extreme weight
    can land that far outside it); at most half the widest gap of the NF4 code times the
    block absmax for NF4."""
    w = weights("gaussian")
    qw = quantize_weight(w, **FORMATS[fmt])
    err = (dequantize_weight(qw) - w).abs()
    n, k = w.shape
    g = qw.group_size
    scales = qw.block_scales().view(n, -1) if qw.bits == 4 else qw.scales[:, None]
    per_weight = scales.repeat_interleave(g, dim=1) if qw.bits == 4 else scales
    if qw.scheme == "nf4":
        gaps = torch.tensor(NF4_CODE).diff().max().item()
        bound = per_weight * gaps / 2
        if qw.double_quant:  # the absmax itself moved by at most half its own step
            bound = bound + (qw.scales2.max() / 2)
    elif qw.symmetric:
        bound = per_weight / 2
    else:
        bound = per_weight
    assert (err <= bound * (1 + 1e-3) + 1e-7).all()


def test_symmetric_and_nf4_keep_zero_exact():
    w = weights("gaussian")
    w[:, :7] = 0.0
    for fmt in ("int8", "int4-g128", "int4-sym-g64", "nf4-g64"):
        d = dequantize_weight(quantize_weight(w, **FORMATS[fmt]))
        assert torch.equal(d[:, :7], torch.zeros_like(d[:, :7])), fmt


@pytest.mark.parametrize("kind", ["gaussian", "student-t"])
def test_sqnr_floors(kind):
    """Signal-to-quantization-noise ratios above floors: ~2 dB under what each format
    reaches on 96 x 512 Gaussian weights; for Student-t, whose rare huge outliers make the
    ratio noisy, ~2 dB under the worst of 300 seeds."""
    floors = {
        "gaussian": {
            "int8": 40,
            "int4-g32": 19.5,
            "int4-g128": 18,
            "int4-sym-g64": 16.5,
            "nf4-g64": 18.5,
            "nf4-g64-dq": 18.5,
        },
        "student-t": {
            "int8": 24,
            "int4-g32": 16,
            "int4-g128": 13,
            "int4-sym-g64": 12,
            "nf4-g64": 14,
            "nf4-g64-dq": 14,
        },
    }[kind]
    w = weights(kind)
    for fmt, floor in floors.items():
        got = sqnr_db(w, dequantize_weight(quantize_weight(w, **FORMATS[fmt])))
        assert got > floor, (fmt, got)


def test_stored_bits_per_weight():
    w = weights("gaussian", 256, 4096)
    bits = {fmt: quantize_weight(w, **kw).storage_bits() for fmt, kw in FORMATS.items()}
    assert bits["int8"] == pytest.approx(8 + 32 / 4096)
    assert 4.1 <= bits["int4-g128"] <= 4.25  # 4 + (16-bit scale + 8-bit zero) / 128
    assert bits["int4-g128"] == pytest.approx(4 + 24 / 128)
    assert bits["int4-g32"] == pytest.approx(4 + 24 / 32)
    assert bits["int4-sym-g64"] == pytest.approx(4 + 16 / 64)
    assert bits["nf4-g64"] == pytest.approx(4 + 16 / 64)
    assert bits["nf4-g64-dq"] < 4.13  # int8 absmax + fp32 per 256 blocks


def test_dequantize_dtypes():
    qw = quantize_weight(weights("gaussian"), bits=4, group_size=64)
    d64 = dequantize_weight(qw, torch.float64)
    assert d64.dtype == torch.float64
    assert torch.equal(dequantize_weight(qw, torch.bfloat16), d64.to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(bits=4, group_size=100), "group_size must be one of"),
        (dict(bits=4, group_size=64, scheme="fp4"), "scheme must be one of"),
        (dict(bits=8, group_size=64), "scaled per output channel"),
        (dict(bits=8, group_size=None, scheme="nf4"), "'nf4' is 4-bit"),
        (dict(bits=4, group_size=64, double_quant=True), "double_quant applies to"),
    ],
)
def test_bad_formats(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_weight(torch.randn(8, 128), **kwargs)


def test_bad_weights():
    with pytest.raises(ValueError, match="does not divide K = 96"):
        quantize_weight(torch.randn(8, 96), bits=4, group_size=64)
    with pytest.raises(TypeError, match="2-D floating-point"):
        quantize_weight(torch.randint(0, 3, (8, 128)), bits=8, group_size=None)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_element(fmt, bad):
    """A NaN used to spread through its group's scale (and, double-quantized, through every
    block's), turning whole outputs NaN; inf was refused only for some formats."""
    w = torch.randn(8, 128)
    w[5, 77] = bad
    with pytest.raises(ValueError, match=r"weight must be finite: weight\[5, 77\]"):
        quantize_weight(w, **FORMATS[fmt])


def test_empty_input_features_are_refused():
    with pytest.raises(ValueError, match="K >= 1"):
        quantize_weight(torch.randn(8, 0), bits=8)


def _formula(qw, dtype):
    """Each format's dequantization, one out-of-place step at a time (the layouts in the
    module docstring)."""
    n, k = qw.shape
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if qw.bits == 8:
        return (qw.qweight.to(compute) * qw.scales.to(compute)[:, None]).to(dtype)
    q = unpack_int4(qw.qweight).view(n, k // qw.group_size, qw.group_size)
    scales = qw.block_scales().to(compute)[..., None]
    if qw.scheme == "nf4":
        w = torch.tensor(NF4_CODE, dtype=compute)[q.long()] * scales
    else:
        zeros = 8 if qw.zeros is None else qw.zeros.to(compute)[..., None]
        w = (q.to(compute) - zeros) * scales
    return w.view(n, k).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_in_place_dequantization_is_the_formula_bit_for_bit(fmt):
    qw = quantize_weight(weights("gaussian", 48, 256), **FORMATS[fmt])
    stored = {name: t.clone() for name, t in qw.tensors().items()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        got, want = dequantize_weight(qw, dtype), _formula(qw, dtype)
        assert got.dtype == dtype and torch.equal(got, want), dtype
    assert all(torch.equal(stored[name], t) for name, t in qw.tensors().items())


@pytest.mark.parametrize("fmt", ["int8", "int4-g32", "nf4-g64"])
def test_scales_that_require_grad_get_their_gradient(fmt):
    # Autograd follows scales that require grad; in place would break that, so it is not.
    qw = quantize_weight(weights("gaussian", 16, 128), **FORMATS[fmt])
    qw.scales = qw.scales.float().requires_grad_()
    scales = qw.scales
    got = torch.autograd.grad(dequantize_weight(qw).sum(), scales)[0]
    want = torch.autograd.grad(_formula(qw, torch.float32).sum(), scales)[0]
    assert torch.equal(got, want)
