"""Rotary position embeddings (RoPE) in Triton, forward and backward.

Contract:

* ``x`` is (B, S, H, D) with unit stride on D and any other strides. The first
  ``rotary_dim = 2 * R2`` features of each head are rotated, the rest passed through
  (copied when the output is a new tensor, left alone in place).
* ``cos``/``sin`` are (P, R2) tables of any float dtype, unit stride on R2: entry
  ``[p, i]`` is the angle of pair ``i`` at position ``p``.
* Pairs are ``(i, i + R2)`` (half-split, GPT-NeoX/Llama) or ``(2i, 2i + 1)`` (interleaved,
  GPT-J). Pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``, in fp32.
* The position of token ``(b, s)`` is ``s + offset`` (a scalar), ``s + offsets[b]`` (an int
  tensor (B,), KV-cache decoding with ragged lengths) or ``position_ids[b, s]``.
* ``conj`` negates the angle: the backward of a rotation is the same kernel with ``conj``
  set, applied to the gradient.

One program handles one token and ``BLOCK_H`` heads, so each cos/sin row is read once per
token and every load is a contiguous run of the head dim (128-bit wide when aligned).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

# Elements of x one program rotates at once (BLOCK_H heads of the rotary dim).
TILE_ELEMENTS = 2048
POS_OFFSET, POS_OFFSETS, POS_IDS = 0, 1, 2


@triton.jit
def _rotate(a, b, cos, sin):
    """The rotated pair (a cos - b sin, b cos + a sin), fp32."""
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _rotary_kernel(
    X,
    Y,
    COS,
    SIN,
    POS,
    S,
    H,
    R2,
    D,
    offset,
    stride_xb,
    stride_xs,
    stride_xh,
    stride_yb,
    stride_ys,
    stride_yh,
    stride_cos,
    stride_sin,
    stride_pb,
    stride_ps,
    POS_MODE: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    CONJ: tl.constexpr,
    COPY_REST: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_R2: tl.constexpr,
    BLOCK_REST: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // S
    s = token % S
    if POS_MODE == 0:
        pos = s + offset
    elif POS_MODE == 1:
        pos = s + tl.load(POS + b).to(tl.int64)
    else:
        pos = tl.load(POS + b * stride_pb + s * stride_ps).to(tl.int64)

    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < H
    heads = heads.to(tl.int64)
    i = tl.arange(0, BLOCK_R2)
    mask = head_mask[:, None] & (i < R2)[None, :]
    cos = tl.load(COS + pos * stride_cos + i, mask=i < R2, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(SIN + pos * stride_sin + i, mask=i < R2, other=0.0).to(tl.float32)[None, :]
    if CONJ:
        sin = -sin
    x_row = X + b * stride_xb + s * stride_xs + heads[:, None] * stride_xh
    y_row = Y + b * stride_yb + s * stride_ys + heads[:, None] * stride_yh
    if INTERLEAVED:
        # Load the 2*R2 features contiguously and split them into (even, odd) lanes, so the
        # load stays wide instead of two stride-2 gathers.
        j = tl.arange(0, 2 * BLOCK_R2)
        mask2 = head_mask[:, None] & (j < 2 * R2)[None, :]
        x = tl.load(x_row + j[None, :], mask=mask2, other=0.0).to(tl.float32)
        a, bb = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_R2, 2)))
        ya, yb = _rotate(a, bb, cos, sin)
        y = tl.reshape(tl.join(ya, yb), (BLOCK_H, 2 * BLOCK_R2))
        tl.store(y_row + j[None, :], y.to(Y.dtype.element_ty), mask=mask2)
    else:
        a = tl.load(x_row + i[None, :], mask=mask, other=0.0).to(tl.float32)
        bb = tl.load(x_row + R2 + i[None, :], mask=mask, other=0.0).to(tl.float32)
        ya, yb = _rotate(a, bb, cos, sin)
        tl.store(y_row + i[None, :], ya.to(Y.dtype.element_ty), mask=mask)
        tl.store(y_row + R2 + i[None, :], yb.to(Y.dtype.element_ty), mask=mask)
    if COPY_REST:
        for start in range(2 * R2, D, BLOCK_REST):
            c = start + tl.arange(0, BLOCK_REST)
            m = head_mask[:, None] & (c < D)[None, :]
            rest = tl.load(x_row + c[None, :], mask=m)
            tl.store(y_row + c[None, :], rest, mask=m)


# Memoized: triton.next_power_of_2 goes through Triton's constexpr-function wrapper (several
# microseconds a call in Triton 3.8), and this runs on every launch.
@functools.lru_cache(maxsize=1024)
def block_config(r2: int, h: int, d: int) -> tuple[int, int, int, int]:
    """``(BLOCK_H, BLOCK_R2, BLOCK_REST, num_warps)`` for ``h`` heads of ``d`` features with
    ``2 * r2`` rotated: ~TILE_ELEMENTS elements of x per program, 8 per thread per load."""
    block_r2 = max(8, triton.next_power_of_2(r2))
    block_h = max(1, min(triton.next_power_of_2(h), TILE_ELEMENTS // (2 * block_r2)))
    block_rest = max(8, min(triton.next_power_of_2(max(d - 2 * r2, 1)), 128))
    num_warps = max(1, min(block_h * 2 * block_r2 // 256, 8))
    return block_h, block_r2, block_rest, num_warps


def rotary_apply(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    offset: int,
    interleaved: bool,
    conj: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate ``x`` (B, S, H, D) into ``out`` (a new contiguous tensor when ``None``; ``x``
    itself for in place). ``positions`` is ``None`` (positions ``s + offset``), an int tensor
    (B,) of per-sequence offsets, or position ids (B, S) with any strides. Inputs are
    validated by ``fastlm.ops``; here only the layout is.
    """
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    bsz, s, h, d = x.shape
    r2 = cos.shape[-1]
    inplace = out is x
    y = torch.empty((bsz, s, h, d), dtype=x.dtype, device=x.device) if out is None else out
    assert y.stride(-1) == 1
    if y.numel() == 0:
        return y
    if positions is None:
        mode, pos, stride_pb, stride_ps = POS_OFFSET, cos, 0, 0
    elif positions.dim() == 1:
        mode, pos, stride_pb, stride_ps = POS_OFFSETS, positions, 0, 0
    else:
        mode, pos = POS_IDS, positions
        stride_pb, stride_ps = positions.stride(0), positions.stride(1)
    block_h, block_r2, block_rest, num_warps = block_config(r2, h, d)
    kernel = on_device(_rotary_kernel, x.device)
    kernel[(bsz * s, -(-h // block_h))](
        x,
        y,
        cos,
        sin,
        pos,
        s,
        h,
        r2,
        d,
        offset,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        cos.stride(0),
        sin.stride(0),
        stride_pb,
        stride_ps,
        POS_MODE=mode,
        INTERLEAVED=interleaved,
        CONJ=conj,
        COPY_REST=not inplace and 2 * r2 < d,
        BLOCK_H=block_h,
        BLOCK_R2=block_r2,
        BLOCK_REST=block_rest,
        num_warps=num_warps,
    )
    return y


# ---------------------------------------------------------------------------------------------
# Static compile check.

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (head_dim, rotary_dim, heads): Llama/Mistral (128), GPT-NeoX/Pythia partial (25%), GPT-J
# (64 of 256, interleaved), small heads (64), decoding with few KV heads.
_SHIPPED = ((128, 128, 32), (128, 32, 32), (256, 64, 16), (64, 64, 12), (128, 128, 8))


def compile_specs() -> list[KernelSpec]:
    """Both conventions at the shipped head shapes in bf16 (forward; the backward is the same
    kernel with CONJ), fp16/fp32 at head_dim 128, and each position mode once."""
    specs = []
    for d, rot, h in _SHIPPED:
        for interleaved in (False, True):
            dtypes = _TRITON_DTYPE if (d, rot, h) == (128, 128, 32) else (torch.bfloat16,)
            for dtype in dtypes:
                specs.append(_spec(d, rot, h, _TRITON_DTYPE[dtype], interleaved, POS_OFFSET))
    for mode in (POS_OFFSETS, POS_IDS):
        specs.append(_spec(128, 128, 32, "bf16", False, mode, conj=True))
    return specs


def _spec(
    d: int, rot: int, h: int, t: str, interleaved: bool, mode: int, conj: bool = False
) -> KernelSpec:
    block_h, block_r2, block_rest, num_warps = block_config(rot // 2, h, d)
    style = "interleaved" if interleaved else "half"
    pos = ("offset", "offsets", "position_ids")[mode]
    return KernelSpec(
        label=f"rotary {t} d={d} rot={rot} h={h} {style} {pos} tile={block_h}x{2 * block_r2} "
        f"w={num_warps} {'bwd' if conj else 'fwd'}",
        kernel=_rotary_kernel,
        signature={
            "X": f"*{t}",
            "Y": f"*{t}",
            "COS": "*fp32",
            "SIN": "*fp32",
            "POS": "*fp32" if mode == POS_OFFSET else "*i32",
            "S": "i32",
            "H": "i32",
            "R2": "i32",
            "D": "i32",
            "offset": "i32",
            "stride_xb": "i32",
            "stride_xs": "i32",
            "stride_xh": "i32",
            "stride_yb": "i32",
            "stride_ys": "i32",
            "stride_yh": "i32",
            "stride_cos": "i32",
            "stride_sin": "i32",
            "stride_pb": "i32",
            "stride_ps": "i32",
        },
        constexprs=dict(
            POS_MODE=mode,
            INTERLEAVED=interleaved,
            CONJ=conj,
            COPY_REST=rot < d,
            BLOCK_H=block_h,
            BLOCK_R2=block_r2,
            BLOCK_REST=block_rest,
        ),
        num_warps=num_warps,
        aligned=(
            "X",
            "Y",
            "COS",
            "SIN",
            "R2",
            "D",
            "stride_xb",
            "stride_xs",
            "stride_xh",
            "stride_yb",
            "stride_ys",
            "stride_yh",
            "stride_cos",
            "stride_sin",
        ),
    )
