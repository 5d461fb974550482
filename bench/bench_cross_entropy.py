"""Cross-entropy forward and forward+backward, and the fused linear cross-entropy.

Bytes moved (the roofline numerator), for N rows of V logits of e bytes:

* forward: read the logits, write fp32 loss and lse: ``N*V*e + 8*N``
* forward+backward: the forward, then read the logits again and write dlogits:
  ``3*N*V*e + 8*N`` (the in-place variant inside ``linear_cross_entropy`` moves the same
  bytes into one buffer).

FLOPs (rough; the op is memory-bound): ``4*N*V`` forward (max, subtract, exp, sum) and
``4*N*V`` more for the gradient. The linear cross-entropy is compute-bound:
``6*N*H*V`` (the projection forward, and d_hidden and d_weight) plus the cross-entropy's,
``2*N*H*V`` plus the cross-entropy forward's in its forward-only rows (no grad).

Soft-capping (Gemma 2's final-logit cap, ``softcap * tanh(logits / softcap)``) gets its own
rows, ``linear_cross_entropy fwd+bwd softcap=30`` beside the uncapped ones at the same
shapes; the formulas above stand (the cap's tanh is not counted: a few more FLOPs per logit
in a kernel that is bound by memory in the cross-entropy and by the GEMMs in the fused op).

Peak memory is where the fused linear cross-entropy wins: ``python -m
bench.bench_cross_entropy`` measures it on the CPU at N=8192, V=32000, H=768, fp32, against
``F.cross_entropy(F.linear(h, W), t)`` (:func:`memory_report`), and times both there
(:func:`speed_report`); the harness also reports the peak of every case.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.harness import Case, cpu_peak_bytes
from fastlm import backend, ops

# (rows, vocabulary sizes, hidden size of the linear case) per device; CPU sizes keep quick
# mode to seconds on two cores.
SIZES = {
    ("cuda", True): (4096, (32000, 128256), 2048),
    ("cuda", False): (8192, (4096, 32000, 50304, 128256, 256000), 4096),
    ("cpu", True): (256, (4096, 32000), 256),
    ("cpu", False): (1024, (4096, 32000, 50304), 768),
}


def ce_bytes(n: int, v: int, e: int, backward: bool) -> int:
    return (3 if backward else 1) * n * v * e + 8 * n


def ce_flops(n: int, v: int, backward: bool) -> int:
    return (8 if backward else 4) * n * v


@dataclasses.dataclass
class Provider:
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    backend: str | None = None


def providers(device: torch.device) -> dict[str, Provider]:
    on_gpu = device.type == "cuda"
    found = {}
    if on_gpu:  # the interpreter is far too slow to time
        found["fastlm-triton"] = Provider(ops.cross_entropy, "triton")
    found["fastlm-torch"] = Provider(ops.cross_entropy, "torch")
    found["torch"] = Provider(F.cross_entropy)
    if on_gpu and importlib.util.find_spec("liger_kernel") is not None:
        from liger_kernel.transformers.functional import liger_cross_entropy

        found["liger"] = Provider(liger_cross_entropy)
    return found


def _forward(p: Provider, x, t) -> Callable[[], object]:
    def step():
        with torch.no_grad(), backend.use_backend(p.backend):
            return p.loss(x, t)

    return step


def _forward_backward(p: Provider, x, t) -> Callable[[], object]:
    def step():
        with backend.use_backend(p.backend):
            return torch.autograd.grad(p.loss(x, t), [x])

    return step


SOFTCAP = 30.0  # Gemma 2's final-logit cap


def _unfused_linear(h, w, t, softcap=None):
    logits = F.linear(h, w)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, t)


def _linear_providers(device: torch.device) -> dict[str, tuple[Callable, str | None]]:
    found = {}
    if device.type == "cuda":
        found["fastlm-triton"] = (ops.linear_cross_entropy, "triton")
    found["fastlm-torch"] = (ops.linear_cross_entropy, "torch")
    found["torch"] = (_unfused_linear, None)
    return found


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    n, vocab, hidden = SIZES[(device.type, quick)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    for v in vocab:
        x = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, v, (n,), device=device)
        for name, p in providers(device).items():
            yield Case(
                "cross_entropy fwd",
                name,
                (n, v),
                dtype,
                _forward(p, x, t),
                ce_bytes(n, v, e, False),
                ce_flops(n, v, False),
            )
            yield Case(
                "cross_entropy fwd+bwd",
                name,
                (n, v),
                dtype,
                _forward_backward(p, x, t),
                ce_bytes(n, v, e, True),
                ce_flops(n, v, True),
            )
        del x
        h = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(v, hidden, device=device, dtype=dtype, requires_grad=True)
        for name, (fn, be) in _linear_providers(device).items():

            def forward(fn=fn, be=be, h=h, w=w, t=t):
                with torch.no_grad(), backend.use_backend(be):
                    return fn(h, w, t)

            # Bytes: hidden and weight, plus the cross-entropy forward over the logits.
            yield Case(
                "linear_cross_entropy fwd",
                name,
                (n, hidden, v),
                dtype,
                forward,
                (n + v) * hidden * e + ce_bytes(n, v, e, False),
                2 * n * hidden * v + ce_flops(n, v, False),
            )
        for softcap in (None, SOFTCAP):
            label = "linear_cross_entropy fwd+bwd" + ("" if softcap is None else " softcap=30")
            for name, (fn, be) in _linear_providers(device).items():

                def step(fn=fn, be=be, h=h, w=w, t=t, softcap=softcap):
                    with backend.use_backend(be):
                        return torch.autograd.grad(fn(h, w, t, softcap=softcap), [h, w])

                # Bytes: hidden, weight and their gradients, plus the cross-entropy over
                # logits.
                moved = 2 * (n + v) * hidden * e + ce_bytes(n, v, e, True)
                yield Case(
                    label,
                    name,
                    (n, hidden, v),
                    dtype,
                    step,
                    moved,
                    6 * n * hidden * v + ce_flops(n, v, True),
                )


# ---------------------------------------------------------------------------------------------
# Peak memory on the CPU.


def _issue_steps(n: int, v: int, hidden: int) -> dict[str, Callable[[], object]]:
    """The issue's case, fp32 on the CPU: fused (torch backend) and unfused, forward+backward
    and forward only, on inputs allocated here (not counted by the reports)."""
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(v, hidden) / hidden**0.5).requires_grad_()
    t = torch.randint(0, v, (n,))

    def fused():
        with backend.use_backend("torch"):
            return torch.autograd.grad(ops.linear_cross_entropy(h, w, t), [h, w])

    def unfused():
        return torch.autograd.grad(_unfused_linear(h, w, t), [h, w])

    def fused_fwd():
        with torch.no_grad(), backend.use_backend("torch"):
            return ops.linear_cross_entropy(h, w, t)

    def unfused_fwd():
        with torch.no_grad():
            return _unfused_linear(h, w, t)

    return dict(fused=fused, unfused=unfused, fused_fwd=fused_fwd, unfused_fwd=unfused_fwd)


def memory_report(n: int = 8192, v: int = 32000, hidden: int = 768) -> dict[str, float]:
    """Peak extra memory (MiB) of forward+backward, fused linear cross-entropy (torch
    backend, the same chunked algorithm the Triton path runs) vs the unfused
    ``F.cross_entropy(F.linear(h, W), t)``, fp32 on the CPU, and their ratio. Inputs (h, W,
    t) are allocated beforehand and not counted; the gradients are."""
    steps = _issue_steps(n, v, hidden)
    fused, unfused = steps["fused"], steps["unfused"]
    a, b = fused(), unfused()
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    del a, b
    fused_mib = cpu_peak_bytes(fused) / 2**20
    unfused_mib = cpu_peak_bytes(unfused) / 2**20
    return {"fused_mib": fused_mib, "unfused_mib": unfused_mib, "ratio": fused_mib / unfused_mib}


def speed_report(
    n: int = 8192, v: int = 32000, hidden: int = 768, rounds: int = 3
) -> dict[str, float]:
    """Seconds per call of the fused linear cross-entropy (torch backend) and of the unfused
    ``F.cross_entropy(F.linear(h, W), t)``, forward+backward and forward only, fp32 on the
    CPU at one thread (as the harness times the CPU): the median of ``rounds`` alternating
    rounds after a warm-up call of each, with the ratios fused / unfused."""
    calls = _issue_steps(n, v, hidden)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times: dict[str, list[float]] = {name: [] for name in calls}
        for fn in calls.values():
            fn()
        for r in range(rounds):
            for name in calls if r % 2 == 0 else reversed(calls):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    report = {name: statistics.median(ts) for name, ts in times.items()}
    report["ratio"] = report["fused"] / report["unfused"]
    report["fwd_ratio"] = report["fused_fwd"] / report["unfused_fwd"]
    return report


if __name__ == "__main__":
    report = memory_report()
    print(
        f"linear cross-entropy fwd+bwd peak, N=8192 V=32000 H=768 fp32 (CPU): fused "
        f"{report['fused_mib']:.1f} MiB, unfused {report['unfused_mib']:.1f} MiB, "
        f"ratio {report['ratio']:.3f}"
    )
    speed = speed_report()
    print(
        f"linear cross-entropy, same shape, one thread, median of 3 alternating rounds: "
        f"fwd+bwd fused {speed['fused'] * 1e3:.0f} ms, unfused {speed['unfused'] * 1e3:.0f} ms, "
        f"ratio {speed['ratio']:.3f}; fwd fused {speed['fused_fwd'] * 1e3:.0f} ms, unfused "
        f"{speed['unfused_fwd'] * 1e3:.0f} ms, ratio {speed['fwd_ratio']:.3f}"
    )
