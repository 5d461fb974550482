"""LayerNorm and RMSNorm in Triton: forward and backward, with a fused residual add.

Contract (shared with the CUDA C++ kernels in ``csrc/norm.cu``):

* ``x``, ``residual``, ``dy`` are (M, N) with unit column stride and any row stride.
* With a residual, ``s = x + residual`` is added in fp32 and rounded to the residual-out
  dtype; the rounded ``s`` is what gets normalized (so results equal unfused PyTorch) and is
  written out for the next block.
* Statistics are fp32: ``mean`` (LayerNorm only) and ``rstd``, shape (M,).
* ``dweight``/``dbias`` are reduced deterministically: each program sums its rows into its
  own row of an fp32 (programs, N) buffer, and the launcher sums that buffer.

Rows of up to ``MAX_TILE`` columns are held in registers (several rows per program when N
is small); longer rows loop over ``LOOP_BLOCK_N``-column chunks, merging per-chunk
statistics with Chan's formula so the forward reads each row twice, not three times.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

# Largest row (in elements) kept whole in registers; longer rows loop over chunks. Chosen so
# that no shipped configuration spills at sm_80/sm_90 (checked by compile_check).
MAX_TILE = 8192
LOOP_BLOCK_N = 2048
# Elements one program handles at once: small rows are packed several to a program.
TILE_ELEMENTS = 4096


@triton.jit
def _normalized_input(
    X, R, S, x_offs, r_offs, s_offs, mask, HAS_RES: tl.constexpr, STORE_SUM: tl.constexpr
):
    """The values to normalize, as fp32: x, or x + residual rounded to the sum's dtype (and
    stored there when STORE_SUM), exactly as unfused PyTorch would round it."""
    x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + r_offs, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        if STORE_SUM:
            tl.store(S + s_offs, s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _norm_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    S,
    Mean,
    Rstd,
    stride_x,
    stride_r,
    M,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_TILE:
        mask = row_mask[:, None] & (cols[None, :] < N)
        x = _normalized_input(
            X,
            R,
            S,
            rows[:, None] * stride_x + cols[None, :],
            rows[:, None] * stride_r + cols[None, :],
            rows[:, None] * N + cols[None, :],
            mask,
            HAS_RES,
            True,
        )
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=1) / N
            tl.store(Mean + rows, mean, mask=row_mask)
            xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=1) / N + eps)
        tl.store(Rstd + rows, rstd, mask=row_mask)
        y = xc * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    else:
        # One row per program (BLOCK_M == 1). Pass 1: statistics, merged chunk by chunk.
        row = tl.program_id(0).to(tl.int64)
        mean = 0.0
        m2 = 0.0
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            x = _normalized_input(
                X, R, S, row * stride_x + c, row * stride_r + c, row * N + c, m, HAS_RES, True
            )
            if IS_RMS:
                m2 += tl.sum(x * x, axis=0)
            else:
                n_a = start * 1.0
                n_b = tl.minimum(N - start, BLOCK_N) * 1.0
                mean_b = tl.sum(x, axis=0) / n_b
                d = tl.where(m, x - mean_b, 0.0)
                m2_b = tl.sum(d * d, axis=0)
                delta = mean_b - mean
                mean += delta * n_b / (n_a + n_b)
                m2 += m2_b + delta * delta * n_a * n_b / (n_a + n_b)
        if not IS_RMS:
            tl.store(Mean + row, mean)
        rstd = 1.0 / tl.sqrt_rn(m2 / N + eps)
        tl.store(Rstd + row, rstd)
        # Pass 2: normalize. The sum is recomputed from x and residual (bit-identical) rather
        # than read back from S, so no store-to-load ordering across threads is assumed.
        for start in range(0, N, BLOCK_N):
            c = start + cols
            m = c < N
            x = _normalized_input(
                X, R, S, row * stride_x + c, row * stride_r + c, row * N + c, m, HAS_RES, False
            )
            y = (x - mean) * rstd
            if HAS_W:
                y *= tl.load(W + c, mask=m, other=0.0).to(tl.float32)
            if HAS_B:
                y += tl.load(B + c, mask=m, other=0.0).to(tl.float32)
            tl.store(Y + row * N + c, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _norm_bwd_kernel(
    DY,
    XS,
    W,
    Mean,
    Rstd,
    DS,
    DX,
    DW,
    DB,
    stride_dy,
    stride_xs,
    stride_ds,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_DS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    # Partial dweight/dbias rows owned by this program (no atomics: deterministic).
    dw_row = DW + pid.to(tl.int64) * N
    db_row = DB + pid.to(tl.int64) * N
    if SINGLE_TILE:
        col_mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_M):
            # int64 row indices: row * stride can pass 2**31. (tl.cast, not .to: under the
            # interpreter, loop indices are Python ints.)
            rows = tl.cast(first, tl.int64) + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            mask = row_mask[:, None] & col_mask[None, :]
            x = tl.load(XS + rows[:, None] * stride_xs + cols[None, :], mask=mask, other=0.0)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
            dy = dy.to(tl.float32)
            rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
            if IS_RMS:
                xhat = x.to(tl.float32) * rstd[:, None]
            else:
                mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
                xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            g = dy
            if HAS_W:
                g = dy * w[None, :]
            c1 = tl.sum(xhat * g, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
            if HAS_DS:
                ds = tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0)
                dx += ds.to(tl.float32)
            tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if HAS_W:
                dw_acc += tl.sum(dy * xhat, axis=0)
            if HAS_B:
                db_acc += tl.sum(dy, axis=0)
        if HAS_W:
            tl.store(dw_row + cols, dw_acc, mask=col_mask)
        if HAS_B:
            tl.store(db_row + cols, db_acc, mask=col_mask)
    else:
        # Long rows: one row at a time, two passes over its chunks. The partial dweight/dbias
        # rows (zero-initialised by the launcher) are updated in place by this program only.
        for row_index in range(row_start, row_end):
            row = tl.cast(row_index, tl.int64)
            rstd = tl.load(Rstd + row)
            if not IS_RMS:
                mean = tl.load(Mean + row)
            acc_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                x = tl.load(XS + row * stride_xs + c, mask=m, other=0.0).to(tl.float32)
                g = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                if HAS_W:
                    g *= tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                if IS_RMS:
                    xhat = x * rstd
                else:
                    xhat = tl.where(m, (x - mean) * rstd, 0.0)
                acc_gx += xhat * g
                acc_g += g
            c1 = tl.sum(acc_gx, axis=0) / N
            c2 = tl.sum(acc_g, axis=0) / N
            for start in range(0, N, BLOCK_N):
                c = start + cols
                m = c < N
                x = tl.load(XS + row * stride_xs + c, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * stride_dy + c, mask=m, other=0.0).to(tl.float32)
                g = dy
                if HAS_W:
                    g *= tl.load(W + c, mask=m, other=0.0).to(tl.float32)
                if IS_RMS:
                    xhat = x * rstd
                    dx = (g - xhat * c1) * rstd
                else:
                    xhat = tl.where(m, (x - mean) * rstd, 0.0)
                    dx = (g - xhat * c1 - c2) * rstd
                if HAS_DS:
                    dx += tl.load(DS + row * stride_ds + c, mask=m, other=0.0).to(tl.float32)
                tl.store(DX + row * N + c, dx.to(DX.dtype.element_ty), mask=m)
                if HAS_W:
                    tl.store(dw_row + c, tl.load(dw_row + c, mask=m) + dy * xhat, mask=m)
                if HAS_B:
                    tl.store(db_row + c, tl.load(db_row + c, mask=m) + dy, mask=m)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    single_tile: bool


def tile_config(n: int, backward: bool = False) -> TileConfig:
    """Block shape for rows of ``n`` elements.

    The forward packs small rows into ~4096-element tiles at 16 elements per thread. The
    backward keeps more arrays live (x, dy, xhat, g and the dweight/dbias accumulators), so
    it takes ~1024-element tiles at 8 elements per thread: larger ones spill or run above
    120 registers at sm_90 (see compile_check).
    """
    if n > MAX_TILE:
        return TileConfig(1, LOOP_BLOCK_N, 8, False)
    tile, per_thread = (TILE_ELEMENTS // 4, 8) if backward else (TILE_ELEMENTS, 16)
    block_n = max(16, triton.next_power_of_2(n))
    block_m = max(1, min(tile // block_n, 64))
    num_warps = max(1, min(block_m * block_n // (32 * per_thread), 16))
    return TileConfig(block_m, block_n, num_warps, True)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_for_reduction(m_blocks: int, device: torch.device) -> int:
    # Enough programs to fill the GPU a few times over; each one costs an N-float partial row.
    # Under the interpreter, a handful exercises the cross-program reduction cheaply.
    limit = 4 * _sm_count(device.index or 0) if device.type == "cuda" else 3
    return max(1, min(m_blocks, limit))


def norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Normalize the rows of ``x`` (M, N). Returns ``(y, residual_out, mean, rstd)``.

    ``residual_out`` (dtype of ``residual``) is ``None`` without a residual and ``mean`` is
    ``None`` for RMSNorm. Inputs are validated by ``fastlm.ops``; here only the layout is.
    """
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    m, n = x.shape
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    res_out = (
        None if residual is None else torch.empty((m, n), dtype=residual.dtype, device=x.device)
    )
    mean = None if rms else torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, res_out, mean, rstd
    cfg = tile_config(n)
    kernel = on_device(_norm_fwd_kernel, x.device)
    kernel[(triton.cdiv(m, cfg.block_m),)](
        x,
        x if residual is None else residual,
        x if weight is None else weight,
        x if bias is None else bias,
        y,
        y if res_out is None else res_out,
        rstd if mean is None else mean,
        rstd,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        m,
        n,
        eps,
        IS_RMS=rms,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        HAS_RES=residual is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SINGLE_TILE=cfg.single_tile,
        num_warps=cfg.num_warps,
    )
    return y, res_out, mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    xs: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    dresidual_out: torch.Tensor | None,
    rms: bool,
    has_bias: bool,
    dx_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`norm_fwd`. Returns ``(dx, dweight, dbias)``, the last two fp32.

    ``xs`` is the tensor that was normalized (``x``, or ``residual_out`` when a residual was
    fused); ``dresidual_out`` is the gradient reaching ``residual_out`` and is added to dx.
    """
    assert dy.stride(-1) == 1 and xs.stride(-1) == 1
    m, n = xs.shape
    dx = torch.empty((m, n), dtype=dx_dtype, device=xs.device)
    if m == 0:
        zeros = torch.zeros(n, dtype=torch.float32, device=xs.device)
        return dx, zeros if weight is not None else None, zeros.clone() if has_bias else None
    cfg = tile_config(n, backward=True)
    programs = _programs_for_reduction(triton.cdiv(m, cfg.block_m), xs.device)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), cfg.block_m) * cfg.block_m
    programs = triton.cdiv(m, rows_per_program)
    # The looping path accumulates into the partial buffers, so they start at zero there.
    alloc = torch.empty if cfg.single_tile else torch.zeros
    dw = alloc((programs, n), dtype=torch.float32, device=xs.device) if weight is not None else None
    db = alloc((programs, n), dtype=torch.float32, device=xs.device) if has_bias else None
    kernel = on_device(_norm_bwd_kernel, xs.device)
    kernel[(programs,)](
        dy,
        xs,
        xs if weight is None else weight,
        rstd if mean is None else mean,
        rstd,
        dx if dresidual_out is None else dresidual_out,
        dx,
        rstd if dw is None else dw,
        rstd if db is None else db,
        dy.stride(0),
        xs.stride(0),
        0 if dresidual_out is None else dresidual_out.stride(0),
        m,
        n,
        rows_per_program,
        IS_RMS=rms,
        HAS_W=weight is not None,
        HAS_B=has_bias,
        HAS_DS=dresidual_out is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SINGLE_TILE=cfg.single_tile,
        num_warps=cfg.num_warps,
    )
    return dx, None if dw is None else dw.sum(0), None if db is None else db.sum(0)


def _shipped_configs(backward: bool) -> list[tuple[int, TileConfig]]:
    """One representative hidden size per distinct tile configuration, 1..65536."""
    seen: dict[TileConfig, int] = {}
    for n in [2**k for k in range(17)]:
        seen.setdefault(tile_config(n, backward), n)
    return [(n, cfg) for cfg, n in seen.items()]


def compile_specs() -> list[KernelSpec]:
    """Every tile configuration of the forward and the backward, LayerNorm and RMSNorm, in
    bf16 with all features on (weight, bias, residual), plus fp16 and fp32 at n=4096."""
    specs = []
    for backward, make in ((False, _fwd_spec), (True, _bwd_spec)):
        for n, cfg in _shipped_configs(backward):
            dtypes = DTYPES_CHECKED if n == 4096 else (torch.bfloat16,)
            for dtype in dtypes:
                for rms in (False, True):
                    name = "rms_norm" if rms else "layer_norm"
                    label = (
                        f"{name} {_TRITON_DTYPE[dtype]} n={n} tile={cfg.block_m}x"
                        f"{cfg.block_n} w={cfg.num_warps} {'bwd' if backward else 'fwd'}"
                    )
                    specs.append(make(cfg, _TRITON_DTYPE[dtype], rms, label))
    return specs


DTYPES_CHECKED = (torch.bfloat16, torch.float16, torch.float32)
_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tile_constexprs(cfg: TileConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_TILE=cfg.single_tile)


def _fwd_spec(cfg: TileConfig, t: str, rms: bool, label: str) -> KernelSpec:
    return KernelSpec(
        label=label,
        kernel=_norm_fwd_kernel,
        signature={
            "X": f"*{t}",
            "R": f"*{t}",
            "W": f"*{t}",
            "B": f"*{t}",
            "Y": f"*{t}",
            "S": f"*{t}",
            "Mean": "*fp32",
            "Rstd": "*fp32",
            "stride_x": "i32",
            "stride_r": "i32",
            "M": "i32",
            "N": "i32",
            "eps": "fp32",
        },
        constexprs=dict(
            IS_RMS=rms, HAS_W=True, HAS_B=not rms, HAS_RES=True, **_tile_constexprs(cfg)
        ),
        num_warps=cfg.num_warps,
        aligned=("X", "R", "W", "B", "Y", "S", "stride_x", "stride_r", "N"),
    )


def _bwd_spec(cfg: TileConfig, t: str, rms: bool, label: str) -> KernelSpec:
    return KernelSpec(
        label=label,
        kernel=_norm_bwd_kernel,
        signature={
            "DY": f"*{t}",
            "XS": f"*{t}",
            "W": f"*{t}",
            "Mean": "*fp32",
            "Rstd": "*fp32",
            "DS": f"*{t}",
            "DX": f"*{t}",
            "DW": "*fp32",
            "DB": "*fp32",
            "stride_dy": "i32",
            "stride_xs": "i32",
            "stride_ds": "i32",
            "M": "i32",
            "N": "i32",
            "rows_per_program": "i32",
        },
        constexprs=dict(
            IS_RMS=rms, HAS_W=True, HAS_B=not rms, HAS_DS=True, **_tile_constexprs(cfg)
        ),
        num_warps=cfg.num_warps,
        aligned=(
            "DY",
            "XS",
            "W",
            "DS",
            "DX",
            "DW",
            "DB",
            "stride_dy",
            "stride_xs",
            "stride_ds",
            "N",
        ),
    )
