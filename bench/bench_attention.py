"""Attention: forward and forward+backward over whole sequences, and decoding from a KV cache.

FLOPs (the TFLOP/s numerator, flash-attn's convention), for q (B, Sq, H, D) against Sk keys:

* forward: ``4*B*H*Sq*Sk*D`` (QK^T and PV, two FLOPs per multiply-add), halved when causal
  (Sq == Sk here: half the scores are masked and skipped);
* backward: 2.5x the forward (five matmuls: QK^T recomputed, dV, dP, dQ, dK);
* forward+backward: 3.5x the forward.

Bytes moved (the roofline numerator), for e bytes per element and Hkv K/V heads:

* forward: read q, k, v once and write o once: ``e*(2*B*Sq*H*D + 2*B*Sk*Hkv*D)``;
* backward: read q, k, v, o, dO and write dq, dk, dv once:
  ``e*(4*B*Sq*H*D + 4*B*Sk*Hkv*D)``; the fp32 log-sum-exp (4 bytes per row, 1/(D*e/4) of
  o) is left out. Forward+backward: the sum of the two.
* decode, Sq new queries against L valid cached tokens per sequence: reading the whole
  valid K/V cache dominates, ``2*B*L*Hkv*D*e``, plus q read and o written,
  ``2*B*Sq*H*D*e``. FLOPs ``4*B*H*Sq*L*D`` (a query sees every cached key). With Sq = 1
  the op is memory-bound: its "% roof" column (of the measured copy bandwidth) is the figure
  of merit. Whole-sequence attention is compute-bound: read its TFLOP/s column against the
  GPU's dense fp16/bf16 peak.

Soft-capped rows (``<provider> softcap=30``, flash-attn's ``softcap``, Gemma 2's attention
cap is 50) use the same FLOPs and bytes: the cap's tanh and its derivative are elementwise work
the numerator leaves out, so their rate against the uncapped row of the same provider is the
cap's cost. On GPUs always; on the CPU in full mode only (quick mode keeps its two rows).

Shapes: ``(B, H, D, S)`` for whole sequences (the swept seqlen last, so the plot's x axis is
the sequence length), ``(B, H, Hkv, D, L)`` for decode.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.harness import Case
from fastlm import backend, ops


@dataclasses.dataclass(frozen=True)
class Sweep:
    seqlens: tuple[int, ...]
    head_dims: tuple[int, ...]
    tokens: int  # batch * seqlen, held fixed across the sweep
    hidden: int  # heads * head_dim


# Whole-sequence sweeps per (device, quick). CPU sizes keep quick mode well under a minute on
# two cores: the torch backend and SDPA's math kernel both materialize the (S, S) scores.
SWEEPS = {
    ("cuda", True): Sweep((1024, 4096), (128,), 16384, 2048),
    ("cuda", False): Sweep((512, 1024, 2048, 4096, 8192, 16384), (64, 128), 16384, 2048),
    ("cpu", True): Sweep((128, 256), (64,), 512, 256),
    ("cpu", False): Sweep((128, 256, 512, 1024), (64,), 1024, 256),
}
# Decode on GPUs only: (batches, cache lengths); 32 query heads over 8 K/V heads (GQA), d=128.
DECODE = {
    True: ((1, 8), (8192, 32768)),
    False: ((1, 8), (4096, 8192, 16384, 32768, 65536)),
}
DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM = 32, 8, 128
# SDPA's math kernel materializes the (B, H, Sq, Sk) scores and their softmax (several copies
# in forward+backward); past this many scores it takes tens of GB and seconds per call.
MATH_MAX_SCORES = 2**30
# Compiling FlexAttention costs tens of seconds per shape (forward and backward graphs), more
# than device_check.sh's whole quick-bench step allows: full mode only.
FLEX_IN_QUICK = False

SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool, mode: str) -> int:
    """FLOPs by the module docstring's formula; ``mode`` is "fwd", "bwd" or "fwd+bwd"."""
    forward = 4 * b * h * sq * sk * d // (2 if causal else 1)
    return {"fwd": forward, "bwd": forward * 5 // 2, "fwd+bwd": forward * 7 // 2}[mode]


def attention_bytes(b: int, h: int, h_kv: int, sq: int, sk: int, d: int, e: int, mode: str) -> int:
    """Bytes moved by the module docstring's formula; ``mode`` is "fwd", "bwd" or "fwd+bwd"."""
    q, kv = b * sq * h * d * e, b * sk * h_kv * d * e
    forward, backward = 2 * q + 2 * kv, 4 * q + 4 * kv
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def decode_bytes(b: int, h: int, h_kv: int, sq: int, length: int, d: int, e: int) -> int:
    """The whole valid K/V cache read once, q read and o written once."""
    return 2 * b * length * h_kv * d * e + 2 * b * sq * h * d * e


AttnFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # q, k, v (B, S, H, D) -> o (B, S, H, D)


@dataclasses.dataclass
class Provider:
    fn: AttnFn
    backend: str | None = None  # fastlm backend forced around forward and backward
    # Raising for a shape means "not supported here" (SDPA's kernels each take only some
    # shapes and dtypes): probed once per case, and skipped with no row rather than failed.
    probe: bool = False


# flash-attn's softcap for the capped rows: tanh bends scores of this size (Gemma 2: 50).
SOFTCAP = 30.0


def _fastlm(causal: bool, softcap: float = 0.0) -> AttnFn:
    return lambda q, k, v: ops.flash_attention(q, k, v, causal=causal, softcap=softcap)


def _sdpa(sdp_backend: SDPBackend, causal: bool) -> AttnFn:
    def fn(q, k, v):
        # The transposes are views: the (B, H, S, D) layout a model gets from its projections.
        with sdpa_kernel([sdp_backend]):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            )
        return out.transpose(1, 2)

    return fn


def _plain_sdpa(causal: bool) -> AttnFn:
    """Plain PyTorch, the baseline of ``fastlm-torch``: SDPA with its own kernel choice on the
    (B, H, S, D) views a model passes it."""

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return out.transpose(1, 2)

    return fn


def _plain_softcap(causal: bool, softcap: float) -> AttnFn:
    """Plain PyTorch soft-capped attention, the eager expression of Gemma 2 models: the
    scaled scores capped, the causal mask added, softmax in fp32, then the values."""

    def fn(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = torch.tanh(scores / softcap) * softcap
        if causal:
            seqlen = q.shape[-2]
            hidden = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ v).transpose(1, 2)

    return fn


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(causal: bool, seqlen: int, device: torch.device) -> AttnFn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Dynamo caches graphs per code object; without a reset the earlier shapes' graphs use up
    # the recompile limit and flex_attention falls back to its (materializing) eager path.
    torch.compiler.reset()
    compiled = torch.compile(flex_attention, dynamic=False)
    mask = create_block_mask(_causal, None, None, seqlen, seqlen, device=device) if causal else None

    def fn(q, k, v):
        out = compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)

    return fn


def _flash_attn(causal: bool, softcap: float = 0.0) -> AttnFn:
    from flash_attn import flash_attn_func

    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal, softcap=softcap)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def providers(
    causal: bool, shape: tuple[int, ...], device: torch.device, quick: bool
) -> dict[str, Provider]:
    """Every implementation available here for q (B, S, H, D), by name."""
    batch, seqlen, heads, _ = shape
    if device.type != "cuda":
        # The interpreter is far too slow to time; Triton runs only on GPUs here.
        found = {
            "fastlm-torch": Provider(_fastlm(causal), "torch"),
            "torch": Provider(_plain_sdpa(causal)),
            "sdpa-math": Provider(_sdpa(SDPBackend.MATH, causal), probe=True),
        }
        if not quick:
            found[f"fastlm-torch softcap={SOFTCAP:g}"] = Provider(_fastlm(causal, SOFTCAP), "torch")
            found[f"torch softcap={SOFTCAP:g}"] = Provider(_plain_softcap(causal, SOFTCAP))
        return found
    found = {
        "fastlm-triton": Provider(_fastlm(causal), "triton"),
        f"fastlm-triton softcap={SOFTCAP:g}": Provider(_fastlm(causal, SOFTCAP), "triton"),
    }
    for name, member in SDPA_BACKENDS.items():
        if not hasattr(SDPBackend, member):  # older torch: no cuDNN attention
            continue
        if member == "MATH" and batch * heads * seqlen * seqlen > MATH_MAX_SCORES:
            continue
        found[name] = Provider(_sdpa(getattr(SDPBackend, member), causal), probe=True)
    if (FLEX_IN_QUICK or not quick) and _has("torch.nn.attention.flex_attention"):
        found["flex"] = Provider(_flex(causal, seqlen, device))
    if _has("flash_attn"):
        found["flash-attn"] = Provider(_flash_attn(causal))
        found[f"flash-attn softcap={SOFTCAP:g}"] = Provider(_flash_attn(causal, SOFTCAP))
    return found


def _forward(p: Provider, q: Tensor, k: Tensor, v: Tensor) -> Callable[[], object]:
    def step():
        with torch.no_grad(), backend.use_backend(p.backend):
            return p.fn(q, k, v)

    return step


def _forward_backward(
    p: Provider, q: Tensor, k: Tensor, v: Tensor, dout: Tensor
) -> Callable[[], object]:
    # autograd.grad with dout as the output gradient: the gradient of (out * dout).sum()
    # without the extra product, and no accumulation into .grad (a kernel per call).
    def step():
        with backend.use_backend(p.backend):
            return torch.autograd.grad(p.fn(q, k, v), (q, k, v), dout)

    return step


def _runs(fn: Callable[[], object], device: torch.device) -> bool:
    """Whether ``fn`` runs: SDPA raises for a shape, dtype or size its kernel does not take."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns at length why a forced kernel refused
        try:
            fn()
        except RuntimeError:  # "No available kernel", out of memory, ...
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return False
    return True


def _whole_sequence_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    sweep = SWEEPS[(device.type, quick)]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    e = dtype.itemsize
    for d in sweep.head_dims:
        heads = sweep.hidden // d
        for seqlen in sweep.seqlens:
            batch = max(1, sweep.tokens // seqlen)
            shape = (batch, seqlen, heads, d)  # (B, S, H, D)
            q, k, v = (
                torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
            )
            dout = torch.randn(shape, device=device, dtype=dtype)
            for causal in (False, True):
                suffix = " causal" if causal else ""
                for provider, p in providers(causal, shape, device, quick).items():
                    for mode, fn in (
                        ("fwd", _forward(p, q, k, v)),
                        ("fwd+bwd", _forward_backward(p, q, k, v, dout)),
                    ):
                        if p.probe and not _runs(fn, device):
                            continue
                        yield Case(
                            f"attention d{d} {mode}{suffix}",
                            provider,
                            (batch, heads, d, seqlen),
                            dtype,
                            fn,
                            attention_bytes(batch, heads, heads, seqlen, seqlen, d, e, mode),
                            attention_flops(batch, heads, seqlen, seqlen, d, causal, mode),
                        )


def decode_providers(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, length: int
) -> dict[str, Callable[[], object]]:
    """One new token per sequence against ``length`` cached ones, by name."""
    from fastlm.kernels.attention_decode import attention_decode

    scale = q.shape[-1] ** -0.5
    found = {
        "fastlm-triton": lambda: attention_decode(
            q, k_cache, v_cache, cache_seqlens, softmax_scale=scale, causal=True
        ),
    }
    if _has("flash_attn"):
        from flash_attn import flash_attn_with_kvcache

        found["flash-attn"] = lambda: flash_attn_with_kvcache(
            q, k_cache, v_cache, cache_seqlens=cache_seqlens, softmax_scale=scale, causal=True
        )
    # The baseline: a length-1 query against the valid slice of the cache, GQA unexpanded.
    qt = q.transpose(1, 2)
    kt, vt = k_cache[:, :length].transpose(1, 2), v_cache[:, :length].transpose(1, 2)
    found["sdpa"] = lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale, enable_gqa=True)
    return found


def _decode_cases(quick: bool, device: torch.device) -> Iterator[Case]:
    batches, lengths = DECODE[quick]
    dtype, h, h_kv, d = torch.bfloat16, DECODE_HEADS, DECODE_KV_HEADS, DECODE_HEAD_DIM
    for batch in batches:
        for length in lengths:
            q = torch.randn(batch, 1, h, d, device=device, dtype=dtype)
            k_cache, v_cache = (
                torch.randn(batch, length, h_kv, d, device=device, dtype=dtype) for _ in range(2)
            )
            seqlens = torch.full((batch,), length, dtype=torch.int32, device=device)
            for provider, call in decode_providers(q, k_cache, v_cache, seqlens, length).items():

                def fn(call=call):
                    with torch.no_grad():
                        return call()

                yield Case(
                    f"attention decode b{batch}",
                    provider,
                    (batch, h, h_kv, d, length),
                    dtype,
                    fn,
                    decode_bytes(batch, h, h_kv, 1, length, d, dtype.itemsize),
                    4 * batch * h * length * d,
                )


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """Every (op, provider, shape); inputs are built one shape at a time."""
    yield from _whole_sequence_cases(quick, device)
    if device.type == "cuda":
        yield from _decode_cases(quick, device)
