"""LoRA and QLoRA training steps (forward + backward) against the frozen base and PEFT.

Two structures, hidden size H (square weights, N = K = H), M tokens, rank r:

* ``layer``: one adapted linear, ``y = x @ W.T + scale * x @ A.T @ B.T``;
* ``stack4``: :data:`DEPTH` such layers in sequence, SiLU between them, each adapted.

Each timed call runs the forward, the backward with a fixed random dy (x requires grad, so
dX is computed, as for a layer inside a model; the base is frozen: no dW), then drops the
gradients (``set_to_none``), as a training step's ``zero_grad`` does.

FLOPs, per layer: the base GEMM forward ``2*M*N*K`` and its dX ``2*M*N*K`` (frozen: no
dW); the adapter, ``2*M*r*(K + N)`` forward (``t = x @ A.T``, ``t @ B.T``) and twice that
backward (dB and dt = dy @ B; dA and dx += dt @ A)::

    flops = 4*M*N*K + 6*M*r*(K + N)          (the frozen base: 4*M*N*K)

Bytes moved, per layer, activations and adapters of ``e`` bytes: the base weight (``W``
bytes as stored: ``N*K*e`` float, packed nibbles + scales (+ zeros) for 4-bit) read once
forward and once backward; x read and y written forward, dy read and dx written backward;
the adapter reads A and B forward and backward and writes dA and dB, writes the rank-r
intermediate t forward and reads it backward, and re-reads x for dA::

    bytes = 2*W + 2*M*(K + N)*e + [3*r*(K + N)*e + (M*K + 2*M*r)*e]   (bracket: adapted)

The stack is DEPTH times that; the SiLU's own traffic and what autograd saves for it are
left out. The harness records each call's peak memory.

Shapes are ``(H, r, M)`` (M swept); ops are named ``lora fwd+bwd <structure> h=H r=r`` so
one plot holds every provider of one rank. The frozen base does not depend on r: it is
timed once per op as the line the adapters are measured against.

Providers: ``frozen base`` (the float layers alone), ``fastlm LoRA`` (float base:
:class:`fastlm.nn.LoRALinear` via :func:`fastlm.peft.apply_lora`; on GPUs the fused
``fastlm.ops.lora_linear`` kernel), ``fastlm QLoRA int4-g128`` and ``fastlm QLoRA nf4`` (NF4,
block 64, QLoRA's format) over a :class:`fastlm.nn.QuantLinear` base, and when installed
``PEFT LoRA`` (``peft.get_peft_model``) and ``PEFT LoRA + bnb 4bit`` (PEFT over
bitsandbytes' ``Linear4bit`` NF4, block 64). On a CPU fastlm runs its torch backend, named
``fastlm-torch LoRA`` / ``fastlm-torch QLoRA <format>``, each paired with the same layers in
plain PyTorch, ``torch LoRA`` / ``torch QLoRA <format>`` (:class:`PlainLoRA`: ``base(x) +
B(A(x)) * scale``, over the format's dequantization formula for QLoRA), the pair whose ratio
says what fastlm's CPU path costs over writing it by hand. Every adapter is held in the
compute dtype (bf16 on GPUs, fp32 on CPU), the layers have no bias. A third-party provider
that is not installed is left out silently; one that fails to build or run is skipped with
one line saying why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.bench_quant import plain_dequantize
from bench.harness import Case, third_party_runs
from fastlm.nn.quant import QuantLinear
from fastlm.peft import apply_lora

DEPTH = 4  # layers of the stack
# (hidden H, ranks, tokens M) per device; the CPU quick set runs in a few seconds.
SIZES = {
    ("cuda", True): (4096, (16,), (4096,)),
    ("cuda", False): (4096, (8, 16, 64), (4096, 8192, 16384)),
    ("cpu", True): (512, (16,), (256,)),
    ("cpu", False): (512, (8, 16), (256, 512, 1024)),
}
# The QLoRA base formats: QuantLinear.from_linear keyword arguments by provider suffix.
QUANT = {
    "QLoRA int4-g128": {"bits": 4, "group_size": 128},
    "QLoRA nf4": {"bits": 4, "group_size": 64, "scheme": "nf4"},
}


def lora_flops(m: int, n: int, k: int, r: int, depth: int = 1) -> int:
    """The module docstring's FLOPs; ``r = 0`` for the frozen base."""
    return depth * (4 * m * n * k + 6 * m * r * (k + n))


def lora_bytes(m: int, n: int, k: int, r: int, e: int, weight_bytes: int, depth: int = 1) -> int:
    """The module docstring's bytes; ``weight_bytes`` is all ``depth`` base weights
    together, ``r = 0`` for the frozen base."""
    per_layer = 2 * m * (k + n) * e
    if r:
        per_layer += 3 * r * (k + n) * e + (m * k + 2 * m * r) * e
    return 2 * weight_bytes + depth * per_layer


class Block(nn.Module):
    """One linear called ``proj`` (what ``target_modules`` selects), SiLU after it unless
    it is the last block."""

    def __init__(self, proj: nn.Module, act: bool) -> None:
        super().__init__()
        self.proj, self.act = proj, act

    def forward(self, x: Tensor) -> Tensor:
        y = self.proj(x)
        return F.silu(y) if self.act else y


class Net(nn.Module):
    def __init__(self, projs: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(p, i < len(projs) - 1) for i, p in enumerate(projs))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def base_net(weights: list[Tensor], dtype: torch.dtype) -> Net:
    """Bias-free ``nn.Linear`` layers holding ``weights`` (each (N, K)) in ``dtype``, frozen."""
    projs = []
    for w in weights:
        n, k = w.shape
        lin = nn.Linear(k, n, bias=False, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        projs.append(lin)
    return Net(projs).requires_grad_(False)


class PlainQuantLinear(nn.Module):
    """A quantized linear layer in plain PyTorch: the weight dequantized by its format's
    formula (:func:`bench.bench_quant.plain_dequantize`) on every call, then ``F.linear``."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.qw = layer.quantized_weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, plain_dequantize(self.qw, x.dtype))


class PlainLoRA(nn.Module):
    """``base(x) + B(A(x)) * scale`` in plain PyTorch (PEFT's computation without its
    bookkeeping), the base frozen; A and B as :class:`fastlm.nn.LoRALinear` holds them."""

    def __init__(self, base: nn.Module, a: nn.Linear, b: nn.Linear, scale: float) -> None:
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.b(self.a(x)) * self.scale


def plain_twin(net: Net) -> Net:
    """``net`` (its projections :class:`fastlm.nn.LoRALinear`) with each projection replaced
    by a :class:`PlainLoRA` sharing its base weights and adapters (a quantized base becomes
    a :class:`PlainQuantLinear`)."""
    projs = []
    for block in net.layers:
        lora = block.proj
        base = lora.base_layer
        if isinstance(base, QuantLinear):
            base = PlainQuantLinear(base)
        name = lora.active_adapter
        projs.append(PlainLoRA(base, lora.lora_A[name], lora.lora_B[name], lora.scaling[name]))
    return Net(projs)


@dataclasses.dataclass
class Provider:
    model: nn.Module
    weight_bytes: int  # the base weights as stored, all layers
    r: int  # 0: no adapter (the frozen base)
    third_party: bool = False  # run once before timing; skipped with a note when it fails


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _adapters_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast every LoRA A and B to ``dtype`` (left alone: the base, quantized or not)."""
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B"):
            module.lora_A.to(dtype)
            module.lora_B.to(dtype)
    return model


def _quantized(net: Net, **kwargs) -> Net:
    for block in net.layers:
        block.proj = QuantLinear.from_linear(block.proj, **kwargs).requires_grad_(False)
    return net


def _bnb_net(net: Net, dtype: torch.dtype) -> Net:
    import bitsandbytes as bnb

    for block in net.layers:
        w = block.proj.weight
        n, k = w.shape
        lin = bnb.nn.Linear4bit(
            k, n, bias=False, compute_dtype=dtype, compress_statistics=False, quant_type="nf4"
        )
        lin.weight = bnb.nn.Params4bit(
            w.detach().to("cpu"),
            requires_grad=False,
            blocksize=64,
            compress_statistics=False,
            quant_type="nf4",
        )
        block.proj = lin.to(w.device)  # bitsandbytes quantizes on the move to the device
    return net


def _bnb_bytes(net: nn.Module) -> int:
    import bitsandbytes as bnb

    total = 0
    for module in net.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            total += _nbytes(module.weight) + _nbytes(state.absmax)
            if getattr(state, "nested", False):
                total += _nbytes(state.state2.absmax)
    return total


def _peft(net: Net, r: int, alpha: float) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"])
    return peft.get_peft_model(net, config)


def providers(
    weights: list[Tensor], r: int, dtype: torch.dtype, notes: dict[str, str] | None = None
) -> dict[str, Provider]:
    """Every available model of the net over ``weights`` (fp32 (N, K) each; one per layer)
    with rank-``r`` adapters (alpha ``2*r``) on every layer, adapters in ``dtype``.
    A third-party provider that fails to build is left out; ``notes[name]`` says why."""
    alpha = 2 * r
    float_bytes = sum(w.numel() for w in weights) * dtype.itemsize
    on_cpu = weights[0].device.type == "cpu"
    fastlm = "fastlm-torch" if on_cpu else "fastlm"  # a CPU runs fastlm's torch backend
    lora = apply_lora(base_net(weights, dtype), r, alpha, ["proj"])
    found = {
        "frozen base": Provider(base_net(weights, dtype), float_bytes, 0),
        f"{fastlm} LoRA": Provider(lora, float_bytes, r),
    }
    if on_cpu:
        found["torch LoRA"] = Provider(plain_twin(lora), float_bytes, r)
    for name, kwargs in QUANT.items():
        net = _quantized(base_net(weights, dtype), **kwargs)
        stored = sum(_nbytes(b) for b in net.buffers())
        qlora = _adapters_to(apply_lora(net, r, alpha, ["proj"]), dtype)
        found[f"{fastlm} {name}"] = Provider(qlora, stored, r)
        if on_cpu:
            found[f"torch {name}"] = Provider(plain_twin(qlora), stored, r)
    builders: dict[str, Callable[[], Provider]] = {}
    if _has("peft"):
        builders["PEFT LoRA"] = lambda: Provider(
            _adapters_to(_peft(base_net(weights, dtype), r, alpha), dtype), float_bytes, r, True
        )
        if _has("bitsandbytes"):

            def bnb_peft() -> Provider:
                net = _bnb_net(base_net(weights, dtype), dtype)
                stored = _bnb_bytes(net)
                return Provider(_adapters_to(_peft(net, r, alpha), dtype), stored, r, True)

            builders["PEFT LoRA + bnb 4bit"] = bnb_peft
    for name, build in builders.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[name] = build()
        except Exception as exc:  # an optional provider must not stop the bench
            if notes is not None:
                notes[name] = f"{type(exc).__name__}: {exc}"
    return found


def train_step(model: nn.Module, x: Tensor, dy: Tensor) -> Callable[[], Tensor]:
    """Forward, backward with ``dy``, gradients dropped; returns y (detached)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        y = model(x)
        y.backward(dy)
        x.grad = None
        for p in params:
            p.grad = None
        return y.detach()

    return step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    hidden, ranks, tokens = SIZES[(device.type, quick)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    gen = torch.Generator(device).manual_seed(0)
    noted: set[str] = set()

    def note(name: str, why: str) -> None:
        if name not in noted:  # once per provider, not per shape
            noted.add(name)
            print(f"skipping {name}: {why[:300]}")

    weights = [
        torch.randn(hidden, hidden, device=device, generator=gen) / hidden**0.5
        for _ in range(DEPTH)
    ]
    for structure, depth in (("layer", 1), (f"stack{DEPTH}", DEPTH)):
        for r in ranks:
            op = f"lora fwd+bwd {structure} h={hidden} r={r}"
            notes: dict[str, str] = {}
            found = providers(weights[:depth], r, dtype, notes)
            for name, why in notes.items():
                note(name, why)
            for m in tokens:
                x = torch.randn(m, hidden, device=device, dtype=dtype, generator=gen)
                x.requires_grad_(True)
                dy = torch.randn(m, hidden, device=device, dtype=dtype, generator=gen)
                for name, p in found.items():
                    if name in noted:
                        continue
                    fn = train_step(p.model, x, dy)
                    if p.third_party and not third_party_runs(fn, name, note):
                        continue
                    yield Case(
                        op,
                        name,
                        (hidden, r, m),
                        dtype,
                        fn,
                        lora_bytes(m, hidden, hidden, p.r, e, p.weight_bytes, depth),
                        lora_flops(m, hidden, hidden, p.r, depth),
                    )
                del x, dy
            del found
            if device.type == "cuda":
                torch.cuda.empty_cache()
