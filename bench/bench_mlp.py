"""GEMM + bias + activation, the gated GEMM, and whole MLPs (forward, and forward+backward).

FLOPs (the op is compute-bound): ``2*M*N*K`` per GEMM. The gated GEMM is two of them; a
whole MLP's forward is ``2*M*K*N`` per linear, its backward twice that.

Bytes moved (for the memory-bound share and small M), elements of ``e`` bytes: a GEMM reads
x (M*K) and W (N*K) and writes y (M*N); the gated one reads two weights. Eager PyTorch adds
a round trip of (M, N) per elementwise op after the GEMM (bias-free here: cuBLAS adds the
bias in its epilogue), which is what the fused epilogue removes.

Providers: ``fastlm-triton`` (GPU), ``fastlm-torch`` (the CPU path), ``torch`` (eager),
``torch.compile`` (GPU, or CPU without --quick), ``gemm-only`` (the GEMM alone, cuBLAS on
GPUs: the bound the fused epilogue is measured against), ``liger`` (its SiLU-and-multiply
kernel between cuBLAS GEMMs, when installed). The harness records each case's peak memory;
``python -m bench.bench_mlp`` prints what autograd keeps for the backward
(:func:`saved_report`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.harness import Case
from fastlm import backend, ops

# (M tokens, [(N, K)] GEMM shapes, (hidden, intermediate) of the MLP cases) per device.
SIZES = {
    ("cuda", True): (8192, [(4096, 4096), (11008, 4096)], [(4096, 11008)]),
    ("cuda", False): (
        8192,
        [(4096, 4096), (8192, 8192), (16384, 16384), (11008, 4096)],
        [(2048, 5632), (4096, 11008), (8192, 28672)],
    ),
    ("cpu", True): (256, [(512, 512)], [(256, 688)]),
    ("cpu", False): (1024, [(1024, 1024), (2752, 1024)], [(1024, 2752)]),
}


def gemm_flops(m: int, n: int, k: int, gemms: int = 1) -> int:
    return 2 * m * n * k * gemms


def gemm_bytes(m: int, n: int, k: int, e: int, weights: int = 1) -> int:
    return (m * k + weights * n * k + m * n) * e


def _with_backend(fn: Callable, be: str | None) -> Callable:
    def call(*args):
        with backend.use_backend(be):
            return fn(*args)

    return call


def _compiled(fn: Callable) -> Callable:
    # Dynamo caches graphs per code object; earlier shapes would use up the recompile limit.
    torch.compiler.reset()
    return torch.compile(fn, dynamic=False)


def _eager_linear_act(x, w):
    return F.gelu(F.linear(x, w), approximate="tanh")


def _eager_gated(x, wg, wu):
    return F.silu(F.linear(x, wg)) * F.linear(x, wu)


def _eager_gated_mlp(x, wg, wu, wd):
    return F.linear(_eager_gated(x, wg, wu), wd)


def _providers(
    device: torch.device,
    quick: bool,
    fused: Callable,
    eager: Callable,
    extra: dict[str, Callable] | None = None,
) -> dict[str, Callable]:
    on_gpu = device.type == "cuda"
    found = {}
    if on_gpu:  # the interpreter is far too slow to time
        found["fastlm-triton"] = _with_backend(fused, "triton")
    found["fastlm-torch"] = _with_backend(fused, "torch")
    found["torch"] = eager
    # Inductor's CPU code is a C++ build per shape, tens of seconds: too slow for quick mode.
    if on_gpu or not quick:
        found["torch.compile"] = _compiled(eager)
    found.update(extra or {})
    return found


def _liger_swiglu() -> Callable | None:
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def gated_mlp(x, wg, wu, wd):
        return F.linear(LigerSiLUMulFunction.apply(F.linear(x, wg), F.linear(x, wu)), wd)

    return gated_mlp


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    m, gemm_shapes, mlp_shapes = SIZES[(device.type, quick)]
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    e = dtype.itemsize

    def randn(*shape, grad=False):
        t = torch.randn(*shape, device=device, dtype=dtype) / shape[-1] ** 0.25
        return t.requires_grad_(grad)

    for n, k in gemm_shapes:
        x, w, wu = randn(m, k), randn(n, k), randn(n, k)
        linear = _providers(
            device,
            quick,
            lambda x, w: ops.linear_act(x, w, None, "gelu_tanh"),
            _eager_linear_act,
            {"gemm-only": F.linear},
        )
        for name, fn in linear.items():
            yield Case(
                "linear_act gelu_tanh fwd",
                name,
                (m, n, k),
                dtype,
                _no_grad(fn, x, w),
                gemm_bytes(m, n, k, e),
                gemm_flops(m, n, k),
            )
        gated = _providers(
            device, quick, lambda x, wg, wu: ops.gated_linear(x, wg, wu), _eager_gated
        )
        for name, fn in gated.items():
            yield Case(
                "gated_linear silu fwd",
                name,
                (m, n, k),
                dtype,
                _no_grad(fn, x, w, wu),
                gemm_bytes(m, n, k, e, 2),
                gemm_flops(m, n, k, 2),
            )
        del x, w, wu

    for hidden, inter in mlp_shapes:
        x = randn(m, hidden, grad=True)
        wg, wu, wd = (
            randn(inter, hidden, grad=True),
            randn(inter, hidden, grad=True),
            randn(hidden, inter, grad=True),
        )
        extra = {}
        if on_gpu and (liger := _liger_swiglu()) is not None:
            extra["liger"] = liger
        mlp = _providers(device, quick, ops.gated_mlp, _eager_gated_mlp, extra)
        flops = gemm_flops(m, inter, hidden, 3)
        moved = gemm_bytes(m, inter, hidden, e, 3)
        for name, fn in mlp.items():
            yield Case(
                "gated_mlp silu fwd",
                name,
                (m, hidden, inter),
                dtype,
                _no_grad(fn, x, wg, wu, wd),
                moved,
                flops,
            )
            yield Case(
                "gated_mlp silu fwd+bwd",
                name,
                (m, hidden, inter),
                dtype,
                _fwd_bwd(fn, x, wg, wu, wd),
                3 * moved,
                3 * flops,
            )
        del x, wg, wu, wd


def _no_grad(fn: Callable, *args) -> Callable[[], object]:
    def step():
        with torch.no_grad():
            return fn(*args)

    return step


def _fwd_bwd(fn: Callable, *args) -> Callable[[], object]:
    def step():
        return torch.autograd.grad(fn(*args).float().sum(), args)

    return step


# ---------------------------------------------------------------------------------------------
# What autograd keeps for the backward.


def saved_bytes(fn: Callable[[], object], params: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward while ``fn()`` runs, parameters
    excluded (they are held anyway)."""
    param_ptrs = {p.data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def saved_report(m: int = 64, hidden: int = 64, inter: int = 176) -> dict[str, float]:
    """Activation bytes kept for the backward by fastlm's Triton MLPs (run here under the
    interpreter, so any machine can measure it) and by eager PyTorch, bf16, and their ratios.
    The counts scale linearly in tokens, so the ratios hold at any size."""
    dt = torch.bfloat16

    def leaf(*shape):
        return (torch.randn(*shape, dtype=dt) / shape[-1] ** 0.5).requires_grad_()

    x = leaf(m, hidden)
    wg, wu, wd, b1, b2 = (
        leaf(inter, hidden),
        leaf(inter, hidden),
        leaf(hidden, inter),
        leaf(inter),
        leaf(hidden),
    )
    report = {}
    for name, fn, params in [
        ("gated_mlp", lambda: ops.gated_mlp(x, wg, wu, wd), [wg, wu, wd]),
        ("fused_mlp", lambda: ops.fused_mlp(x, wg, b1, wd, b2, "gelu"), [wg, b1, wd, b2]),
    ]:
        with backend.use_backend("triton"):
            fused = saved_bytes(fn, params)
        with backend.use_backend("torch"):
            eager = saved_bytes(fn, params)
        report[name] = {"fused_bytes": fused, "eager_bytes": eager, "ratio": fused / eager}
    return report


if __name__ == "__main__":
    for op, r in saved_report().items():
        print(
            f"{op}: saved for backward, fused {r['fused_bytes']} B, eager {r['eager_bytes']} B,"
            f" ratio {r['ratio']:.3f} (bf16, M=64, hidden 64, intermediate 176)"
        )
