"""Cross-entropy over (N, V) logits in Triton: per-row loss, log-sum-exp and logits gradient.

Contract (``fastlm.ops.cross_entropy`` builds on it):

* ``logits`` is (N, V), bf16/fp16/fp32, unit column stride and any row stride; the math is
  fp32. ``target`` is (N,) int64 class indices; rows whose target equals ``ignore_index``
  get loss 0, and gradient 0. A target outside ``[0, V)`` (and not ``ignore_index``) gives a
  NaN loss rather than reading out of bounds.
* Per row, with ``lse = log(sum_j exp(x_j))``, smoothing ``eps`` and z-loss weight ``z``::

      loss = (1 - eps) * (lse - x_target) + eps * (lse - mean_j x_j) + z * lse**2
      dloss/dx_j = (1 + 2 z lse) * softmax_j - (1 - eps) * [j == target] - eps / V

  which is ``torch.nn.functional.cross_entropy(..., reduction="none",
  label_smoothing=eps)`` plus the z-loss. ``loss`` and ``lse`` are fp32, shape (N,).
* The forward reads each row twice at most: pass 1 merges block maxima and exp-sums online
  (and sums the row for label smoothing); with ``dlogits`` given, pass 2 writes the
  gradient of the row's own loss (scale 1 per row). ``dlogits`` may be ``logits`` itself:
  each program reads a block of its own row before it overwrites it, so the gradient can
  replace the logits in place (Liger-style) when the caller no longer needs them; the fused
  linear cross-entropy does this with its temporary logits chunk, saving a chunk-sized
  buffer. The plain ``cross_entropy`` op never writes into its input.
* The backward reads the saved ``lse`` and a per-row fp32 ``dloss`` (any reduction's
  gradient reaches the rows as that), and writes ``dlogits`` in one pass.
* Row offsets are 64-bit: ``row * stride`` may pass 2**31 elements.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

# Columns per block of the row loop. 4096 fp32 values over 8 warps is 16 a thread: the
# forward's second pass keeps x, the softmax and the gradient live without spilling.
MAX_BLOCK_V = 4096


@triton.jit
def _grad_block(
    x,
    cols,
    mask,
    target,
    shift,
    inv_sum,
    lse,
    scale,
    smoothing,
    z_loss,
    V,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
):
    """``scale * dloss/dx`` for one block of a row (see the module docstring); the softmax
    is ``exp(x - shift) * inv_sum``: ``(max, 1 / exp-sum)`` in the forward, which avoids
    the rounding of ``lse`` (``(lse, 1)`` in the backward, which only has ``lse``)."""
    p = tl.exp(x - shift) * inv_sum
    if HAS_Z:
        p = p * (1.0 + 2.0 * z_loss * lse)
    if HAS_SMOOTHING:
        g = p - tl.where(cols == target, 1.0 - smoothing, 0.0) - smoothing / V
    else:
        g = p - tl.where(cols == target, 1.0, 0.0)
    return tl.where(mask, g * scale, 0.0)


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits,
    Target,
    Loss,
    Lse,
    DLogits,
    stride_l,
    stride_d,
    V,
    ignore_index,
    smoothing,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    target = tl.load(Target + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: running max and exp-sum, merged block by block (and the row sum for smoothing).
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    d = 0.0
    row_sum = 0.0
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(logits + c, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(d)
    x_target = tl.load(logits + tl.where(in_range, target, 0)).to(tl.float32)
    loss = lse - x_target
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (lse - row_sum / V)
    if HAS_Z:
        loss += z_loss * lse * lse
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(Loss + row, tl.where(valid, loss, 0.0))
    tl.store(Lse + row, lse)
    if COMPUTE_GRAD:
        # Pass 2: the gradient of this row's loss; it may overwrite the logits just read.
        scale = tl.where(valid, 1.0, 0.0)
        inv_d = 1.0 / d
        dlogits = DLogits + row * stride_d
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            x = tl.load(logits + c, mask=mask, other=0.0).to(tl.float32)
            g = _grad_block(
                x, c, mask, target, m, inv_d, lse, scale, smoothing, z_loss, V, HAS_SMOOTHING, HAS_Z
            )
            tl.store(dlogits + c, g.to(DLogits.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits,
    Target,
    Lse,
    DLoss,
    DLogits,
    stride_l,
    stride_d,
    V,
    ignore_index,
    smoothing,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    dlogits = DLogits + row * stride_d
    target = tl.load(Target + row)
    lse = tl.load(Lse + row)
    scale = tl.where(target != ignore_index, tl.load(DLoss + row), 0.0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x = tl.load(logits + c, mask=mask, other=0.0).to(tl.float32)
        g = _grad_block(
            x, c, mask, target, lse, 1.0, lse, scale, smoothing, z_loss, V, HAS_SMOOTHING, HAS_Z
        )
        tl.store(dlogits + c, g.to(DLogits.dtype.element_ty), mask=mask)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_v: int
    num_warps: int


def block_config(v: int) -> BlockConfig:
    """Columns per block for rows of ``v`` classes: the whole row up to ``MAX_BLOCK_V``,
    at about 16 fp32 values a thread."""
    block_v = max(256, min(triton.next_power_of_2(v), MAX_BLOCK_V))
    return BlockConfig(block_v, max(1, min(block_v // 512, 8)))


def _flags(smoothing: float, z_loss: float) -> dict:
    return dict(HAS_SMOOTHING=smoothing != 0.0, HAS_Z=z_loss != 0.0)


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    dlogits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse)`` (fp32, (N,)) of ``logits`` (N, V); with ``dlogits`` (N, V)
    given (which may be ``logits`` itself), also writes each row's loss gradient there.
    Inputs are validated by ``fastlm.ops``; here only the layout is."""
    assert logits.stride(-1) == 1 and (dlogits is None or dlogits.stride(-1) == 1)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    cfg = block_config(v)
    kernel = on_device(_cross_entropy_fwd_kernel, logits.device)
    kernel[(n,)](
        logits,
        target,
        loss,
        lse,
        logits if dlogits is None else dlogits,
        logits.stride(0),
        logits.stride(0) if dlogits is None else dlogits.stride(0),
        v,
        ignore_index,
        smoothing,
        z_loss,
        COMPUTE_GRAD=dlogits is not None,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
        **_flags(smoothing, z_loss),
    )
    return loss, lse


def cross_entropy_bwd(
    dloss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dlogits`` (N, V, dtype of ``logits``) from the per-row fp32 gradient ``dloss``,
    written into ``out`` when given (which may be ``logits`` itself, as in the forward)."""
    assert logits.stride(-1) == 1 and (out is None or out.stride(-1) == 1)
    n, v = logits.shape
    dlogits = torch.empty((n, v), dtype=logits.dtype, device=logits.device) if out is None else out
    if n == 0:
        return dlogits
    cfg = block_config(v)
    kernel = on_device(_cross_entropy_bwd_kernel, logits.device)
    kernel[(n,)](
        logits,
        target,
        lse,
        dloss.float().contiguous(),
        dlogits,
        logits.stride(0),
        dlogits.stride(0),
        v,
        ignore_index,
        smoothing,
        z_loss,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
        **_flags(smoothing, z_loss),
    )
    return dlogits


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs() -> list[KernelSpec]:
    """Forward (loss only, and loss + in-place gradient) and backward, all features on, in
    bf16 at every block size 256..4096, plus fp16 and fp32 at the largest."""
    specs = []
    block = 256
    while block <= MAX_BLOCK_V:
        cfg = block_config(block)
        dtypes = _TRITON_DTYPE.values() if block == MAX_BLOCK_V else ("bf16",)
        for t in dtypes:
            common = dict(HAS_SMOOTHING=True, HAS_Z=True, BLOCK_V=cfg.block_v)
            for grad in (False, True):
                specs.append(
                    KernelSpec(
                        label=f"cross_entropy {t} block={cfg.block_v} w={cfg.num_warps} fwd"
                        + ("+grad" if grad else ""),
                        kernel=_cross_entropy_fwd_kernel,
                        signature={
                            "Logits": f"*{t}",
                            "Target": "*i64",
                            "Loss": "*fp32",
                            "Lse": "*fp32",
                            "DLogits": f"*{t}",
                            "stride_l": "i32",
                            "stride_d": "i32",
                            "V": "i32",
                            "ignore_index": "i32",
                            "smoothing": "fp32",
                            "z_loss": "fp32",
                        },
                        constexprs=dict(COMPUTE_GRAD=grad, **common),
                        num_warps=cfg.num_warps,
                        aligned=(
                            "Logits",
                            "Target",
                            "Loss",
                            "Lse",
                            "DLogits",
                            "stride_l",
                            "stride_d",
                            "V",
                        ),
                    )
                )
            specs.append(
                KernelSpec(
                    label=f"cross_entropy {t} block={cfg.block_v} w={cfg.num_warps} bwd",
                    kernel=_cross_entropy_bwd_kernel,
                    signature={
                        "Logits": f"*{t}",
                        "Target": "*i64",
                        "Lse": "*fp32",
                        "DLoss": "*fp32",
                        "DLogits": f"*{t}",
                        "stride_l": "i32",
                        "stride_d": "i32",
                        "V": "i32",
                        "ignore_index": "i32",
                        "smoothing": "fp32",
                        "z_loss": "fp32",
                    },
                    constexprs=common,
                    num_warps=cfg.num_warps,
                    aligned=(
                        "Logits",
                        "Target",
                        "Lse",
                        "DLoss",
                        "DLogits",
                        "stride_l",
                        "stride_d",
                        "V",
                    ),
                )
            )
        block *= 2
    return specs
