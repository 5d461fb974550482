"""Quantized matmuls in Triton: weight-only int8 / int4 / NF4 dequantize-matmul, and W8A8.

``y = x @ W.T (+ b)`` with W stored as in :mod:`fastlm.ops.quant_formats`: the integer codes are
loaded, unpacked and scaled in registers and fed to tensor cores in x's dtype; no float
weight is ever written to memory. With groups of 64 or 128 a K tile stays inside one group,
so the integer codes go to the tensor cores exactly and each tile's partial product is
scaled once per column in fp32 (``acc += (x @ (q - z)) * s``); groups of 32 share a 64-wide
tile (narrower tiles would load less than 128 bits per thread), and their weights are
scaled before the product.

Two paths, each autotuned per GPU generation:

- skinny (M <= 16, decoding): split-K. ``SPLIT_K`` programs share a column block, each
  streams a slice of K and writes an fp32 partial; the launcher sums the partials (a fixed
  order, so results are deterministic). This keeps every SM streaming weights at M = 1.
- tiled (M > 16): one program per (BLOCK_M, BLOCK_N) tile over all of K.

Int4 codes are packed two per byte along K (even k low). Rather than re-interleaving the
unpacked nibbles, the x tile is split into its even and odd columns (``tl.split``) and the
product is ``x_even @ W_low + x_odd @ W_high``.

W8A8: ``_quantize_rows_kernel`` quantizes activations per row (token) to int8 with an fp32
scale in one pass over each row; ``_w8a8_kernel`` multiplies int8 by int8 on tensor cores
into int32 and scales by ``s_x[m] * s_w[n]``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device
from .lora import lora_rank_block, lora_update

SKINNY_M = 16  # rows up to which the split-K path runs


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output rows and columns, and the in-range ones to read: edge rows and
    columns read wrapped-around valid ones (never stored), so weight loads stay unmasked and
    full width."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_in = (rows % M).to(tl.int64)
    cols_in = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N).to(tl.int64)
    return rows, cols, rows_in, cols_in


@triton.jit
def _quant_matmul_kernel(
    X,
    QW,
    S,
    Z,
    S2,
    SMEAN,
    CODE,
    B,
    Y,
    T,
    LB,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    lora_scale,
    R,
    BITS: tl.constexpr,
    NF4: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    HAS_B: tl.constexpr,
    PARTIAL: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    LORA_R: tl.constexpr,
):
    # LORA_R > 0 adds lora_scale * T @ LB.T (kernels/lora.py: QLoRA; tiled path only).
    # M_BUCKET only keys the autotuner. Split k covers whole K tiles (whole groups for
    # 4-bit), the last split possibly fewer.
    rows, cols, rows_in, cols_in = _tile(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(2)
    k_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * k_split
    k_stop = tl.minimum(K, k_start + k_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if BITS == 8:
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_stop, BLOCK_K):
            k_in = k0 + ks < k_stop
            x = tl.load(
                X + rows_in[:, None] * stride_xm + (k0 + ks)[None, :], mask=k_in[None, :], other=0.0
            )
            q = tl.load(QW + cols_in[None, :] * K + (k0 + ks)[:, None], mask=k_in[:, None], other=0)
            # Through fp32: exact, and the interpreter converts ints to bf16 wrongly.
            acc = tl.dot(x, q.to(tl.float32).to(x.dtype), acc)
        # Per-channel scales are constant along K: applied once.
        acc = acc * tl.load(S + cols_in)[None, :]
    else:
        # K is a multiple of GROUP, and GROUP of BLOCK_K or BLOCK_K of GROUP: no K masks.
        ks = tl.arange(0, BLOCK_K)
        kh = tl.arange(0, BLOCK_K // 2)
        groups = K // GROUP
        for k0 in range(k_start, k_stop, BLOCK_K):
            x = tl.load(X + rows_in[:, None] * stride_xm + (k0 + ks)[None, :])
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
            packed = tl.load(QW + cols_in[None, :] * (K // 2) + (k0 // 2 + kh)[:, None])
            low = (packed & 0xF).to(tl.int32)
            high = (packed >> 4).to(tl.int32)
            if GROUP >= BLOCK_K:  # one group per tile: (1, BLOCK_N) scales
                g_offs = (cols_in * groups + k0 // GROUP)[None, :]
            else:  # several (groups of 32 in 64-wide tiles): a scale per packed byte
                g_offs = cols_in[None, :] * groups + ((k0 + 2 * kh) // GROUP)[:, None]
            if NF4:
                w_low = tl.load(CODE + low)
                w_high = tl.load(CODE + high)
            else:
                if HAS_ZEROS:
                    zero = tl.load(Z + g_offs).to(tl.int32)
                else:
                    zero = 8
                # Through fp32: exact, and the interpreter converts ints to bf16 wrongly.
                w_low = (low - zero).to(tl.float32)
                w_high = (high - zero).to(tl.float32)
            scale = tl.load(S + g_offs).to(tl.float32)
            if DOUBLE_QUANT:
                scale = scale * tl.load(S2 + g_offs // 256) + tl.load(SMEAN)
            if GROUP >= BLOCK_K:  # the integer codes are exact in fp16/bf16: scale after
                part = tl.dot(x_odd, w_high.to(x.dtype), tl.dot(x_even, w_low.to(x.dtype)))
                acc += part * scale
            else:
                acc = tl.dot(x_even, (w_low * scale).to(x.dtype), acc)
                acc = tl.dot(x_odd, (w_high * scale).to(x.dtype), acc)
    if LORA_R > 0:
        acc += lora_update(T, LB, rows_in, cols_in, R, LORA_R) * lora_scale
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    if PARTIAL:
        tl.store(Y + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        if HAS_B:
            acc += tl.load(B + cols_in).to(tl.float32)[None, :]
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _round(x):
    # Round half to even (torch.round's rule) without libdevice: the interpreter lacks it.
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _max_keeping_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _quantize_rows_kernel(X, XQ, XS, K, stride_xm, BLOCK: tl.constexpr):
    """Row ``pid`` of x to int8 with scale ``absmax / 127`` (fp32), symmetric."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_xm
    offs = tl.arange(0, BLOCK)
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    # A NaN in the row makes its scale, and so its output row, NaN (as the reference does).
    absmax = tl.reduce(absmax, 0, _max_keeping_nan)
    scale = tl.maximum(absmax, 1e-12, propagate_nan=tl.PropagateNan.ALL) / 127.0
    tl.store(XS + row, scale)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = _round(x / scale)
        tl.store(XQ + row * K + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)


@triton.jit
def _w8a8_kernel(
    XQ,
    XS,
    WQ,
    WS,
    B,
    Y,
    M,
    N,
    K,
    M_BUCKET,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, cols, rows_in, cols_in = _tile(M, N, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_in = k0 + ks < K
        x = tl.load(XQ + rows_in[:, None] * K + (k0 + ks)[None, :], mask=k_in[None, :], other=0)
        w = tl.load(WQ + cols_in[None, :] * K + (k0 + ks)[:, None], mask=k_in[:, None], other=0)
        acc = tl.dot(x, w, acc, out_dtype=tl.int32)  # triton 3.6 does not infer it
    y = acc.to(tl.float32) * tl.load(XS + rows_in)[:, None] * tl.load(WS + cols_in)[None, :]
    if HAS_B:
        y += tl.load(B + cols_in).to(tl.float32)[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(
        Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask
    )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1

    def triton_config(self, group: int, split: bool = True, wide: bool = True) -> triton.Config:
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.tile_k(group, wide))
        if split:
            meta["SPLIT_K"] = self.split_k
        return triton.Config(meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def tile_k(self, group: int, wide: bool = True) -> int:
        """K per tile: within one group where groups are 64 or 128 wide (scales applied per
        tile), two groups of 32 (scales per byte) unless K is an odd multiple of 32 (not
        ``wide``: one group per tile), the config's own for int8 (``group`` 0)."""
        if not group:
            return self.block_k
        return max(min(self.block_k, group), 64 if wide else 32)


# Autotuning candidates per GPU generation. Skinny (M <= 16): the weight stream is the
# whole cost, so narrow column blocks and split-K keep >= 2 programs per SM at N = 4096.
# Tiled: the MLP GEMMs' shapes (kernels/mlp.py) that compile without spills; unpacking
# 4-bit codes (NF4 lookups, zero points, double quantization) costs registers, so 128x128
# tiles spill there and 4-bit gets its own list.
_CONFIGS = {
    80: {
        "skinny": (
            QuantConfig(16, 64, 128, 4, 3, 4),
            QuantConfig(16, 64, 128, 4, 3, 8),
            QuantConfig(16, 128, 128, 4, 3, 4),
            QuantConfig(16, 32, 128, 4, 4, 8),
            QuantConfig(16, 64, 64, 4, 4, 16),
        ),
        "tiled8": (
            QuantConfig(128, 128, 64, 8, 3),
            QuantConfig(128, 64, 64, 4, 4),
            QuantConfig(64, 128, 64, 4, 4),
            QuantConfig(64, 64, 64, 4, 4),
        ),
        "tiled4": (
            QuantConfig(128, 64, 64, 8, 3),
            QuantConfig(64, 128, 64, 8, 3),
            QuantConfig(64, 64, 64, 4, 4),
        ),
    },
    90: {
        # Two stages at 64 columns: with three, triton 3.6 spills the NF4 lookups.
        "skinny": (
            QuantConfig(16, 64, 128, 4, 2, 4),
            QuantConfig(16, 64, 128, 4, 2, 8),
            QuantConfig(16, 128, 128, 4, 3, 4),
            QuantConfig(16, 32, 128, 4, 4, 8),
            QuantConfig(16, 64, 64, 4, 2, 16),
        ),
        "tiled8": (
            QuantConfig(128, 128, 64, 8, 4),
            QuantConfig(128, 64, 64, 4, 4),
            QuantConfig(64, 128, 64, 4, 4),
            QuantConfig(64, 64, 64, 4, 4),
            QuantConfig(64, 128, 128, 8, 3),
        ),
        "tiled4": (
            QuantConfig(128, 64, 64, 8, 4),
            QuantConfig(64, 128, 64, 4, 4),
            QuantConfig(64, 64, 64, 4, 4),
            QuantConfig(64, 128, 128, 8, 3),
        ),
    },
}
_W8A8_CONFIGS = {
    80: (
        QuantConfig(128, 128, 64, 8, 3),
        QuantConfig(64, 128, 64, 4, 4),
        QuantConfig(64, 64, 64, 4, 4),
        QuantConfig(16, 64, 128, 4, 4),
    ),
    90: (
        QuantConfig(128, 128, 128, 8, 3),
        QuantConfig(128, 128, 64, 8, 4),
        QuantConfig(64, 128, 64, 4, 4),
        QuantConfig(16, 64, 128, 4, 4),
    ),
}
# Under the interpreter: one small tile (tl.dot needs 16 per side), split in two on the
# skinny path so the partial sums are exercised.
_INTERPRETER = {"skinny": QuantConfig(16, 32, 64, 4, 1, 2), "tiled": QuantConfig(32, 32, 64, 4, 1)}
_QUANTIZE_BLOCK = 1024


def _generation(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(m), 4096)


@functools.cache
def _autotuned(generation: int, path: str, group: int, wide: bool):
    configs = [cfg.triton_config(group, wide=wide) for cfg in _CONFIGS[generation][path]]
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"])(_quant_matmul_kernel)


@functools.cache
def _w8a8_autotuned(generation: int):
    configs = [cfg.triton_config(0, split=False) for cfg in _W8A8_CONFIGS[generation]]
    return triton.autotune(configs, key=["M_BUCKET", "N", "K"])(_w8a8_kernel)


def quant_matmul_fwd(
    x,
    qweight,
    scales,
    zeros,
    scales2,
    scales_mean,
    code,
    bias,
    bits: int,
    nf4: bool,
    group: int,
    n: int,
    lora=None,
):
    """``x @ W.T + bias`` for x (M, K) fp16/bf16 with a unit stride along K and W (n, K)
    quantized as :mod:`fastlm.ops.quant_formats` lays it out (``group`` 0: per-channel int8).
    ``lora``: ``(t, b, scale)`` adds ``scale * t @ b.T`` (QLoRA's update). Returns (M, n)
    in x's dtype."""
    m, k = x.shape
    y = x.new_empty((m, n))
    if y.numel() == 0:
        return y
    path = "skinny" if m <= SKINNY_M else f"tiled{bits}"
    wide = k % 64 == 0  # 4-bit tiles are 64 wide unless K is an odd multiple of 32
    # Absent tensors are passed as y: the constexpr flags keep them untouched.
    tensors = (
        qweight,
        scales,
        y if zeros is None else zeros,
        y if scales2 is None else scales2,
        y if scales_mean is None else scales_mean,
        y if code is None else code,
        y if bias is None else bias,
    )
    # The skinny path adds a LoRA update after its split-K sum (M <= 16 rows: a tiny GEMM);
    # the tiled one in its epilogue.
    fused = lora if path != "skinny" else None
    t, lora_b, lora_scale = fused if fused is not None else (y, y, 0.0)
    r = t.shape[1] if fused is not None else 0
    flags = dict(
        BITS=bits,
        NF4=nf4,
        HAS_ZEROS=zeros is not None,
        DOUBLE_QUANT=scales2 is not None,
        HAS_B=bias is not None,
        PARTIAL=path == "skinny",
        GROUP=max(group, 1),
        LORA_R=lora_rank_block(r),
    )
    max_split = max(
        c.split_k
        for c in (*_CONFIGS[80]["skinny"], *_CONFIGS[90]["skinny"], _INTERPRETER["skinny"])
    )
    out = x.new_empty((max_split, m, n), dtype=torch.float32) if path == "skinny" else y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    if x.device.type == "cuda":
        kernel = _autotuned(_generation(x.device), path, group, wide)
        on_device(kernel, x.device)[grid](
            x, *tensors, out, t, lora_b, m, n, k, _m_bucket(m), x.stride(0), lora_scale, r, **flags
        )
        split = kernel.best_config.kwargs["SPLIT_K"]
    else:
        cfg = _INTERPRETER["skinny" if path == "skinny" else "tiled"]
        split = cfg.split_k
        meta = dict(
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.tile_k(group, wide), SPLIT_K=split
        )
        on_device(_quant_matmul_kernel, x.device)[grid(meta)](
            x,
            *tensors,
            out,
            t,
            lora_b,
            m,
            n,
            k,
            _m_bucket(m),
            x.stride(0),
            lora_scale,
            r,
            **flags,
            **meta,
            num_warps=cfg.num_warps,
        )
    if path == "skinny":
        total = out[:split].sum(dim=0)
        if bias is not None:
            total += bias.float()
        if lora is not None:
            total += lora[2] * (lora[0].float() @ lora[1].float().T)
        y.copy_(total)
    return y


def quantize_rows(x):
    """``(xq, sx)``: x (M, K) quantized per row to int8, ``x ~ xq * sx[:, None]``."""
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block = min(_QUANTIZE_BLOCK, triton.next_power_of_2(k))
        on_device(_quantize_rows_kernel, x.device)[(m,)](x, xq, xs, k, x.stride(0), BLOCK=block)
    return xq, xs


def w8a8_matmul_fwd(xq, xs, wq, ws, bias, out_dtype: torch.dtype):
    """``(xq * xs) @ (wq * ws).T + bias`` on int8 tensor cores (int32 accumulation)."""
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if y.numel() == 0:
        return y
    args = (xq, xs, wq, ws, y if bias is None else bias, y, m, n, k, _m_bucket(m))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))

    if xq.device.type == "cuda":
        kernel = _w8a8_autotuned(_generation(xq.device))
        on_device(kernel, xq.device)[grid](*args, HAS_B=bias is not None)
    else:
        cfg = _INTERPRETER["tiled"]
        meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k)
        on_device(_w8a8_kernel, xq.device)[grid(meta)](
            *args, HAS_B=bias is not None, **meta, num_warps=cfg.num_warps
        )
    return y


# Formats compiled by the static check: each weight layout in its heaviest form (zero points,
# NF4 with double quantization), int4 at the smallest and largest group (BLOCK_K follows).
_CHECKED_FORMATS = {
    "int8": dict(BITS=8, NF4=False, HAS_ZEROS=False, DOUBLE_QUANT=False, GROUP=1),
    "int4-g128": dict(BITS=4, NF4=False, HAS_ZEROS=True, DOUBLE_QUANT=False, GROUP=128),
    "int4-g32": dict(BITS=4, NF4=False, HAS_ZEROS=True, DOUBLE_QUANT=False, GROUP=32),
    "nf4-g64-dq": dict(BITS=4, NF4=True, HAS_ZEROS=False, DOUBLE_QUANT=True, GROUP=64),
}


def compile_specs() -> list[KernelSpec]:
    """Every autotuning candidate per generation and path for each checked format (bf16;
    fp16 for the first candidate), the W8A8 GEMM's candidates, and the row quantizer."""
    specs = []
    for generation, by_path in _CONFIGS.items():
        for path, configs in by_path.items():
            for fmt, flags in _CHECKED_FORMATS.items():
                if path != "skinny" and path != f"tiled{flags['BITS']}":
                    continue
                for i, cfg in enumerate(configs):
                    for dtype in ("bf16", "fp16") if i == 0 else ("bf16",):
                        specs.append(_spec(generation, path, fmt, flags, cfg, dtype))
        for cfg in _W8A8_CONFIGS[generation]:
            specs.append(
                KernelSpec(
                    label=f"w8a8 bf16 {cfg.block_m}x{cfg.block_n}x{cfg.block_k} "
                    f"w={cfg.num_warps} s={cfg.num_stages}",
                    kernel=_w8a8_kernel,
                    signature=dict(
                        XQ="*i8",
                        XS="*fp32",
                        WQ="*i8",
                        WS="*fp32",
                        B="*bf16",
                        Y="*bf16",
                        M="i32",
                        N="i32",
                        K="i32",
                        M_BUCKET="i32",
                    ),
                    constexprs=dict(
                        HAS_B=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k
                    ),
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    aligned=("XQ", "XS", "WQ", "WS", "B", "Y", "N", "K"),
                    needs_wgmma=cfg.block_m >= 64,
                    capabilities=(generation,),
                )
            )
    for dtype in ("bf16", "fp16"):
        specs.append(
            KernelSpec(
                label=f"quantize_rows {dtype} block={_QUANTIZE_BLOCK}",
                kernel=_quantize_rows_kernel,
                signature=dict(X=f"*{dtype}", XQ="*i8", XS="*fp32", K="i32", stride_xm="i32"),
                constexprs=dict(BLOCK=_QUANTIZE_BLOCK),
                num_warps=4,
                aligned=("X", "XQ", "XS", "K", "stride_xm"),
            )
        )
    return specs


def _spec(
    generation: int, path: str, fmt: str, flags: dict, cfg: QuantConfig, dtype: str
) -> KernelSpec:
    weight = "*i8" if flags["BITS"] == 8 else "*u8"
    scale = "*fp32" if flags["BITS"] == 8 else ("*i8" if flags["DOUBLE_QUANT"] else "*fp16")
    partial = path == "skinny"
    signature = dict(
        X=f"*{dtype}",
        QW=weight,
        S=scale,
        Z="*u8",
        S2="*fp32",
        SMEAN="*fp32",
        CODE="*fp32",
        B=f"*{dtype}",
        Y="*fp32" if partial else f"*{dtype}",
        T=f"*{dtype}",
        LB=f"*{dtype}",
        M="i32",
        N="i32",
        K="i32",
        M_BUCKET="i32",
        stride_xm="i32",
        lora_scale="fp32",
        R="i32",
    )
    group = flags["GROUP"] if flags["BITS"] == 4 else 0
    constexprs = dict(
        flags,
        HAS_B=not partial,
        PARTIAL=partial,
        SPLIT_K=cfg.split_k,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.tile_k(group),
        LORA_R=16 if flags["BITS"] == 4 and not partial else 0,  # with QLoRA's epilogue
    )
    return KernelSpec(
        label=f"quant_matmul {path} {fmt} {dtype} {cfg.block_m}x{cfg.block_n}x"
        f"{cfg.tile_k(group)} split={cfg.split_k} w={cfg.num_warps} s={cfg.num_stages}",
        kernel=_quant_matmul_kernel,
        signature=signature,
        constexprs=constexprs,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        aligned=("X", "QW", "S", "Z", "B", "Y", "N", "K", "stride_xm"),
        # Tensor cores everywhere (mma); warpgroup MMA needs 64-row tiles.
        needs_wgmma=not partial and cfg.block_m >= 64,
        capabilities=(generation,),
    )
