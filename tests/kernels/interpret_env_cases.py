"""Every Triton kernel family, forward and backward, through the public ops on CPU tensors.

Run as ``python interpret_env_cases.py SEED OUT``: saves to OUT (torch.save) a dict with
``interpreted`` (whether ``@triton.jit`` built interpreted functions), ``not_run`` (shipped
kernels no case launched) and ``tensors`` ({name: tensor}). test_triton_interpret_env.py runs
it once with TRITON_INTERPRET=1 and once without, and compares the two files bit for bit.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import fastlm.kernels
import torch
import triton
import triton.language as tl
from fastlm.kernels import attention, launch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from fastlm import ops
from fastlm.ops.lora import lora_linear
from fastlm.quant import quantize_weight

BF16, FP16 = torch.bfloat16, torch.float16


def _run(out: dict, case: str, op, *args, **kwargs) -> None:
    """Save ``op(*args, **kwargs)`` (a tensor or a tuple) and the gradients of its floating-
    point positional arguments for a random upstream gradient (keyword arguments are passed
    as they are, without gradients)."""
    name = f"{op.__name__} {case}"
    args = [a.detach().clone().requires_grad_() if _floating(a) else a for a in args]
    result = op(*args, **kwargs)
    results = result if isinstance(result, tuple) else (result,)
    for i, r in enumerate(results):
        out[f"{name}/out{i}"] = r.detach()
    leaves = [a for a in args if _floating(a)]
    differentiable = [r for r in results if r.requires_grad]
    if leaves and differentiable:
        upstream = [torch.randn_like(r) for r in differentiable]
        grads = torch.autograd.grad(differentiable, leaves, upstream)
        for i, g in enumerate(grads):
            out[f"{name}/grad{i}"] = g


def _floating(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _attention(out: dict) -> None:
    flash = ops.flash_attention
    for dt in (BF16, FP16):
        q = torch.randn(2, 5, 4, 16, dtype=dt)
        k, v = torch.randn(2, 7, 2, 16, dtype=dt), torch.randn(2, 7, 2, 16, dtype=dt)
        bias = torch.randn(1, 4, 5, 7, dtype=dt)
        _run(out, f"causal gqa {dt}", flash, q, k, v, causal=True, return_lse=True)
        _run(out, f"bias dropout {dt}", flash, q, k, v, False, None, 0.3, (-1, -1), bias, seed=7)
    q, k, v = (torch.randn(2, 6, 2, 24, dtype=BF16) for _ in range(3))
    _run(out, "alibi window bf16", flash, q, k, v, window=(3, 1), alibi_slopes=torch.rand(2))
    # The soft cap, and the dropout pattern's own kernel (return_attn_probs).
    probs = dict(dropout_p=0.25, seed=11, softcap=2.0, return_attn_probs=True)
    _run(out, "softcap probs bf16", flash, q, k, v, causal=True, **probs)
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 11], dtype=torch.int32)
    q, k, v = torch.randn(8, 2, 16, dtype=BF16), *torch.randn(2, 11, 2, 16, dtype=BF16)
    _run(out, "causal bf16", ops.flash_attention_varlen, q, k, v, cu_q, cu_k, 5, 7, causal=True)
    q, k, v = (torch.randn(1, 2, 5, 16, dtype=FP16) for _ in range(3))
    mask = torch.rand(5, 5) > 0.3
    _run(out, "bool mask fp16", ops.scaled_dot_product_attention, q, k, v, attn_mask=mask)


def _attention_decode(out: dict) -> None:
    for dt in (BF16, FP16):
        q = torch.randn(2, 2, 4, 16, dtype=dt)
        k_cache, v_cache = (torch.randn(2, 19, 2, 16, dtype=dt) for _ in range(2))
        k_new, v_new = (torch.randn(2, 2, 2, 16, dtype=dt) for _ in range(2))
        lens = torch.tensor([5, 13], dtype=torch.int32)
        # Two splits: the split kernel and the combine kernel both run.
        o, lse = ops.attention_with_kvcache(
            q, k_cache, v_cache, lens, k_new, v_new, causal=True, num_splits=2, return_lse=True
        )
        for name, t in dict(out=o, lse=lse, k_cache=k_cache, v_cache=v_cache).items():
            out[f"attention_with_kvcache {dt}/{name}"] = t


def _norm(out: dict) -> None:
    x, res = torch.randn(3, 5, 37, dtype=BF16), torch.randn(3, 5, 37, dtype=BF16)
    w, b = torch.randn(37, dtype=BF16), torch.randn(37, dtype=BF16)
    _run(out, "residual bf16", ops.layer_norm, x, 37, w, b, 1e-5, res)
    x, w = torch.randn(7, 45, dtype=FP16), torch.randn(45, dtype=FP16)
    _run(out, "fp16", ops.rms_norm, x, 45, w)


def _rotary(out: dict) -> None:
    pos = torch.arange(16, dtype=torch.float32)[:, None]
    inv_freq = 1e4 ** -(torch.arange(6, dtype=torch.float32) / 6)
    tables = dict(cos=torch.cos(pos * inv_freq), sin=torch.sin(pos * inv_freq), offset=3)
    for dt, interleaved in ((BF16, False), (FP16, True)):
        q, k = torch.randn(2, 5, 3, 14, dtype=dt), torch.randn(2, 5, 1, 14, dtype=dt)
        case = f"partial interleaved={interleaved} {dt}"
        _run(out, case, ops.apply_rotary, q, k, interleaved=interleaved, **tables)


def _activation(out: dict) -> None:
    for dt, act, p in ((BF16, "gelu", 0.2), (FP16, "silu", 0.0)):
        x, b = torch.randn(3, 7, 33, dtype=dt), torch.randn(33, dtype=dt)
        _run(out, f"{act} p={p} {dt}", ops.bias_act, x, b, act, p, seed=11)


def _mlp(out: dict) -> None:
    for dt in (BF16, FP16):
        x = torch.randn(2, 9, 40, dtype=dt)
        w1, b1 = torch.randn(36, 40, dtype=dt) / 6, torch.randn(36, dtype=dt)
        w2, b2 = torch.randn(40, 36, dtype=dt) / 6, torch.randn(40, dtype=dt)
        wu = torch.randn(36, 40, dtype=dt) / 6
        _run(out, f"gelu_tanh {dt}", ops.linear_act, x, w1, b1, "gelu_tanh")
        _run(out, f"gelu dropout {dt}", ops.fused_mlp, x, w1, b1, w2, b2, "gelu", 0.1, seed=5)
        _run(out, f"silu {dt}", ops.gated_mlp, x, w1, wu, w2, "silu")


def _cross_entropy(out: dict) -> None:
    logits = torch.randn(9, 67, dtype=BF16) * 3
    target = torch.randint(0, 67, (9,))
    target[2] = -100
    options = dict(label_smoothing=0.1, z_loss=1e-3, reduction="none")
    _run(out, "smoothing z_loss bf16", ops.cross_entropy, logits, target, **options)
    hidden, weight = torch.randn(11, 24, dtype=FP16), torch.randn(53, 24, dtype=FP16) / 5
    target = torch.randint(0, 53, (11,))
    _run(out, "fp16", ops.linear_cross_entropy, hidden, weight, target, chunk_size=4)


def _quant(out: dict) -> None:
    formats = {
        "int8": dict(bits=8),
        "int4-g32": dict(bits=4, group_size=32),
        "nf4-g32-dq": dict(bits=4, group_size=32, scheme="nf4", double_quant=True),
    }
    for (fmt, spec), dt in zip(formats.items(), (BF16, FP16, BF16), strict=True):
        qw = quantize_weight(torch.randn(19, 64) / 8, **spec)
        bias = torch.randn(19, dtype=dt)
        for m in (3, 17):  # the split-K path (M <= 16) and the tiled one
            _run(out, f"{fmt} m={m} {dt}", ops.quant_matmul, torch.randn(m, 64, dtype=dt), qw, bias)
    qw = quantize_weight(torch.randn(21, 48) / 7, bits=8)
    for dt in (BF16, FP16):
        x, bias = torch.randn(5, 48, dtype=dt), torch.randn(21, dtype=dt)
        _run(out, f"{dt}", ops.w8a8_matmul, x, qw, bias)


def _lora(out: dict) -> None:
    x = torch.randn(2, 9, 32, dtype=BF16)
    w, a, b = (torch.randn(*s, dtype=BF16) / 5 for s in ((27, 32), (4, 32), (27, 4)))
    # The frozen weight goes by keyword: it takes no gradient.
    dense = dict(weight=w, scale=2.0, dropout_p=0.1, seed=3)
    _run(out, "dense dropout bf16", _lora_linear, x, a, b, **dense)
    qw = quantize_weight(torch.randn(27, 64) / 8, bits=4, group_size=32, scheme="nf4")
    x, a = torch.randn(20, 64, dtype=FP16), torch.randn(4, 64, dtype=FP16)
    _run(out, "nf4 fp16", _lora_linear, x, a, b.half(), weight=qw, scale=0.5)


def _lora_linear(x, lora_a, lora_b, weight, scale, **kwargs):
    return lora_linear(x, weight, None, lora_a, lora_b, scale, **kwargs)


@triton.jit
def _bf16_dot_kernel(X, W, Y, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(X + i[:, None] * BLOCK + i[None, :])
    w = tl.load(W + i[:, None] * BLOCK + i[None, :])
    tl.store(Y + i[:, None] * BLOCK + i[None, :], tl.dot(x, w).to(tl.bfloat16))


def _autotuned(out: dict, interpreted: bool) -> None:
    """A kernel under ``triton.autotune`` (the GPU launchers' form) gets the interpreter
    fixes too. Without the variable, an autotuner only ever launches compiled kernels (CUDA
    tensors), so that run launches the bare kernel with the same block size."""
    x, w = torch.randn(16, 16, dtype=BF16), torch.randn(16, 16, dtype=BF16)
    y = torch.empty(16, 16, dtype=BF16)
    if interpreted:
        config = triton.Config({"BLOCK": 16}, num_warps=1)
        kernel = triton.autotune([config], key=[])(_bf16_dot_kernel)
        launch.on_device(kernel, x.device)[(1,)](x, w, y)
    else:
        launch.on_device(_bf16_dot_kernel, x.device)[(1,)](x, w, y, BLOCK=16, num_warps=1)
    out["autotuned bf16 dot/out0"] = y


CASES = (
    _attention,
    _attention_decode,
    _norm,
    _rotary,
    _activation,
    _mlp,
    _cross_entropy,
    _quant,
    _lora,
)


def _kernels_not_run() -> list[str]:
    """The kernels fastlm ships (``*_kernel`` in fastlm.kernels) that no case launched."""
    missing = []
    for info in pkgutil.iter_modules(fastlm.kernels.__path__):
        module = importlib.import_module(f"fastlm.kernels.{info.name}")
        for name, value in vars(module).items():
            jitted = isinstance(value, (JITFunction, InterpretedFunction))
            if jitted and name.endswith("_kernel") and id(value) not in launch._interpreted:
                missing.append(f"{info.name}.{name}")
    return missing


def main(seed: int, path: str) -> None:
    interpreted = isinstance(attention._attn_fwd_kernel, InterpretedFunction)
    if interpreted != (os.environ.get("TRITON_INTERPRET") == "1"):
        raise SystemExit(
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} but the "
            f"kernels are {type(attention._attn_fwd_kernel).__name__}"
        )
    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    with fastlm.use_backend("triton"):
        for case in CASES:
            case(out)
        _autotuned(out, interpreted)
    result = dict(interpreted=interpreted, not_run=_kernels_not_run(), tensors=out)
    torch.save(result, path)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
