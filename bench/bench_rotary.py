"""Rotary position embeddings on q and k, forward and forward+backward.

Bytes moved (the roofline numerator), for q (B, S, Hq, D) and k (B, S, Hk, D) of e bytes,
fp32 cos/sin tables (P, R/2) with P = S:

* forward: read and write q and k, read cos and sin:
  ``2*B*S*(Hq + Hk)*D*e + 2*S*(R/2)*4``
* forward+backward: the backward moves the same again (read dq/dk, write the gradients,
  read cos/sin), so twice the forward.

FLOPs (rough; memory-bound): 3 per rotated element (two multiplies and an add), 6 with the
backward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from bench.harness import Case
from fastlm import backend
from fastlm.ops.rotary import apply_rotary

# (B, S, Hq, Hk, D) per device; CPU shapes are tiny.
SIZES = {
    ("cuda", True): [(8, 2048, 32, 8, 128), (1, 8192, 32, 32, 128)],
    ("cuda", False): [
        (8, 2048, 32, 8, 128),
        (1, 8192, 32, 32, 128),
        (16, 1024, 16, 16, 64),
        (8, 2048, 64, 8, 128),
    ],
    ("cpu", True): [(2, 128, 8, 2, 64)],
    ("cpu", False): [(2, 128, 8, 2, 64), (1, 512, 16, 4, 128)],
}


def rotary_bytes(b, s, hq, hk, d, e, backward: bool) -> int:
    forward = 2 * b * s * (hq + hk) * d * e + 2 * s * (d // 2) * 4
    return forward * (2 if backward else 1)


def rotary_flops(b, s, hq, hk, d, backward: bool) -> int:
    return 3 * b * s * (hq + hk) * d * (2 if backward else 1)


@dataclasses.dataclass
class Provider:
    fn: Callable[[torch.Tensor, torch.Tensor], object]  # (q, k) -> (q_rot, k_rot)
    backend: str | None = None


def _eager(cos, sin, dtype):
    """The formula as a user writes it in PyTorch (rotate_half, Hugging Face Llama), with the
    full-width tables built once in the inputs' dtype outside the timed call, as a model
    builds them once per forward for all its layers."""
    c = torch.cat((cos, cos), dim=-1)[None, :, None, :].to(dtype)
    s_ = torch.cat((sin, sin), dim=-1)[None, :, None, :].to(dtype)

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    def fn(q, k):
        return q * c + rotate_half(q) * s_, k * c + rotate_half(k) * s_

    return fn


def providers(cos, sin, device: torch.device, quick: bool, dtype) -> dict[str, Provider]:
    on_gpu = device.type == "cuda"

    def fastlm(q, k):
        return apply_rotary(q, k, cos, sin)

    found = {}
    # The interpreter is far too slow to time; Triton runs only on GPUs here.
    if on_gpu:
        found["fastlm-triton"] = Provider(fastlm, "triton")
    found["fastlm-torch"] = Provider(fastlm, "torch")
    found["torch"] = Provider(_eager(cos, sin, dtype))
    if on_gpu:
        torch.compiler.reset()
        found["torch.compile"] = Provider(torch.compile(_eager(cos, sin, dtype), dynamic=False))
    return found


def _forward(p: Provider, q, k) -> Callable[[], object]:
    def step():
        with torch.no_grad(), backend.use_backend(p.backend):
            return p.fn(q, k)

    return step


def _forward_backward(p: Provider, q, k, dq, dk) -> Callable[[], object]:
    def step():
        with backend.use_backend(p.backend):
            return torch.autograd.grad(p.fn(q, k), [q, k], [dq, dk])

    return step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """Every (op, provider, shape); inputs are built one shape at a time."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    for b, s, hq, hk, d in SIZES[(device.type, quick)]:
        q = torch.randn(b, s, hq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, s, hk, d, device=device, dtype=dtype, requires_grad=True)
        dq, dk = torch.randn_like(q), torch.randn_like(k)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device).float() / d))
        angles = torch.outer(torch.arange(s, device=device).float(), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        for provider, p in providers(cos, sin, device, quick, dtype).items():
            for op, fn, bwd in (
                ("rotary fwd", _forward(p, q, k), False),
                ("rotary fwd+bwd", _forward_backward(p, q, k, dq, dk), True),
            ):
                yield Case(
                    op,
                    provider,
                    (b, s, hq + hk, d),
                    dtype,
                    fn,
                    rotary_bytes(b, s, hq, hk, d, e, bwd),
                    rotary_flops(b, s, hq, hk, d, bwd),
                )
