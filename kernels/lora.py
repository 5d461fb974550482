"""The LoRA epilogue shared by the GEMM kernels (:mod:`.mlp`, :mod:`.quant`).

A LoRA layer computes ``y = x @ W.T + scale * t @ B.T`` with ``t = dropout(x) @ A.T``
(M, r), a skinny product done beforehand; the GEMM adds the rank-r term to its accumulator
tile before the epilogue writes y, so the update costs one small ``tl.dot`` per tile and no
extra pass over y.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_update(T, LB, rows_in, cols_in, R, LORA_R: tl.constexpr):
    """``t[rows] @ b[cols].T`` for one (rows, cols) tile, fp32: T (M, R) and LB (N, R)
    row-major; ``LORA_R`` is R rounded up to a power of two >= 16 (``tl.dot``'s minimum)."""
    rs = tl.arange(0, LORA_R)
    t = tl.load(T + rows_in[:, None] * R + rs[None, :], mask=rs[None, :] < R, other=0.0)
    b = tl.load(LB + cols_in[None, :] * R + rs[:, None], mask=rs[:, None] < R, other=0.0)
    return tl.dot(t, b)


def lora_rank_block(r: int) -> int:
    """``LORA_R`` for rank ``r`` (0: no LoRA term)."""
    return max(16, triton.next_power_of_2(r)) if r else 0
