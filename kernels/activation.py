"""Fused bias + activation (+ dropout) in Triton, forward and backward.

For shapes where the GEMM is left to cuBLAS: ``y = dropout(act(x + bias))`` in one pass over
(M, N) rows, and its backward ``dx = dy * keep / (1 - p) * act'(x + bias)`` with ``dbias``
reduced deterministically (per-program partial rows, summed by the launcher). The backward
recomputes ``act'`` from the saved input instead of storing anything else. Dropout draws
from Philox keyed by ``(seed, row, column)``, so the backward regenerates the mask.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

ACTIVATIONS = ("identity", "relu", "gelu", "gelu_tanh", "silu")
_SQRT_2_OVER_PI: tl.constexpr = tl.constexpr(0.7978845608028654)
_INV_SQRT_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """Activation ``ACT`` (an index into ACTIVATIONS) of fp32 ``x``."""
    if ACT == 1:
        y = tl.maximum(x, 0.0)
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT_2))
    elif ACT == 3:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh, and no cancellation near +-1.
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * u)
    elif ACT == 4:
        y = x * tl.sigmoid(x)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    """d act(x) / dx for fp32 ``x``."""
    if ACT == 1:
        g = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        g = cdf + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        # With s = sigmoid(2u): 1 - tanh(u)^2 == 4 s (1 - s), and 1 - s == sigmoid(-2u):
        # no cancellation anywhere.
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)
        g = s + 2.0 * x * s * tl.sigmoid(-2.0 * u) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    elif ACT == 4:
        g = tl.sigmoid(x) * (1.0 + x * tl.sigmoid(-x))  # 1 - sigmoid(x), without cancelling
    else:
        g = x * 0.0 + 1.0
    return g


@triton.jit
def _tile(rows, cols, M, N, stride):
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    return rows.to(tl.int64)[:, None] * stride + cols[None, :], mask


@triton.jit
def _keep(seed, rows, cols, dropout_p):
    """Dropout's keep mask: Philox with 32-bit counters (column, row), so any M x N is
    covered without 64-bit counters (which double the random-number state and spilled)."""
    zero = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.uint32)
    c0 = cols[None, :].to(tl.uint32) + zero
    c1 = rows[:, None].to(tl.uint32) + zero
    bits, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _bias_act_fwd_kernel(
    X,
    B,
    Y,
    M,
    N,
    stride_x,
    dropout_p,
    seed,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs, mask = _tile(rows, cols, M, N, stride_x)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        x += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y = _act(x, ACT)
    if HAS_DROPOUT:
        y = tl.where(_keep(seed, rows, cols, dropout_p), y / (1.0 - dropout_p), 0.0)
    out_offs, _ = _tile(rows, cols, M, N, N)
    tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_act_bwd_kernel(
    DY,
    X,
    B,
    DX,
    DB,
    X_UP,
    B_UP,
    DX_UP,
    DB_UP,
    Y,
    M,
    N,
    stride_dy,
    stride_x,
    rows_per_program,
    dropout_p,
    seed,
    ACT: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    GATED: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Backward of ``y = dropout(act(x + b))``, or with GATED of ``y = act(x + b) * (x_up +
    b_up)`` (HAS_B: add the biases; without it, x already includes them). DBIAS writes the
    bias gradients' partial rows. RECOMPUTE also writes ``y`` again, for a following GEMM's
    weight gradient that was not given ``y`` to keep (the fused MLPs save only the
    pre-activations)."""
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_B:
        bias = tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)
        if GATED:
            bias_up = tl.load(B_UP + cols, mask=cols < N, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_row = pid * rows_per_program
    for start in range(first_row, tl.minimum(first_row + rows_per_program, M), BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        offs, mask = _tile(rows, cols, M, N, stride_x)
        out_offs, _ = _tile(rows, cols, M, N, N)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            x += bias[None, :]
        dy_offs, _ = _tile(rows, cols, M, N, stride_dy)
        grad = tl.load(DY + dy_offs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            up = tl.load(X_UP + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                up += bias_up[None, :]
            y = _act(x, ACT)
            grad_up = tl.where(mask, grad * y, 0.0)
            tl.store(DX_UP + out_offs, grad_up.to(DX_UP.dtype.element_ty), mask=mask)
            db_up += tl.sum(grad_up, axis=0)
            grad = grad * up
            y = y * up
        else:
            y = _act(x, ACT)
            if HAS_DROPOUT:
                keep = _keep(seed, rows, cols, dropout_p)
                grad = tl.where(keep, grad / (1.0 - dropout_p), 0.0)
                y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
        grad = tl.where(mask, grad * _act_grad(x, ACT), 0.0)
        tl.store(DX + out_offs, grad.to(DX.dtype.element_ty), mask=mask)
        if RECOMPUTE:
            tl.store(Y + out_offs, y.to(Y.dtype.element_ty), mask=mask)
        db += tl.sum(grad, axis=0)
    if DBIAS:
        tl.store(DB + pid.to(tl.int64) * N + cols, db, mask=cols < N)
        if GATED:
            tl.store(DB_UP + pid.to(tl.int64) * N + cols, db_up, mask=cols < N)


# 16 elements per thread: the dropout backward spilled at 32 (sm_90, compile_check), and at
# 16 when it also recomputes the output, which therefore takes half as many rows.
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 128, 8


def _bwd_block_m(dropout: bool, recompute: bool) -> int:
    return BLOCK_M // 2 if dropout and recompute else BLOCK_M


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def bias_act_fwd(x, bias, activation: str, dropout_p: float, seed: int) -> torch.Tensor:
    """``dropout(act(x + bias))`` for x (M, N) with a contiguous last dim; y in x's dtype."""
    m, n = x.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if y.numel():
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        on_device(_bias_act_fwd_kernel, x.device)[grid](
            x,
            x if bias is None else bias,
            y,
            m,
            n,
            x.stride(0),
            dropout_p,
            seed,
            ACT=ACTIVATIONS.index(activation),
            HAS_B=bias is not None,
            HAS_DROPOUT=dropout_p > 0,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS,
        )
    return y


def bias_act_bwd(
    dy,
    x,
    bias,
    activation: str,
    dropout_p: float,
    seed: int,
    recompute: bool = False,
    dbias: bool | None = None,
):
    """Returns ``(dx, dbias, y)``: dx in x's dtype, dbias fp32 (N,) or None, and with
    ``recompute`` the forward's output ``y`` again (else None). ``dbias=True`` with no
    ``bias``: x already includes a bias whose gradient is wanted (default: with a bias)."""
    dx, _, db, _, y = _act_bwd(
        dy,
        x,
        None,
        bias,
        None,
        activation,
        dropout_p,
        seed,
        recompute,
        bias is not None if dbias is None else dbias,
    )
    return dx, db, y


def gated_act_bwd(
    dy, x, x_up, bias, bias_up, activation: str, recompute: bool = False, dbias: bool | None = None
):
    """Backward of ``y = act(x + bias) * (x_up + bias_up)`` (biases both given or both None):
    ``(dx, dx_up, dbias, dbias_up, y)``, y recomputed only with ``recompute``; ``dbias`` as
    in :func:`bias_act_bwd`."""
    return _act_bwd(
        dy,
        x,
        x_up,
        bias,
        bias_up,
        activation,
        0.0,
        0,
        recompute,
        bias is not None if dbias is None else dbias,
    )


def _act_bwd(dy, x, x_up, bias, bias_up, activation, dropout_p, seed, recompute, dbias):
    m, n = x.shape
    gated = x_up is not None
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dx_up = torch.empty((m, n), dtype=x.dtype, device=x.device) if gated else None
    y = torch.empty((m, n), dtype=x.dtype, device=x.device) if recompute else None
    block_m = _bwd_block_m(dropout_p > 0, recompute)
    # Row groups per column block: enough programs to fill a GPU; a few under the interpreter.
    limit = 4 * _sm_count(x.device.index or 0) if x.device.type == "cuda" else 3
    groups = max(1, min(triton.cdiv(m, block_m), limit // max(1, triton.cdiv(n, BLOCK_N)) or 1))
    rows_per_program = triton.cdiv(triton.cdiv(max(m, 1), groups), block_m) * block_m
    groups = triton.cdiv(max(m, 1), rows_per_program)

    def partial_sums():
        return x.new_zeros((groups, n), dtype=torch.float32) if dbias else None

    db, db_up = partial_sums(), partial_sums() if gated else None
    if dx.numel():
        # Absent tensors are passed as dx: the constexpr flags keep them untouched.
        on_device(_bias_act_bwd_kernel, x.device)[(groups, triton.cdiv(n, BLOCK_N))](
            dy,
            x,
            dx if bias is None else bias,
            dx,
            dx if db is None else db,
            dx if x_up is None else x_up,
            dx if bias_up is None else bias_up,
            dx if dx_up is None else dx_up,
            dx if db_up is None else db_up,
            dx if y is None else y,
            m,
            n,
            dy.stride(0),
            x.stride(0),
            rows_per_program,
            dropout_p,
            seed,
            ACT=ACTIVATIONS.index(activation),
            HAS_B=bias is not None,
            HAS_DROPOUT=dropout_p > 0,
            GATED=gated,
            RECOMPUTE=recompute,
            DBIAS=dbias,
            BLOCK_M=block_m,
            BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS,
        )

    def total(partial):
        return None if partial is None else partial.sum(0)

    return dx, dx_up, total(db), total(db_up), y


def compile_specs() -> list[KernelSpec]:
    """Every activation, forward and backward, with bias and dropout, and the gated backward,
    in bf16 and fp16; the backwards with the output recomputed (their heaviest form)."""
    specs = []
    for dtype in ("bf16", "fp16"):
        bwd_types = {
            "DY": f"*{dtype}",
            "X": f"*{dtype}",
            "B": f"*{dtype}",
            "DX": f"*{dtype}",
            "DB": "*fp32",
            "X_UP": f"*{dtype}",
            "B_UP": f"*{dtype}",
            "DX_UP": f"*{dtype}",
            "DB_UP": "*fp32",
            "Y": f"*{dtype}",
            "M": "i32",
            "N": "i32",
            "stride_dy": "i32",
            "stride_x": "i32",
            "rows_per_program": "i32",
            "dropout_p": "fp32",
            "seed": "i32",
        }
        bwd_aligned = tuple(k for k, v in bwd_types.items() if v[0] == "*" or k[0] in "Ns")
        for act, name in enumerate(ACTIVATIONS):
            flags = dict(ACT=act, HAS_B=True, HAS_DROPOUT=True, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
            specs.append(
                KernelSpec(
                    label=f"bias_act {dtype} {name} fwd {BLOCK_M}x{BLOCK_N}",
                    kernel=_bias_act_fwd_kernel,
                    signature={
                        "X": f"*{dtype}",
                        "B": f"*{dtype}",
                        "Y": f"*{dtype}",
                        "M": "i32",
                        "N": "i32",
                        "stride_x": "i32",
                        "dropout_p": "fp32",
                        "seed": "i32",
                    },
                    constexprs=flags,
                    num_warps=NUM_WARPS,
                    aligned=("X", "B", "Y", "N", "stride_x"),
                )
            )
            for gated, recompute in ((False, False), (False, True), (True, True)):
                block_m = _bwd_block_m(not gated, recompute)
                bwd_flags = dict(
                    flags,
                    HAS_DROPOUT=not gated,
                    GATED=gated,
                    RECOMPUTE=recompute,
                    DBIAS=True,
                    BLOCK_M=block_m,
                )
                specs.append(
                    KernelSpec(
                        label=f"{'gated' if gated else 'bias'}_act {dtype} {name} bwd"
                        f"{'+recompute' * recompute} {block_m}x{BLOCK_N}",
                        kernel=_bias_act_bwd_kernel,
                        signature=bwd_types,
                        constexprs=bwd_flags,
                        num_warps=NUM_WARPS,
                        aligned=bwd_aligned,
                    )
                )
    return specs
