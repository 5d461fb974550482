"""GEMMs with fused epilogues for transformer MLPs, in Triton.

``y = dropout(act(x @ W.T + b))`` and the gated ``y = act(x @ Wg.T + bg) * (x @ Wu.T + bu)``
(SwiGLU with silu, GeGLU with gelu) in one kernel: the accumulator(s) stay in registers
until the epilogue has applied bias, activation, product and dropout, so the pre-activation
is written only when a backward will need it (``save_pre``), and the gated variant streams
each tile of x from memory once for both products.

x is (M, K) with a unit stride along K, weights are (N, K) as ``nn.Linear`` stores them,
outputs (M, N) contiguous; fp16/bf16 in, fp32 accumulation (tensor cores: mma on sm_80,
wgmma on sm_90). Tiles come from a per-architecture list autotuned on the first call per
(M bucket, N, K, dtype); under the interpreter one small tile is used.

The backward (in :mod:`fastlm.ops.mlp`) leaves its three GEMMs to cuBLAS and fuses the
elementwise part into :func:`fastlm.kernels.activation.bias_act_bwd` /
:func:`~fastlm.kernels.activation.gated_act_bwd`.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .activation import ACTIVATIONS, _act, _keep
from .launch import KernelSpec, on_device
from .lora import lora_rank_block, lora_update


@triton.jit
def _linear_act_fwd_kernel(
    X,
    W,
    W_UP,
    B,
    B_UP,
    Y,
    PRE,
    PRE_UP,
    T,
    LB,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    dropout_p,
    seed,
    lora_scale,
    R,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    GATED: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LORA_R: tl.constexpr,
):
    # LORA_R > 0 adds lora_scale * T @ LB.T (kernels/lora.py) before the epilogue.
    # M_BUCKET is only an autotuning key (the M range a tile choice is reused for).
    # Grouped order: GROUP_M row blocks share each column block of W while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read wrapped-around valid ones (never stored), so the
    # loads are masked along K only and keep their full vector width.
    rows_in = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M).to(tl.int64)
    cols_in = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N).to(tl.int64)
    x_ptrs = X + rows_in[:, None] * stride_xm + ks[None, :]
    w_offs = cols_in[None, :] * K + ks[:, None]  # (BLOCK_K, BLOCK_N): W.T read in place
    w_ptrs = W + w_offs
    w_up_ptrs = W_UP + w_offs
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=ks[None, :] < k_left, other=0.0)
        acc = tl.dot(x, tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0), acc)
        if GATED:
            w_up = tl.load(w_up_ptrs, mask=ks[:, None] < k_left, other=0.0)
            acc_up = tl.dot(x, w_up, acc_up)
            w_up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if LORA_R > 0:
        acc += lora_update(T, LB, rows_in, cols_in, R, LORA_R) * lora_scale
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    # Each accumulator is finished (bias, saved, consumed) before the next is touched: with
    # both biased and converted at once the gated tiles spill.
    if HAS_B:
        acc += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:  # rounded once, as eager PyTorch's would be: the backward sees its signs
        tl.store(PRE + offs, acc.to(PRE.dtype.element_ty), mask=mask)
    y = _act(acc, ACT)
    if GATED:
        if HAS_B:
            acc_up += tl.load(B_UP + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if SAVE_PRE:
            tl.store(PRE_UP + offs, acc_up.to(PRE_UP.dtype.element_ty), mask=mask)
        y = y * acc_up
    if HAS_DROPOUT:
        y = tl.where(_keep(seed, rows, cols, dropout_p), y / (1.0 - dropout_p), 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def triton_config(self) -> triton.Config:
        return triton.Config(
            dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=8),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# The autotuning candidates per GPU generation and epilogue: the shapes Triton's matmul
# tutorial and cuBLAS favour, kept where the static check compiles them without spills and
# within shared memory (sm_80: 163 KiB, sm_90: 227 KiB) in the heaviest epilogue of their
# kind (erf-GELU, bias, pre-activation saved). 128x256 tiles spill there (128 fp32
# accumulators per thread plus the epilogue); the gated kernel carries two accumulators, so
# its 128x64 tile does the MMA work of a plain 128x128 one; dropout's Philox state fits at 32
# elements per thread at most.
_CONFIGS = {
    80: {
        "plain": (
            GemmConfig(128, 128, 64, 8, 4),
            GemmConfig(64, 256, 64, 8, 3),
            GemmConfig(128, 64, 64, 8, 4),
            GemmConfig(64, 128, 64, 4, 4),
            GemmConfig(64, 64, 64, 4, 4),
        ),
        "gated": (
            GemmConfig(128, 64, 64, 8, 3),
            GemmConfig(128, 64, 32, 8, 3),
            GemmConfig(64, 128, 32, 8, 4),
            GemmConfig(64, 64, 64, 4, 4),
        ),
        "dropout": (GemmConfig(128, 64, 64, 8, 4), GemmConfig(64, 64, 64, 4, 4)),
    },
    90: {
        "plain": (
            GemmConfig(128, 128, 64, 8, 4),
            GemmConfig(64, 256, 64, 8, 3),
            GemmConfig(128, 64, 64, 8, 4),
            GemmConfig(64, 128, 64, 4, 4),
            GemmConfig(64, 64, 64, 4, 4),
        ),
        "gated": (
            GemmConfig(128, 64, 64, 8, 4),
            GemmConfig(64, 128, 64, 8, 4),
            GemmConfig(128, 64, 64, 8, 3),
            GemmConfig(64, 64, 64, 4, 4),
        ),
        "dropout": (GemmConfig(128, 64, 64, 8, 4), GemmConfig(64, 64, 64, 4, 4)),
    },
}
# Small enough for the interpreter, large enough for tl.dot (16 per side at least).
_INTERPRETER_CONFIG = GemmConfig(32, 32, 32, 4, 1)


def _generation(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _kind(gated: bool, dropout: bool) -> str:
    return "gated" if gated else "dropout" if dropout else "plain"


@functools.cache
def _autotuned(generation: int, kind: str):
    configs = [cfg.triton_config() for cfg in _CONFIGS[generation][kind]]
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"])(_linear_act_fwd_kernel)


def _m_bucket(m: int) -> int:
    # Tiles are retuned per power of two of M up to 4096 (decode-sized M wants narrow tiles;
    # beyond a few thousand rows the choice settles).
    return min(triton.next_power_of_2(m), 4096)


def _launch(x, weight, weight_up, bias, bias_up, activation, dropout_p, seed, save_pre, lora=None):
    m, k = x.shape
    n = weight.shape[0]
    gated = weight_up is not None
    y = x.new_empty((m, n))
    pre = x.new_empty((m, n)) if save_pre else None
    pre_up = x.new_empty((m, n)) if save_pre and gated else None
    if y.numel() == 0:
        return y, pre, pre_up
    # Absent tensors are passed as y: the constexpr flags keep them untouched.
    t, lora_b, lora_scale = lora if lora is not None else (y, y, 0.0)
    r = t.shape[1] if lora is not None else 0
    args = (
        x,
        weight,
        y if weight_up is None else weight_up,
        y if bias is None else bias,
        y if bias_up is None else bias_up,
        y,
        y if pre is None else pre,
        y if pre_up is None else pre_up,
        t,
        lora_b,
        m,
        n,
        k,
        _m_bucket(m),
        x.stride(0),
        dropout_p,
        seed,
        lora_scale,
        r,
    )
    flags = dict(
        ACT=ACTIVATIONS.index(activation),
        HAS_B=bias is not None,
        GATED=gated,
        HAS_DROPOUT=dropout_p > 0,
        SAVE_PRE=save_pre,
        LORA_R=lora_rank_block(r),
    )
    if x.device.type == "cuda":
        kernel = _autotuned(_generation(x.device), _kind(gated, dropout_p > 0))

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        on_device(kernel, x.device)[grid](*args, **flags)
    else:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        on_device(_linear_act_fwd_kernel, x.device)[grid](
            *args,
            **flags,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            GROUP_M=8,
            num_warps=cfg.num_warps,
        )
    return y, pre, pre_up


def linear_act_fwd(
    x,
    weight,
    bias,
    activation: str,
    dropout_p: float = 0.0,
    seed: int = 0,
    save_pre: bool = False,
    lora=None,
):
    """``(y, pre)``: ``y = dropout(act(x @ weight.T + bias))`` in x's dtype, and with
    ``save_pre`` the pre-activation ``x @ weight.T + bias`` for the backward. ``lora``:
    ``(t, b, scale)`` adds ``scale * t @ b.T`` (t (M, r) contiguous, b (N, r)) before the
    activation: a LoRA layer's update."""
    y, pre, _ = _launch(x, weight, None, bias, None, activation, dropout_p, seed, save_pre, lora)
    return y, pre


def gated_linear_fwd(x, w_gate, w_up, bias_gate, bias_up, activation: str, save_pre: bool = False):
    """``(y, gate, up)``: ``y = act(x @ w_gate.T + bias_gate) * (x @ w_up.T + bias_up)``, and
    with ``save_pre`` the two pre-activations, biases added (else None)."""
    return _launch(x, w_gate, w_up, bias_gate, bias_up, activation, 0.0, 0, save_pre)


def compile_specs() -> list[KernelSpec]:
    """Every autotuning candidate for its GPU generation, in the heaviest epilogue of its
    kind: bias, erf-GELU (GeGLU when gated) and the pre-activation saved, plus dropout for
    the dropout kind; bf16 throughout, fp16 for the first candidate of each."""
    specs = []
    for generation, by_kind in _CONFIGS.items():
        for kind, configs in by_kind.items():
            for i, cfg in enumerate(configs):
                for dtype in ("bf16", "fp16") if i == 0 else ("bf16",):
                    specs.append(_spec(generation, kind, cfg, dtype))
    return specs


def _spec(generation: int, kind: str, cfg: GemmConfig, dtype: str) -> KernelSpec:
    pointers = ("X", "W", "W_UP", "B", "B_UP", "Y", "PRE", "PRE_UP")
    signature = {name: f"*{dtype}" for name in pointers}
    signature.update(
        T=f"*{dtype}",
        LB=f"*{dtype}",
        M="i32",
        N="i32",
        K="i32",
        M_BUCKET="i32",
        stride_xm="i32",
        dropout_p="fp32",
        seed="i32",
        lora_scale="fp32",
        R="i32",
    )
    constexprs = dict(
        ACT=ACTIVATIONS.index("gelu"),
        HAS_B=True,
        GATED=kind == "gated",
        HAS_DROPOUT=kind == "dropout",
        SAVE_PRE=True,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=8,
        LORA_R=16 if kind == "plain" else 0,
    )
    return KernelSpec(
        label=f"linear_act {kind} {dtype} {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
        f"w={cfg.num_warps} s={cfg.num_stages}",
        kernel=_linear_act_fwd_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        aligned=(*pointers, "N", "K", "stride_xm"),
        needs_wgmma=True,
        capabilities=(generation,),
    )
