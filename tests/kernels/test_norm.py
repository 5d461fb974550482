"""LayerNorm/RMSNorm kernels against the float64 reference, under the numerical policy.

Runs the kernel contract (fastlm.ops.norm.FORWARD/BACKWARD) of the Triton kernels under the
interpreter on the CPU, and of the Triton and CUDA C++ kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import norm as kernels

from fastlm.ops.norm import BACKWARD, FORWARD
from fastlm.testing import assert_equal, assert_policy, poisoned_outputs, summand_scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _torch_norm(s, w, b, eps, rms):
    n = s.shape[-1]
    if rms:
        return F.rms_norm(s, (n,), w, eps)
    return F.layer_norm(s, (n,), w, b, eps)


def _autograd_results(x, w, b, r, dy, ds, eps, rms, dtype):
    """y, s, dx (= d/dx, which equals d/dresidual), dw, db from PyTorch autograd, with every
    input cast to ``dtype`` (float64 for the reference, the test dtype for the baseline)."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b, r)]
    x_, w_, b_, r_ = leaves
    s = x_ if r_ is None else x_ + r_
    y = _torch_norm(s, w_, b_, eps, rms)
    loss = (y.double() * dy.double()).sum()
    if ds is not None:
        loss = loss + (s.double() * ds.double()).sum()
    wanted = [t for t in (x_, w_, b_) if t is not None]
    grads = dict(zip([id(t) for t in wanted], torch.autograd.grad(loss, wanted), strict=True))
    return y, s, grads[id(x_)], grads.get(id(w_)), grads.get(id(b_))


def _dx_scale(s, w, dy, ds, eps, rms):
    """Largest magnitude among the terms dx is computed from, ``rstd * (g - xhat * c1 - c2)
    (+ ds)``: the floor's scale. They cancel when dx is ill-conditioned (RMSNorm of one
    element: y = sign(x)), so one ulp of the terms, not of dx, is what rounding can cost."""
    s = s.detach().double()
    xhat = _torch_norm(s, None, None, eps, rms)
    centred = s if rms else s - s.mean(-1, keepdim=True)
    rstd = (centred.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    g = dy.double() if w is None else dy.double() * w.double()
    c1 = (xhat * g).mean(-1, keepdim=True)
    c2 = 0 if rms else g.mean(-1, keepdim=True).abs()
    terms = rstd * (g.abs() + (xhat * c1).abs() + c2)
    return (terms if ds is None else terms + ds.double().abs()).max().item()


def run_case(
    device,
    backend,
    m,
    n,
    dtype,
    rms,
    affine,
    residual,
    x=None,
    dy=None,
    eps=1e-5,
    weight_dtype=None,
    out_dtype=None,
):
    """Forward and backward through ``backend``'s kernels, checked against the reference."""
    x = torch.randn(m, n, dtype=dtype, device=device) if x is None else x
    wdt = weight_dtype or dtype
    w = torch.randn(n, dtype=wdt, device=device) if affine else None
    b = torch.randn(n, dtype=wdt, device=device) if affine and not rms else None
    r = torch.randn(m, n, dtype=dtype, device=device) if residual else None
    out_dtype = out_dtype or dtype
    dy = torch.randn(m, n, dtype=out_dtype, device=device) if dy is None else dy
    ds = torch.randn(m, n, dtype=dtype, device=device) if residual else None

    with poisoned_outputs():
        y, s, mean, rstd = FORWARD[backend](x, w, b, r, eps, rms, out_dtype)
        xs = x if r is None else s
        dx, dw, db = BACKWARD[backend](dy, xs, w, mean, rstd, ds, rms, b is not None)

    ref = _autograd_results(x, w, b, r, dy, ds, eps, rms, torch.float64)
    base = _autograd_results(x, w, b, r, dy, ds, eps, rms, dtype)
    assert y.dtype == out_dtype and dx.dtype == dtype
    assert_policy(y, ref[0], base[0].to(out_dtype), "y")
    if residual:
        assert s.dtype == dtype
        assert_equal(s, base[1], "residual sum", "one rounding, as torch's add")
    assert_policy(dx, ref[2], base[2], "dx", scale=_dx_scale(ref[1], w, dy, ds, eps, rms))
    xhat = _torch_norm(ref[1], None, None, eps, rms)
    if affine:
        assert dw.dtype == torch.float32
        assert_policy(dw.to(wdt), ref[3], base[3], "dweight", scale=summand_scale(dy * xhat, 0))
    if b is not None:
        assert_policy(db.to(wdt), ref[4], base[4], "dbias", scale=summand_scale(dy, 0))
    else:
        assert db is None


SIZES = [1, 7, 64, 257, 1000, 4099]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("features", ["plain", "affine", "residual"])
def test_norm_matches_reference(device_backend, rms, dtype, n, features):
    device, backend = device_backend
    m = 19 if n < 1024 else 3
    run_case(
        device,
        backend,
        m,
        n,
        dtype,
        rms,
        affine=features != "plain",
        residual=features == "residual",
    )


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("n", [65, 100, 300])
def test_looping_path_on_small_rows(device_backend, monkeypatch, rms, n):
    """Rows longer than MAX_TILE loop over chunks; shrink the limits to test it cheaply."""
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("the chunk limits are the Triton launcher's")
    monkeypatch.setattr(kernels, "MAX_TILE", 64)
    monkeypatch.setattr(kernels, "LOOP_BLOCK_N", 32)
    assert not kernels.tile_config(n).single_tile
    run_case(device, backend, 5, n, torch.float32, rms, affine=True, residual=True)
    run_case(device, backend, 5, n, torch.bfloat16, rms, affine=True, residual=False)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("n", [8192, 12289, 65536])
def test_largest_hidden_sizes(device_backend, rms, n):
    device, backend = device_backend
    run_case(device, backend, 2, n, torch.bfloat16, rms, affine=True, residual=True)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_strided_rows(device_backend, rms):
    """Row strides other than N (slices of wider tensors) for x, residual-free dy."""
    device, backend = device_backend
    m, n = 9, 96
    x = torch.randn(m, n + 40, device=device)[:, 5 : 5 + n]
    dy = torch.randn(m, 2 * n, device=device)[:, ::1][:, :n]
    assert x.stride() == (n + 40, 1) and dy.stride() == (2 * n, 1)
    run_case(device, backend, m, n, torch.float32, rms, affine=True, residual=False, x=x, dy=dy)


def test_mixed_precision_weight_and_output(device_backend):
    """bf16 activations with float32 weights (mixed-precision training) and a float32 output."""
    device, backend = device_backend
    for rms in (False, True):
        run_case(
            device,
            backend,
            11,
            320,
            torch.bfloat16,
            rms,
            affine=True,
            residual=False,
            weight_dtype=torch.float32,
            out_dtype=torch.float32,
        )


def test_no_rows(device_backend):
    device, backend = device_backend
    x = torch.empty(0, 33, device=device)
    w = torch.randn(33, device=device)
    y, s, mean, rstd = FORWARD[backend](x, w, w, None, 1e-5, False, x.dtype)
    assert y.shape == (0, 33) and s is None and mean.shape == (0,) and rstd.shape == (0,)
    dx, dw, db = BACKWARD[backend](y, x, w, mean, rstd, None, False, True)
    assert dx.shape == (0, 33)
    torch.testing.assert_close(dw, torch.zeros_like(dw))
    torch.testing.assert_close(db, torch.zeros_like(db))


def test_dweight_is_deterministic(device_backend):
    device, backend = device_backend
    x, dy = (torch.randn(203, 130, device=device) for _ in range(2))
    w = torch.randn(130, device=device)
    _, _, mean, rstd = FORWARD[backend](x, w, w, None, 1e-5, False, x.dtype)
    first = BACKWARD[backend](dy, x, w, mean, rstd, None, False, True)
    second = BACKWARD[backend](dy, x, w, mean, rstd, None, False, True)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_offsets_past_2_31_elements(device_backend):
    """Rows that start beyond element 2**31: a 32-bit row offset would wrap around.

    The rows sit 2**30 elements apart in one 4 GiB (bf16) allocation, of which only the
    touched pages are ever committed.
    """
    device, backend = device_backend
    m, n, stride = 3, 16, 2**30
    storage = torch.empty((m - 1) * stride + n, dtype=torch.bfloat16, device=device)
    x = storage.as_strided((m, n), (stride, 1))
    x.copy_(torch.randn(m, n))
    dy = torch.randn(m, n, dtype=torch.bfloat16, device=device)
    run_case(device, backend, m, n, torch.bfloat16, False, affine=True, residual=False, x=x, dy=dy)
