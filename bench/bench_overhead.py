"""What a call of each fastlm op costs over the PyTorch op it replaces, on tiny tensors.

Every op is called on the smallest shapes a model uses (a few rows of 64 features, a
4-query attention), where the arithmetic takes a few microseconds and the Python around it
shows. Rows per op (``op`` names the mode: ``eager`` or ``compiled``):

* ``torch``: the plain PyTorch expression the op replaces (the native op, or what a user
  writes: ``F.rms_norm``, ``F.scaled_dot_product_attention`` with its transposes, the
  rotate-half formula, ``F.linear`` then ``F.cross_entropy``).
* ``fastlm-torch``: the fastlm op on its torch backend, contract checks included. Its time
  minus the ``torch`` row is fastlm's per-call overhead (the ratio table shows the two).
* ``fastlm-triton launch stubbed`` (eager, CPU): the op forced onto its Triton backend with
  every kernel launch replaced by a no-op, so the row is everything fastlm does on the GPU
  path on the host (contract, backend choice, the custom op's eager entrance, allocating
  outputs, grid arithmetic) but the kernel and Triton's own launcher. On a GPU the row is
  ``fastlm-triton``: the real kernels, bfloat16.
* compiled rows: the same two callables under ``torch.compile`` (Inductor), the overhead a
  compiled model pays per op (guards and the graph's call), in ``--full`` only: Inductor
  builds C++ per graph on a CPU, seconds each.

``bytes_moved`` is what the op reads and writes, so GB/s stays meaningful, but the number
to read here is the time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from fastlm.kernels import launch

from bench.harness import Case
from fastlm import backend, nn, ops
from fastlm.quant import dequantize_weight, quantize_weight

Op = Callable[[], object]
# Ops run in quick mode (and by the test); --full runs every op, eager and compiled.
STUBBED = "fastlm-triton launch stubbed"
QUICK = ("rms_norm", "layer_norm", "apply_rotary", "scaled_dot_product_attention")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _norm_of_sum(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor):
    """The pre-norm step as PyTorch writes it: the sum feeds the norm and the next residual."""
    s = x + r
    return F.rms_norm(s, (64,), w, 1e-6), s


def _case_inputs(
    device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, tuple[int, ...], Op, Op, int]]:
    """(name, shape, fastlm call, plain PyTorch call, bytes moved) per op, tiny shapes."""
    f32 = dict(device=device, dtype=dtype)
    x, r = torch.randn(4, 64, **f32), torch.randn(4, 64, **f32)
    w, b = torch.randn(64, **f32), torch.randn(64, **f32)
    io = _nbytes(x, x)
    yield (
        "rms_norm",
        (4, 64),
        lambda: ops.rms_norm(x, 64, w, 1e-6),
        lambda: F.rms_norm(x, (64,), w, 1e-6),
        io,
    )
    yield (
        "layer_norm",
        (4, 64),
        lambda: ops.layer_norm(x, 64, w, b),
        lambda: F.layer_norm(x, (64,), w, b),
        io,
    )
    yield (
        "rms_norm+residual",
        (4, 64),
        lambda: ops.rms_norm(x, 64, w, 1e-6, residual=r),
        lambda: _norm_of_sum(x, r, w),
        2 * io,
    )
    rms_fastlm = nn.RMSNorm(64, eps=1e-6).to(device=device, dtype=dtype)
    rms_torch = torch.nn.RMSNorm(64, eps=1e-6).to(device=device, dtype=dtype)
    yield "nn.RMSNorm", (4, 64), lambda: rms_fastlm(x), lambda: rms_torch(x), io

    # Rotary on q and k (B, S, H, D) = (1, 4, 2, 64), Llama's half-split layout.
    q, k = torch.randn(1, 4, 2, 64, **f32), torch.randn(1, 4, 2, 64, **f32)
    cos, sin = torch.randn(4, 32, **f32), torch.randn(4, 32, **f32)
    cos2 = torch.cat((cos, cos), -1)[None, :, None, :]
    sin2 = torch.cat((sin, sin), -1)[None, :, None, :]
    yield (
        "apply_rotary",
        (1, 4, 2, 64),
        lambda: ops.apply_rotary(q, k, cos, sin),
        lambda: (q * cos2 + _rotate_half(q) * sin2, k * cos2 + _rotate_half(k) * sin2),
        2 * _nbytes(q, k),
    )

    # Attention: q, k, v (B, S, H, D) = (1, 4, 2, 16); PyTorch takes (B, H, S, D).
    qa, ka, va = (torch.randn(1, 4, 2, 16, **f32) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (qa, ka, va))
    yield (
        "flash_attention",
        (1, 4, 2, 16),
        lambda: ops.flash_attention(qa, ka, va, causal=True),
        lambda: F.scaled_dot_product_attention(
            qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), is_causal=True
        ).transpose(1, 2),
        _nbytes(qa, ka, va, qa),
    )
    yield (
        "scaled_dot_product_attention",
        (1, 2, 4, 16),
        lambda: ops.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        _nbytes(qa, ka, va, qa),
    )
    # One decode step against a (2, 16, 2, 16) cache holding 8 positions: the cache write and
    # the attention over the valid prefix, as a PyTorch decode loop does it.
    k_cache, v_cache = torch.randn(2, 16, 2, 16, **f32), torch.randn(2, 16, 2, 16, **f32)
    q1, k1, v1 = (torch.randn(2, 1, 2, 16, **f32) for _ in range(3))
    seqlens = torch.full((2,), 8, dtype=torch.int32, device=device)

    def plain_decode():
        k_cache[:, 8:9] = k1
        v_cache[:, 8:9] = v1
        return F.scaled_dot_product_attention(
            q1.transpose(1, 2), k_cache[:, :9].transpose(1, 2), v_cache[:, :9].transpose(1, 2)
        ).transpose(1, 2)

    yield (
        "attention_with_kvcache",
        (2, 16, 2, 16),
        lambda: ops.attention_with_kvcache(q1, k_cache, v_cache, seqlens, k1, v1),
        plain_decode,
        _nbytes(q1, k1, v1, q1) + 2 * _nbytes(k_cache[:, :9]),
    )

    # Losses: 4 rows of a 64-class vocabulary; the linear one from 32 hidden features.
    logits, target = torch.randn(4, 64, **f32), torch.randint(0, 64, (4,), device=device)
    hidden, vocab = torch.randn(4, 32, **f32), torch.randn(64, 32, **f32)
    yield (
        "cross_entropy",
        (4, 64),
        lambda: ops.cross_entropy(logits, target),
        lambda: F.cross_entropy(logits, target),
        _nbytes(logits),
    )
    yield (
        "linear_cross_entropy",
        (4, 32, 64),
        lambda: ops.linear_cross_entropy(hidden, vocab, target),
        lambda: F.cross_entropy(F.linear(hidden, vocab), target),
        _nbytes(hidden, vocab),
    )

    # Dense layers: (4, 64) rows through 64 -> 128 (-> 64).
    w1, b1 = torch.randn(128, 64, **f32), torch.randn(128, **f32)
    w_up, w2 = torch.randn(128, 64, **f32), torch.randn(64, 128, **f32)
    h = torch.randn(4, 128, **f32)
    yield (
        "bias_act",
        (4, 128),
        lambda: ops.bias_act(h, b1, "gelu"),
        lambda: F.gelu(h + b1),
        _nbytes(h, h),
    )
    yield (
        "linear_act",
        (4, 64, 128),
        lambda: ops.linear_act(x, w1, b1, "gelu"),
        lambda: F.gelu(F.linear(x, w1, b1)),
        _nbytes(x, w1, h),
    )
    yield (
        "gated_mlp",
        (4, 64, 128),
        lambda: ops.gated_mlp(x, w1, w_up, w2, "silu"),
        lambda: F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w_up), w2),
        _nbytes(x, w1, w_up, w2, x),
    )
    lora_a, lora_b = torch.randn(8, 64, **f32), torch.randn(128, 8, **f32)
    yield (
        "lora_linear",
        (4, 64, 128),
        lambda: ops.lora_linear(x, w1, b1, lora_a, lora_b, 2.0),
        lambda: F.linear(x, w1, b1) + F.linear(F.linear(x, lora_a), lora_b) * 2.0,
        _nbytes(x, w1, lora_a, lora_b, h),
    )
    qw = quantize_weight(w1, bits=8)
    yield (
        "quant_matmul int8",
        (4, 64, 128),
        lambda: ops.quant_matmul(x, qw),
        lambda: F.linear(x, dequantize_weight(qw, dtype)),
        _nbytes(x, h) + qw.qweight.numel(),
    )


@contextlib.contextmanager
def stubbed_launches() -> Iterator[None]:
    """Every Triton launch on a CPU tensor becomes a no-op (fastlm sends those to the
    interpreter through ``launch.on_device``): what is left of a call is the host work."""
    interpreted = launch._InterpretedKernel
    original = interpreted.__getitem__

    def no_launch(self, grid):
        return lambda *args, **kwargs: None

    interpreted.__getitem__ = no_launch
    try:
        yield
    finally:
        interpreted.__getitem__ = original


def _on(name: str | None, fn: Op, stub: bool = False) -> Op:
    def call():
        with backend.use_backend(name), stubbed_launches() if stub else contextlib.nullcontext():
            return fn()

    return call


def cases(quick: bool, device: torch.device, only: tuple[str, ...] | None = None) -> Iterator[Case]:
    """Per op: torch and fastlm-torch (float32), eager, and compiled in ``--full``; the
    Triton path in bfloat16 (what its kernels take): stubbed on a CPU, the real kernels on a
    GPU (``fastlm-triton``). ``only`` picks ops by name (default: :data:`QUICK` in quick
    mode, else all)."""
    wanted = only if only is not None else (QUICK if quick else None)
    on_cpu = device.type == "cpu"
    half = _case_inputs(device, torch.bfloat16) if backend.triton_error() is None else None
    for name, shape, fastlm_fn, torch_fn, moved in _case_inputs(device, torch.float32):
        half_fn = next(half)[2] if half is not None else None
        if wanted is not None and name not in wanted:
            continue
        # CPU calls get the torch backend unforced, so both rows are bare calls; elsewhere
        # both run inside the same use_backend block, so neither pays for it alone.
        rows = [
            ("torch", torch_fn if on_cpu else _on("torch", torch_fn)),
            ("fastlm-torch", fastlm_fn if on_cpu else _on("torch", fastlm_fn)),
        ]
        for provider, fn in rows:
            yield Case(f"{name} eager", provider, shape, torch.float32, fn, moved)
        if half_fn is not None:
            provider = STUBBED if on_cpu else "fastlm-triton"
            triton_fn = _on("triton", half_fn, stub=on_cpu)
            yield Case(f"{name} eager", provider, shape, torch.bfloat16, triton_fn, moved // 2)
        if not quick:
            torch.compiler.reset()
            for provider, fn in rows:
                compiled = torch.compile(fn, dynamic=False)
                yield Case(f"{name} compiled", provider, shape, torch.float32, compiled, moved)
