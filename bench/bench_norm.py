"""LayerNorm and RMSNorm, forward and forward+backward, plus the fused residual-add step.

Bytes moved (the roofline numerator), for M rows of N elements of e bytes, weight and bias
in the input dtype, fp32 statistics (mean only for LayerNorm):

* forward: read x (+ residual) and the weight (+ bias); write y (+ the sum s = x + residual)
  and the statistics:
  ``M*N*e*(2 + 2*residual) + N*e*(1 + bias) + 4*M*(1 + layernorm)``
* backward: read dy, the normalized input, the weight and the statistics; write dx and fp32
  dweight (+ dbias): ``3*M*N*e + N*e + 4*M*(1 + layernorm) + 4*N*(1 + bias)``. The
  per-program partial rows of dweight/dbias (O(#SMs * N)) are left out.
* forward+backward: the sum of the two.

FLOPs (rough; these ops are memory-bound): forward ``4*M*N`` for RMSNorm (square, sum,
scale, weight) and ``7*M*N`` for LayerNorm (plus the mean, centring and bias), ``+M*N`` for
the residual add; backward twice the forward.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.harness import Case
from fastlm import backend, ops

EPS = 1e-5
# (rows, hidden sizes) per device; CPU sizes keep quick mode under a minute on two cores.
SIZES = {
    ("cuda", True): (4096, (1024, 4096, 8192)),
    ("cuda", False): (4096, (768, 1024, 2048, 4096, 5120, 8192, 12288, 16384, 32768)),
    ("cpu", True): (256, (256, 1024)),
    ("cpu", False): (1024, (256, 768, 1024, 4096)),
}


def norm_bytes(m: int, n: int, e: int, rms: bool, residual: bool, backward: bool) -> int:
    """Bytes moved by the formula in the module docstring."""
    bias, stats = (0, 1) if rms else (1, 2)
    forward = m * n * e * (2 + 2 * residual) + n * e * (1 + bias) + 4 * m * stats
    if not backward:
        return forward
    return forward + 3 * m * n * e + n * e + 4 * m * stats + 4 * n * (1 + bias)


def norm_flops(m: int, n: int, rms: bool, residual: bool, backward: bool) -> int:
    forward = (4 if rms else 7) * m * n + residual * m * n
    return forward * (3 if backward else 1)


NormFn = Callable[..., object]  # (x, residual=None) -> y, or (y, x + residual)


@dataclasses.dataclass
class Provider:
    fn: NormFn
    params: list[torch.Tensor]  # differentiated along with x in forward+backward
    backend: str | None = None  # fastlm backend forced around forward and backward


def _unfused(norm: Callable[[torch.Tensor], torch.Tensor]) -> NormFn:
    """The pre-norm step for providers without a fused residual: ``s = x + r``, norm(s)."""

    def fn(x, residual=None):
        if residual is None:
            return norm(x)
        s = x + residual
        return norm(s), s

    return fn


def _fastlm(rms: bool, n: int, w: torch.Tensor, b: torch.Tensor | None) -> NormFn:
    def fn(x, residual=None):
        if rms:
            return ops.rms_norm(x, n, w, EPS, residual=residual)
        return ops.layer_norm(x, n, w, b, EPS, residual=residual)

    return fn


def _module_provider(module: torch.nn.Module, like: torch.Tensor) -> Provider:
    module = module.to(device=like.device, dtype=like.dtype)
    return Provider(_unfused(module), list(module.parameters()))


def providers(rms: bool, n: int, device: torch.device, dtype: torch.dtype, quick: bool):
    """Every implementation available here, by name."""
    w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    b = None if rms else torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    params = [w] if rms else [w, b]
    on_gpu = device.type == "cuda"

    def eager(x):
        return F.rms_norm(x, (n,), w, EPS) if rms else F.layer_norm(x, (n,), w, b, EPS)

    found = {}
    # The interpreter is far too slow to time; Triton runs only on GPUs here.
    if on_gpu:
        found["fastlm-triton"] = Provider(_fastlm(rms, n, w, b), params, "triton")
    if on_gpu and backend.cuda_extension_error() is None:
        found["fastlm-cuda"] = Provider(_fastlm(rms, n, w, b), params, "cuda")
    # On a CPU the torch backend is the automatic choice: forcing it would time use_backend's
    # name check, which the plain PyTorch provider does not pay.
    found["fastlm-torch"] = Provider(_fastlm(rms, n, w, b), params, "torch" if on_gpu else None)
    found["torch"] = Provider(_unfused(eager), params)
    # Inductor's CPU code is a C++ build per shape, tens of seconds: too slow for quick mode.
    if on_gpu or not quick:
        # Dynamo caches graphs per code object, shared by every _unfused closure; without a
        # reset the earlier sizes' graphs use up the recompile limit and it falls back to eager.
        torch.compiler.reset()
        found["torch.compile"] = Provider(torch.compile(_unfused(eager), dynamic=False), params)
    if on_gpu and importlib.util.find_spec("apex") is not None:
        from apex.normalization import FusedLayerNorm, FusedRMSNorm

        module = FusedRMSNorm(n, eps=EPS) if rms else FusedLayerNorm(n, eps=EPS)
        found["apex"] = _module_provider(module, w)
    if on_gpu and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

        module = LigerRMSNorm(n, eps=EPS) if rms else LigerLayerNorm(n, eps=EPS)
        found["liger"] = _module_provider(module, w)
    return found


def _forward(p: Provider, x: torch.Tensor, r: torch.Tensor | None) -> Callable[[], object]:
    def step():
        with torch.no_grad(), backend.use_backend(p.backend):
            return p.fn(x, r)

    return step


def _forward_backward(p: Provider, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], object]:
    # autograd.grad, not .backward(): accumulating into .grad would add a kernel per call.
    def step():
        with backend.use_backend(p.backend):
            return torch.autograd.grad(p.fn(x), [x, *p.params], dy)

    return step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """Every (op, provider, hidden size); inputs are built one hidden size at a time."""
    m, hidden = SIZES[(device.type, quick)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    for n in hidden:
        x = torch.randn(m, n, device=device, dtype=dtype, requires_grad=True)
        r, dy = torch.randn_like(x), torch.randn_like(x)
        for rms in (False, True):
            name = "rms_norm" if rms else "layer_norm"
            for provider, p in providers(rms, n, device, dtype, quick).items():
                variants = [
                    (f"{name} fwd", _forward(p, x, None), False, False),
                    (f"{name} fwd+bwd", _forward_backward(p, x, dy), False, True),
                ]
                if rms:  # the Llama-style pre-norm step: fused add vs x + r then norm
                    variants.append((f"{name}+residual fwd", _forward(p, x, r), True, False))
                for op, fn, residual, bwd in variants:
                    yield Case(
                        op,
                        provider,
                        (m, n),
                        dtype,
                        fn,
                        norm_bytes(m, n, e, rms, residual, bwd),
                        norm_flops(m, n, rms, residual, bwd),
                    )
