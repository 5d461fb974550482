"""Quantized matmuls (weight-only int8 / int4 / NF4, and W8A8) against the float GEMM and,
when installed, bitsandbytes and torchao; plus the SQNR of each format (:func:`sqnr_table`).

``y = x @ W.T`` for x (M, K) and W (N, K), M swept from one token (decoding, a GEMV: reading
the weight is the whole cost) to 4096 tokens (prefill: compute-bound).

Bytes moved (the roofline numerator: "effective GB/s of weight traffic"), for activations
of ``e`` bytes (2 for bf16 on GPUs, 4 for fp32 x on CPU; each provider's own x dtype)::

    bytes = weight_bytes + (M*K + M*N) * e

``weight_bytes`` is what the format actually stores, metadata included: the sum of the
bytes of a :class:`~fastlm.quant.QuantizedWeight`'s tensors (int4 g128:
``N*K/2 + N*K/128*(2 + 1)``, fp16 scales and uint8 zeros; int8: ``N*K + 4*N``; NF4 g64:
``N*K/2 + 2*N*K/64``), ``2*N*K`` for a bf16 weight, ``4*N*K`` for fp32, and for the
third-party providers the bytes of the tensors their modules hold (bitsandbytes' int8
weight and fp32 row scales, its packed NF4 and fp32 absmax; torchao's tensor subclass
components). W8A8's int8 copy of x (written, then read: ``2*M*K + 8*M`` more) is left out.
At small M the weight dominates, so GB/s over the copy bandwidth ("% roof") says how close
a kernel comes to streaming the weight at memory speed; a 4-bit kernel at 80% of the roof
runs ~3.5x faster than bf16 at 80%. FLOPs ``2*M*N*K`` (read TFLOP/s at large M).

Shapes are ``(N, K, M)``: the harness sweeps (sorts and plots) the last dim, here M.
Ops are named ``quant_matmul N=K=<n>`` so every provider of one weight shape shares a plot.

Providers. GPU (bf16 activations): ``bf16 cuBLAS`` (``F.linear``), ``fastlm int8``,
``fastlm int4-g128``, ``fastlm nf4-g64`` (the Triton kernels), ``fastlm w8a8``, the CUDA C++
GEMV ``fastlm int4-g128 cuda-gemv`` / ``fastlm int8 cuda-gemv`` (M <= 8, when ``fastlm._C``
is built), and when importable ``bnb Linear8bitLt`` (LLM.int8(), threshold 6),
``bnb Linear4bit nf4`` (blocksize 64, no double quant: the same format as fastlm's nf4-g64),
``torchao int4-g128`` (tinygemm) and ``torchao int8``. A third-party provider that is not
installed is left out silently; one that fails to build or run is skipped with one line
saying why. CPU (fp32 x): ``fp32 F.linear``, ``bf16 F.linear``, and per format (``int8``,
``int4-g128``, ``nf4-g64``, ``w8a8``) fastlm on its torch backend, ``fastlm-torch <format>``,
beside the same computation written in plain PyTorch, ``torch <format>`` (the format's
dequantization formula, then ``F.linear``; for W8A8 the per-token quantization and the
float64 product of the integers): the pair whose ratio says what fastlm's CPU path costs
over doing it by hand.

``python -m bench.bench_quant --sqnr`` prints the SQNR table (markdown) of every format.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.harness import Case, third_party_runs
from fastlm import backend, ops
from fastlm.ops.quant import GEMV_MAX_M
from fastlm.quant import NF4_CODE, QuantizedWeight, dequantize_weight, quantize_weight

# (tokens M, weight sizes N = K) per device; the CPU quick set runs in well under 20 s.
SIZES = {
    ("cuda", True): ((1, 16, 4096), (4096,)),
    ("cuda", False): ((1, 8, 16, 64, 512, 4096), (4096, 8192)),
    ("cpu", True): ((1, 16), (1024,)),
    ("cpu", False): ((1, 16, 256), (1024, 4096)),
}

# The benchmarked fastlm formats: quantize_weight keyword arguments by name.
FORMATS = {
    "int8": {"bits": 8},
    "int4-g128": {"bits": 4, "group_size": 128},
    "nf4-g64": {"bits": 4, "scheme": "nf4", "group_size": 64},
}
GEMV_FORMATS = ("int4-g128", "int8")  # what the CUDA C++ GEMV serves (M <= GEMV_MAX_M)


def weight_bytes(qw: QuantizedWeight) -> int:
    """Bytes a quantized weight stores: its tensors, metadata included."""
    return sum(t.numel() * t.element_size() for t in qw.tensors().values())


def quant_bytes(m: int, n: int, k: int, weight: int, e: int) -> int:
    """The module docstring's formula: the stored weight plus x read and y written."""
    return weight + (m * k + m * n) * e


def quant_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@dataclasses.dataclass
class Provider:
    fn: Callable[[Tensor], Tensor]  # x (M, K) -> y (M, N), no grad
    weight_bytes: int
    dtype: torch.dtype  # of x and y
    qw: QuantizedWeight | None = None  # fastlm formats: y must match F.linear(x, dequantized)
    max_m: int | None = None  # serves M <= max_m only (the CUDA GEMV)
    third_party: bool = False  # run once before timing; skipped with a note when it fails


def _fastlm(op: Callable, qw: QuantizedWeight, be: str) -> Callable[[Tensor], Tensor]:
    def fn(x):
        with backend.use_backend(be):
            return op(x, qw)

    return fn


def _linear(w: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, w)


def plain_dequantize(qw: QuantizedWeight, dtype: torch.dtype) -> Tensor:
    """The weight a :class:`QuantizedWeight` stands for, by its format's formula in plain
    PyTorch, each step out of place (what a user writes without fastlm)."""
    n, k = qw.shape
    if qw.bits == 8:
        return (qw.qweight.float() * qw.scales.float()[:, None]).to(dtype)
    packed = qw.qweight
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
    q = q.view(n, k // qw.group_size, qw.group_size)
    scales = qw.block_scales().float()[..., None]
    if qw.scheme == "nf4":
        w = torch.tensor(NF4_CODE, device=q.device)[q.long()] * scales
    else:
        zeros = 8 if qw.zeros is None else qw.zeros.float()[..., None]
        w = (q.float() - zeros) * scales
    return w.view(n, k).to(dtype)


def _plain_quant(qw: QuantizedWeight) -> Callable[[Tensor], Tensor]:
    return lambda x: F.linear(x, plain_dequantize(qw, x.dtype))


def _plain_w8a8(qw: QuantizedWeight) -> Callable[[Tensor], Tensor]:
    """Per-token int8 x, then the integer product (exact in float64) scaled back."""

    def fn(x):
        xs = x.float().abs().amax(dim=-1).clamp_min(1e-12) / 127
        xq = torch.round(x.float() / xs[:, None]).to(torch.int8)
        acc = xq.double() @ qw.qweight.double().T
        return (acc * xs.double()[:, None] * qw.scales.double()[None, :]).to(x.dtype)

    return fn


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _subclass_bytes(t: Tensor) -> int:
    """Bytes of a (possibly wrapper-subclass) tensor: the sum over its inner tensors, as
    ``__tensor_flatten__`` names them (torchao's quantized weights), recursively."""
    if not hasattr(t, "__tensor_flatten__"):
        return _nbytes(t)
    names, _ = t.__tensor_flatten__()
    return sum(_subclass_bytes(getattr(t, name)) for name in names)


def _bnb(w: Tensor, kind: str) -> tuple[torch.nn.Module, int]:
    import bitsandbytes as bnb

    n, k = w.shape
    # bitsandbytes quantizes a float weight when the module moves to the GPU.
    if kind == "int8":
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(
            w.detach().to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
        )
        lin = lin.to(w.device)
        return lin, _nbytes(lin.weight) + _nbytes(getattr(lin.weight, "SCB", None))
    lin = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False, quant_type="nf4"
    )
    lin.weight = bnb.nn.Params4bit(
        w.detach().to("cpu", torch.bfloat16),
        requires_grad=False,
        blocksize=64,
        compress_statistics=False,
        quant_type="nf4",
    )
    lin = lin.to(w.device)
    state = lin.weight.quant_state
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    stored = _nbytes(lin.weight) + _nbytes(state.absmax)
    return lin, stored + (_nbytes(nested.absmax) if nested is not None else 0)


def _torchao(w: Tensor, bits: int) -> tuple[torch.nn.Module, int]:
    """A bf16 ``nn.Linear`` quantized by ``torchao.quantization.quantize_``, trying the
    config spellings of successive torchao releases (first that builds and runs wins)."""
    import torchao.quantization as tq

    n, k = w.shape
    configs: list[Callable[[], object]] = []
    if bits == 4:
        if hasattr(tq, "Int4WeightOnlyConfig"):
            # torchao >= 0.14 (version 2): "tile_packed_to_4d" is the tinygemm kernel (the
            # default "plain" packing needs fbgemm-gpu-genai); earlier: version 1, tinygemm.
            configs += [
                lambda: tq.Int4WeightOnlyConfig(
                    group_size=128, int4_packing_format="tile_packed_to_4d"
                ),
                lambda: tq.Int4WeightOnlyConfig(group_size=128),
            ]
        if hasattr(tq, "int4_weight_only"):
            configs.append(lambda: tq.int4_weight_only(group_size=128))
    else:
        if hasattr(tq, "Int8WeightOnlyConfig"):
            configs.append(lambda: tq.Int8WeightOnlyConfig())
        if hasattr(tq, "int8_weight_only"):
            configs.append(lambda: tq.int8_weight_only())
    errors = []
    for config in configs:
        try:
            lin = torch.nn.Linear(k, n, bias=False, device=w.device, dtype=torch.bfloat16)
            with torch.no_grad():
                lin.weight.copy_(w)
            tq.quantize_(lin, config())
            with torch.no_grad():
                lin(torch.zeros(1, k, device=w.device, dtype=torch.bfloat16))
            return lin, _subclass_bytes(lin.weight)
        except Exception as exc:  # an API or kernel this torchao/torch pair lacks: try the next
            errors.append(f"{type(exc).__name__}: {exc}")
    raise RuntimeError("no torchao config worked: " + " | ".join(errors or ["none found"]))


def _third_party(w: Tensor) -> dict[str, Callable[[], tuple[torch.nn.Module, int]]]:
    """Builders of the installed third-party providers (absent packages: left out)."""
    found = {}
    if _has("bitsandbytes"):
        found["bnb Linear8bitLt"] = lambda: _bnb(w, "int8")
        found["bnb Linear4bit nf4"] = lambda: _bnb(w, "nf4")
    if _has("torchao"):
        found["torchao int4-g128"] = lambda: _torchao(w, 4)
        found["torchao int8"] = lambda: _torchao(w, 8)
    return found


def providers(w: Tensor, notes: dict[str, str] | None = None) -> dict[str, Provider]:
    """Every implementation available here of ``x @ w.T`` for w (N, K) fp32, on w's device.
    A third-party provider that fails to build is left out; ``notes[name]`` says why."""
    n, k = w.shape
    fastlm_be = "triton" if w.device.type == "cuda" else "torch"
    found: dict[str, Provider] = {}
    if w.device.type == "cuda":
        dtype = torch.bfloat16
        found["bf16 cuBLAS"] = Provider(_linear(w.bfloat16()), 2 * n * k, dtype)
    else:
        dtype = torch.float32
        found["fp32 F.linear"] = Provider(_linear(w), 4 * n * k, dtype)
        found["bf16 F.linear"] = Provider(_linear(w.bfloat16()), 2 * n * k, torch.bfloat16)
    # On a CPU fastlm runs its torch backend, paired with the plain PyTorch computation.
    prefix = "fastlm" if w.device.type == "cuda" else "fastlm-torch"
    weights = {name: quantize_weight(w, **kwargs) for name, kwargs in FORMATS.items()}
    for name, qw in weights.items():
        found[f"{prefix} {name}"] = Provider(
            _fastlm(ops.quant_matmul, qw, fastlm_be), weight_bytes(qw), dtype, qw
        )
        if prefix == "fastlm-torch":
            found[f"torch {name}"] = Provider(_plain_quant(qw), weight_bytes(qw), dtype, qw)
    qw8 = weights["int8"]
    found[f"{prefix} w8a8"] = Provider(
        _fastlm(ops.w8a8_matmul, qw8, fastlm_be), weight_bytes(qw8), dtype, qw8
    )
    if w.device.type != "cuda":
        found["torch w8a8"] = Provider(_plain_w8a8(qw8), weight_bytes(qw8), dtype, qw8)
        return found
    if backend.cuda_extension_error() is None:
        for name in GEMV_FORMATS:
            qw = weights[name]
            found[f"fastlm {name} cuda-gemv"] = Provider(
                _fastlm(ops.quant_matmul, qw, "cuda"), weight_bytes(qw), dtype, qw, GEMV_MAX_M
            )
    for name, build in _third_party(w).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module, stored = build()
        except Exception as exc:  # an optional provider must not stop the bench
            if notes is not None:
                notes[name] = f"{type(exc).__name__}: {exc}"
            continue
        found[name] = Provider(module, stored, dtype, third_party=True)
    return found


def _step(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], Tensor]:
    def step():
        with torch.no_grad():
            return fn(x)

    return step


def _op(n: int, k: int) -> str:
    return f"quant_matmul N=K={n}" if n == k else f"quant_matmul N={n} K={k}"


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    ms, sizes = SIZES[(device.type, quick)]
    noted: set[str] = set()

    def note(name: str, why: str) -> None:
        if name not in noted:  # once per provider, not per shape
            noted.add(name)
            print(f"skipping {name}: {why[:300]}")

    for size in sizes:
        n = k = size
        w = torch.randn(n, k, device=device) * 0.02
        notes: dict[str, str] = {}
        found = providers(w, notes)
        for name, why in notes.items():
            note(name, why)
        for m in ms:
            x = torch.randn(m, k, device=device)
            xs = {dt: x.to(dt) for dt in {p.dtype for p in found.values()}}
            for name, p in found.items():
                if (p.max_m is not None and m > p.max_m) or name in noted:
                    continue
                fn = _step(p.fn, xs[p.dtype])
                if p.third_party and not third_party_runs(fn, name, note):
                    continue
                yield Case(
                    _op(n, k),
                    name,
                    (n, k, m),
                    p.dtype,
                    fn,
                    quant_bytes(m, n, k, p.weight_bytes, p.dtype.itemsize),
                    quant_flops(m, n, k),
                )
            del x, xs
        # Free this size's weights before the next size builds its own.
        del w, found
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Accuracy: signal-to-quantization-noise ratio of each format.

SQNR_FORMATS = {
    "int8 (per channel)": {"bits": 8},
    "int4 g32": {"bits": 4, "group_size": 32},
    "int4 g64": {"bits": 4, "group_size": 64},
    "int4 g128": {"bits": 4, "group_size": 128},
    "int4 g128 symmetric": {"bits": 4, "group_size": 128, "symmetric": True},
    "nf4 g64": {"bits": 4, "scheme": "nf4", "group_size": 64},
    "nf4 g64 double-quant": {"bits": 4, "scheme": "nf4", "group_size": 64, "double_quant": True},
}


def sqnr_db(w: Tensor, w_hat: Tensor) -> float:
    """``10 log10(sum w^2 / sum (w - w_hat)^2)``, in float64."""
    w, w_hat = w.double(), w_hat.double()
    noise = (w - w_hat).square().sum().item()
    return math.inf if noise == 0 else 10 * math.log10(w.square().sum().item() / noise)


def sqnr_table(n: int = 1024, k: int = 4096, seed: int = 0) -> list[dict]:
    """For each of :data:`SQNR_FORMATS`: its storage bits per weight and the SQNR (dB) of
    ``dequantize_weight(quantize_weight(w))`` for an (n, k) weight drawn Gaussian (std 0.02)
    and Student-t with 3 degrees of freedom (heavy tails, scaled by 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, k, generator=gen) * 0.02
    # t(3) = Z / sqrt(V / 3) with V ~ chi-squared(3), a sum of three squared normals.
    chi2 = torch.randn(3, n, k, generator=gen).square().sum(0)
    student_t = torch.randn(n, k, generator=gen) / (chi2 / 3).sqrt() * 0.02
    rows = []
    for name, kwargs in SQNR_FORMATS.items():
        row: dict = {"format": name}
        for dist, w in (("gaussian", gaussian), ("student_t3", student_t)):
            qw = quantize_weight(w, **kwargs)
            row["bits_per_weight"] = qw.storage_bits()
            row[f"sqnr_{dist}_db"] = sqnr_db(w, dequantize_weight(qw))
        rows.append(row)
    return rows


def sqnr_markdown(rows: list[dict], n: int, k: int) -> str:
    lines = [
        f"| format ({n}x{k}) | bits/weight | SQNR Gaussian (dB) | SQNR Student-t, 3 dof (dB) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['bits_per_weight']:.3f} | "
            f"{r['sqnr_gaussian_db']:.2f} | {r['sqnr_student_t3_db']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_quant", description="Quantization accuracy of the formats."
    )
    parser.add_argument("--sqnr", action="store_true", help="print the SQNR table (markdown)")
    parser.add_argument("--n", type=int, default=1024, help="weight rows N (default 1024)")
    parser.add_argument("--k", type=int, default=4096, help="weight columns K (default 4096)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.sqnr:
        parser.print_help()
        return 2
    print(sqnr_markdown(sqnr_table(args.n, args.k, args.seed), args.n, args.k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
