"""Cross-entropy kernels against the float64 reference, under the numerical policy.

Runs the kernel contract of ``kernels/cross_entropy.py`` under the interpreter on the CPU
(and compiled on a GPU): per-row loss and lse from the forward, the in-place gradient of
the forward's second pass, and the backward from a per-row gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import cross_entropy as kernels

from fastlm.ops.cross_entropy import cross_entropy_ref
from fastlm.testing import assert_policy, poisoned_outputs

IGNORE = -100


def _device(device_backend):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("cross-entropy has no CUDA C++ kernels")
    return device


def _inputs(n, v, dtype, device, ignore_rows=()):
    x = (3 * torch.randn(n, v)).to(dtype).to(device)
    t = torch.randint(0, v, (n,), device=device)
    for i in ignore_rows:
        t[i] = IGNORE
    return x, t


def _rows_and_grad(x, t, dloss, smoothing, z, dtype, weight=None, softcap=0.0):
    """Per-row loss and its gradient weighted by ``dloss``, by autograd at ``dtype``: float64
    with the reference formula, or the test dtype with PyTorch's F.cross_entropy (the
    reference formula at that dtype where F.cross_entropy has no equivalent: soft cap)."""
    leaf = x.detach().to(dtype).requires_grad_()
    w = None if weight is None else weight.to(dtype)
    if dtype == torch.float64 or softcap:
        rows = cross_entropy_ref(leaf, t, IGNORE, smoothing, "none", z, w, softcap or None)
    else:
        rows = F.cross_entropy(
            leaf, t, w, ignore_index=IGNORE, reduction="none", label_smoothing=smoothing
        )
        if z:
            w_t = 1.0 if w is None else w[t.clamp(min=0)]
            rows = rows + z * torch.logsumexp(leaf, -1) ** 2 * (t != IGNORE) * w_t
    (grad,) = torch.autograd.grad(rows, leaf, dloss.to(rows.dtype))
    return rows.detach(), grad


def run_case(
    device,
    n,
    v,
    dtype,
    smoothing=0.0,
    z=0.0,
    ignore_rows=(),
    x=None,
    t=None,
    weighted=False,
    softcap=0.0,
):
    if x is None:
        x, t = _inputs(n, v, dtype, device, ignore_rows)
    weight = torch.rand(v, device=device) + 0.1 if weighted else None
    opts = dict(weight=weight, softcap=softcap)
    dloss = torch.rand(n, device=device) + 0.5  # non-uniform per-row weights
    argmax = torch.empty(n, dtype=torch.int32, device=device)
    with poisoned_outputs():
        loss, lse = kernels.cross_entropy_fwd(x, t, IGNORE, smoothing, z, argmax=argmax, **opts)
        dlogits = kernels.cross_entropy_bwd(dloss, x, t, lse, IGNORE, smoothing, z, **opts)
        # The forward's own gradient pass, written in place over a copy of the logits.
        in_place = x.clone()
        loss2, _ = kernels.cross_entropy_fwd(in_place, t, IGNORE, smoothing, z, in_place, **opts)
        bwd_in_place = x.clone()
        kernels.cross_entropy_bwd(
            dloss, bwd_in_place, t, lse, IGNORE, smoothing, z, out=bwd_in_place, **opts
        )
    args = (smoothing, z)
    ref_rows, ref_grad = _rows_and_grad(x, t, dloss, *args, torch.float64, **opts)
    base_rows, base_grad = _rows_and_grad(x, t, dloss, *args, dtype, **opts)
    assert loss.dtype == lse.dtype == torch.float32 and dlogits.dtype == dtype
    w_max = 1.0 if weight is None else weight.max().item()
    x64 = x.double()
    if softcap:
        x64 = softcap * torch.tanh(x64 / softcap)
    ref_lse = torch.logsumexp(x64, -1)
    # Floor: a row's loss is w_t (lse - x_t) + ... + z lse^2 w_t with lse and the (capped)
    # logits rounded at their own size before they cancel: an ulp there, times the weights.
    loss_scale = None
    if weight is not None or softcap:
        big = ref_lse.abs().max().item() if n else 0.0
        loss_scale = w_max * (1 + 2 * z * big) * (big + x64.abs().max().item())
    assert_policy(loss, ref_rows, base_rows, "loss", scale=loss_scale)
    assert torch.equal(loss, loss2)
    base_x = x if not softcap else softcap * torch.tanh(x / softcap)
    assert_policy(lse, ref_lse, torch.logsumexp(base_x, -1), "lse")
    _check_argmax(argmax, x, x64, softcap)
    scale = grad_scale(ref_lse, z) * w_max
    assert_policy(dlogits, ref_grad, base_grad, "dlogits", scale=scale * dloss.max().item())
    assert torch.equal(bwd_in_place, dlogits)
    ones = torch.ones_like(dloss)
    _, unit_grad = _rows_and_grad(x, t, ones, *args, torch.float64, **opts)
    _, unit_base = _rows_and_grad(x, t, ones, *args, dtype, **opts)
    assert_policy(in_place, unit_grad, unit_base, "in-place dlogits", scale=scale)


def _check_argmax(argmax, x, x64, softcap):
    """The first maximum, as torch.argmax: exactly on the uncapped logits (the kernel
    compares the very same values); with a cap, within the cap's float32 rounding of the
    float64 maximum (the cap may round two values to a tie or out of one)."""
    if not x.shape[0]:
        return
    if not softcap:
        assert torch.equal(argmax.long().cpu(), x.float().argmax(-1).cpu()), argmax
        return
    rows = torch.arange(x.shape[0])
    picked = x64.cpu()[rows, argmax.long().cpu()]
    tol = 4 * softcap * torch.finfo(torch.float32).eps
    assert (picked >= x64.cpu().max(-1).values - tol).all(), (picked, x64.max(-1).values)


def grad_scale(lse, z):
    """The floor's scale for a gradient element. It is computed from the terms
    ``softmax * (1 + 2 z lse)``, ``1 - eps`` and ``eps / V``, which cancel (to 0 for V = 1),
    so one ulp of the terms, not of the result, is what rounding costs; and the backward's
    softmax is ``exp(x - lse)`` with ``lse`` saved in float32, whose own rounding (one ulp
    of ``|lse|``) scales the softmax by up to that much (PyTorch's exp(log_softmax) has the
    same term; a few ulps either way decide the policy's 2x at float32)."""
    if not lse.numel():
        return 1.0
    big = lse.abs().max().item()
    return 2.0 + 2.0 * z * big + (1.0 + 2.0 * z * big) * big


SHAPES = [(1, 1), (7, 300), (5, 4099), (3, 10007)]
FEATURES = {
    "plain": dict(),
    "ignore+smoothing": dict(smoothing=0.1, ignore_rows=(0,)),
    "z_loss": dict(z=1e-3, ignore_rows=(0,)),
    "all": dict(smoothing=0.25, z=1e-2, ignore_rows=(0,)),
    "class weights": dict(weighted=True, smoothing=0.1, z=1e-3, ignore_rows=(0,)),
    "softcap": dict(softcap=2.0, z=1e-3),
    "everything": dict(weighted=True, softcap=5.0, smoothing=0.25, z=1e-2, ignore_rows=(0,)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, v", SHAPES)
@pytest.mark.parametrize("features", list(FEATURES))
def test_cross_entropy_matches_reference(device_backend, dtype, n, v, features):
    device = _device(device_backend)
    kw = dict(FEATURES[features])
    if n == 1:
        kw.pop("ignore_rows", None)
    run_case(device, n, v, dtype, **kw)


def test_float16(device_backend):
    device = _device(device_backend)
    run_case(device, 9, 777, torch.float16, smoothing=0.1, z=1e-3, ignore_rows=(2, 3))


def test_strided_rows(device_backend):
    """Row strides other than V: a slice of a wider tensor."""
    device = _device(device_backend)
    x = torch.randn(6, 400, device=device)[:, 7:307]
    _, t = _inputs(6, 300, torch.float32, device, (1,))
    run_case(device, 6, 300, torch.float32, smoothing=0.1, x=x, t=t)


def test_all_rows_ignored(device_backend):
    device = _device(device_backend)
    x, t = _inputs(4, 50, torch.float32, device, (0, 1, 2, 3))
    loss, lse = kernels.cross_entropy_fwd(x, t, IGNORE, 0.1, 1e-3, torch.empty_like(x))
    assert torch.equal(loss, torch.zeros_like(loss))
    dlogits = kernels.cross_entropy_bwd(torch.ones(4), x, t, lse, IGNORE, 0.1, 1e-3)
    assert torch.equal(dlogits, torch.zeros_like(dlogits))


def test_out_of_range_target_gives_nan(device_backend):
    device = _device(device_backend)
    x, t = _inputs(3, 20, torch.float32, device)
    t[1] = 20
    loss, _ = kernels.cross_entropy_fwd(x, t, IGNORE, 0.0, 0.0)
    assert loss[1].isnan() and loss[[0, 2]].isfinite().all()


def test_no_rows(device_backend):
    device = _device(device_backend)
    x, t = _inputs(0, 33, torch.float32, device)
    loss, lse = kernels.cross_entropy_fwd(x, t, IGNORE, 0.0, 0.0, x)
    assert loss.shape == lse.shape == (0,)
    assert kernels.cross_entropy_bwd(loss, x, t, lse, IGNORE, 0.0, 0.0).shape == (0, 33)


def test_offsets_past_2_31_elements(device_backend):
    """Rows that start beyond element 2**31: a 32-bit row offset would wrap around. The
    rows sit 2**30 elements apart in one 4 GiB (bf16) allocation, of which only the touched
    pages are ever committed."""
    device = _device(device_backend)
    n, v, stride = 3, 40, 2**30
    storage = torch.empty((n - 1) * stride + v, dtype=torch.bfloat16, device=device)
    x = storage.as_strided((n, v), (stride, 1))
    x.copy_(torch.randn(n, v))
    t = torch.randint(0, v, (n,), device=device)
    run_case(device, n, v, torch.bfloat16, smoothing=0.1, x=x, t=t)
