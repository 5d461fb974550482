"""Rotary kernels against the float64 reference, under the numerical policy.

Runs the kernel contract (fastlm.ops.rotary.FORWARD) under the interpreter on the CPU, and
on a GPU where one is present. The baseline is the reference formula at the test dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastlm.ops.rotary import FORWARD, apply_rotary_ref
from fastlm.testing import assert_equal, assert_policy, poisoned_outputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _tables(max_pos, r2, device):
    angles = torch.outer(
        torch.arange(max_pos, dtype=torch.float64),
        10000.0 ** (-torch.arange(r2, dtype=torch.float64) / r2),
    )
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _positions_arg(kind, b, s, max_pos, device):
    """(kernel positions, scalar offset, reference kwargs) for one position mode."""
    if kind == "offset":
        off = max_pos - s
        return None, off, dict(offset=off)
    if kind == "offsets":
        offs = torch.randint(0, max_pos - s + 1, (b,), dtype=torch.int32, device=device)
        return offs, 0, dict(offset=offs)
    ids = torch.randint(0, max_pos, (b, s), dtype=torch.int64, device=device)
    return ids, 0, dict(position_ids=ids)


def run_case(
    device,
    backend,
    shape,
    rot,
    dtype,
    interleaved,
    pos_kind="offset",
    x=None,
    inplace=False,
    conj=False,
):
    b, s, h, d = shape
    max_pos = s + 5
    x = torch.randn(shape, dtype=dtype, device=device) if x is None else x
    cos, sin = _tables(max_pos, rot // 2, device)
    positions, offset, ref_kw = _positions_arg(pos_kind, b, s, max_pos, device)
    ref_sin = -sin if conj else sin
    ref = apply_rotary_ref(x.double(), cos.double(), ref_sin.double(), interleaved, **ref_kw)
    base = apply_rotary_ref(x, cos, ref_sin, interleaved, **ref_kw)
    before = x.clone()
    with poisoned_outputs():
        out = x if inplace else None
        y = FORWARD[backend](x, cos, sin, positions, offset, interleaved, conj, out)
    if inplace:
        assert y is x
    else:
        assert_equal(x, before, "x", "the input is untouched")
        assert y.is_contiguous()
    assert y.dtype == dtype and y.shape == x.shape
    assert_policy(y, ref, base, "y")
    assert_equal(y[..., rot:], before[..., rot:], "y", "dims past rotary_dim pass through")
    return y


SHAPES = [(2, 7, 3, 16), (1, 5, 4, 64), (2, 3, 5, 24), (1, 1, 1, 8), (1, 3, 2, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rotary_matches_reference(device_backend, dtype, interleaved, shape):
    device, backend = device_backend
    run_case(device, backend, shape, shape[-1], dtype, interleaved)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("d, rot", [(24, 8), (64, 16), (40, 12), (300, 20)])
def test_partial_rotary_passes_the_rest_through(device_backend, interleaved, d, rot):
    device, backend = device_backend
    run_case(device, backend, (2, 3, 3, d), rot, torch.bfloat16, interleaved)


@pytest.mark.parametrize("pos_kind", ["offset", "offsets", "position_ids"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_position_modes(device_backend, pos_kind, interleaved):
    device, backend = device_backend
    run_case(device, backend, (3, 4, 2, 32), 24, torch.float16, interleaved, pos_kind)


def test_broadcast_position_ids(device_backend):
    """(1, S) ids expanded to (B, S): stride 0 over the batch."""
    device, backend = device_backend
    b, s, h, d = 3, 5, 2, 16
    x = torch.randn(b, s, h, d, device=device)
    cos, sin = _tables(9, d // 2, device)
    ids = torch.randint(0, 9, (1, s), dtype=torch.int32, device=device)
    y = FORWARD[backend](x, cos, sin, ids.expand(b, s), 0, False, False, None)
    ref = apply_rotary_ref(x.double(), cos.double(), sin.double(), position_ids=ids)
    assert_policy(y, ref, apply_rotary_ref(x, cos, sin, position_ids=ids), "y")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_strided_input(device_backend, interleaved):
    """q viewed out of a fused (B, S, 3, H, D) qkv projection, and a (B, H, S, D) transpose:
    any strides except the last."""
    device, backend = device_backend
    qkv = torch.randn(2, 5, 3, 3, 32, device=device, dtype=torch.bfloat16)
    run_case(device, backend, (2, 5, 3, 32), 32, torch.bfloat16, interleaved, x=qkv[:, :, 1])
    bhsd = torch.randn(2, 3, 5, 32, device=device, dtype=torch.float16).transpose(1, 2)
    run_case(device, backend, (2, 5, 3, 32), 16, torch.float16, interleaved, "position_ids", x=bhsd)


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace(device_backend, interleaved, dtype):
    device, backend = device_backend
    qkv = torch.randn(2, 3, 3, 2, 24, device=device, dtype=dtype)
    other = qkv[:, :, 2].clone()
    run_case(
        device,
        backend,
        (2, 3, 2, 24),
        16,
        dtype,
        interleaved,
        "offsets",
        x=qkv[:, :, 0],
        inplace=True,
    )
    assert_equal(qkv[:, :, 2], other, "v", "neighbours are untouched")


@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_the_transpose(device_backend, interleaved, dtype):
    """The backward (conj) kernel against the reference gradient: autograd of the float64
    formula, and against rotation by the negated angle."""
    device, backend = device_backend
    b, s, h, d, rot = 2, 4, 3, 40, 24
    x = torch.randn(b, s, h, d, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(b, s, h, d, dtype=dtype, device=device)
    cos, sin = _tables(s + 2, rot // 2, device)
    ids = torch.randint(0, s + 2, (b, s), device=device)
    y = apply_rotary_ref(x, cos.double().cpu(), sin.double().cpu(), interleaved, ids.cpu())
    (ref,) = torch.autograd.grad(y, x, dy.double().cpu())
    dx = run_case(
        device, backend, (b, s, h, d), rot, dtype, interleaved, x=dy, conj=True, pos_kind="offset"
    )
    with poisoned_outputs():
        dx = FORWARD[backend](dy, cos, sin, ids, 0, interleaved, True, None)
    base = apply_rotary_ref(dy, cos, -sin, interleaved, position_ids=ids)
    assert_policy(dx, ref.to(device), base, "dx")


@pytest.mark.gpu
def test_offsets_past_2_31_elements():
    """Element offsets past 2**31 (int64 indexing): only the last tokens are checked."""
    h, d = 8, 128
    s = 2**31 // (h * d) + 3
    x = torch.randn(1, s, h, d, dtype=torch.float16, device="cuda")
    cos, sin = _tables(s, d // 2, "cuda")
    y = FORWARD["triton"](x, cos, sin, None, 0, False, False, None)
    tail = slice(s - 3, s)
    ref = apply_rotary_ref(x[:, tail].double(), cos.double(), sin.double(), offset=s - 3)
    base = apply_rotary_ref(x[:, tail], cos, sin, offset=s - 3)
    assert_policy(y[:, tail], ref, base, "y")
