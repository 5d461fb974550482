"""Cross-entropy over (N, V) logits in Triton: per-row loss, log-sum-exp and logits gradient.

Contract (``fastlm.ops.cross_entropy`` builds on it):

* ``logits`` is (N, V), bf16/fp16/fp32, unit column stride and any row stride; the math is
  fp32. ``target`` is (N,) int64 class indices; rows whose target equals ``ignore_index``
  get loss 0, and gradient 0. A target outside ``[0, V)`` (and not ``ignore_index``) gives a
  NaN loss rather than reading out of bounds.
* Per row, with ``x`` the logits soft-capped when ``softcap`` is set (``softcap *
  tanh(raw / softcap)``), ``lse = log(sum_j exp(x_j))``, smoothing ``eps``, z-loss weight
  ``z``, class weights ``w`` (all 1 without ``weight``) and ``W = sum_j w_j``::

      loss = (1 - eps) w_t (lse - x_t) + eps / V * sum_j w_j (lse - x_j) + z w_t lse**2
      dloss/dx_j = ((1 - eps) w_t + eps W / V + 2 z lse w_t) * softmax_j
                   - (1 - eps) w_t [j == t] - eps w_j / V

  (times ``1 - tanh^2`` for the raw logits under a cap), which is
  ``torch.nn.functional.cross_entropy(x, t, w, reduction="none", label_smoothing=eps)``
  plus the z-loss. ``loss`` and ``lse`` are fp32, shape (N,). ``W`` is read from a 0-d
  device tensor (no host sync). With ``argmax`` given, the forward also writes each row's
  first maximal (capped) logit index, torch.argmax's tie rule, from its first pass.
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

# Columns per block of the row loop: 2048 fp32 values over 4 warps, 16 a thread. The
# forward's second pass keeps x, the softmax and the gradient live without spilling, with
# every feature on (class weights, soft cap, argmax) too; at 4096 over 8 warps Triton 3.6
# spilled that variant (the static check on sm_80 and sm_90).
MAX_BLOCK_V = 2048


@triton.jit
def _soft_cap(x, softcap):
    """``softcap * tanh(x / softcap)`` and ``tanh(x / softcap)`` (for the chain rule's
    ``1 - tanh^2``). Triton's interpreter has no libdevice tanh, so it is built from ``exp``:
    ``1 - 2 / (exp(2|u|) + 1)`` for ``|u| >= 0.7`` (``exp`` overflowing to inf gives 1, and
    the subtracted term, under 0.2, damps ``exp``'s rounding), and the Taylor series to
    ``u^25`` below, where that difference would cancel: within 1.5 ulp of tanh over the
    whole range in float32 (numpy emulation, 3M points), where ``1 - e`` forms lose up to
    5 ulp near 0."""
    u = x / softcap
    a = tl.abs(u)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    u2 = u * u
    # tanh's odd Taylor coefficients, u^25 down to u^1 (Horner): below |u| = 0.7 the
    # series' first omitted term is under 2^-29 of |u| (its radius is pi/2).
    p = 1.5918905069328964e-05
    p = -3.927832388331683e-05 + u2 * p
    p = 9.691537956929451e-05 + u2 * p
    p = -0.00023912911424355248 + u2 * p
    p = 0.000590027440945586 + u2 * p
    p = -0.0014558343870513183 + u2 * p
    p = 0.003592128036572481 + u2 * p
    p = -0.008863235529902197 + u2 * p
    p = 0.021869488536155203 + u2 * p
    p = -0.05396825396825397 + u2 * p
    p = 0.13333333333333333 + u2 * p
    p = -0.3333333333333333 + u2 * p
    p = 1.0 + u2 * p
    t = tl.where(a < 0.7, u * p, tl.where(u < 0, -big, big))
    return softcap * t, t


@triton.jit
def _grad_block(
    x,
    t_cap,
    cols,
    mask,
    target,
    shift,
    inv_sum,
    p_coef,
    target_coef,
    uniform,
    w,
    scale,
    HAS_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """``scale * dloss/dx`` for one block of a row (see the module docstring): with the
    softmax ``p = exp(x - shift) * inv_sum`` (``(max, 1 / exp-sum)`` in the forward, which
    avoids the rounding of ``lse``; ``(lse, 1)`` in the backward, which only has ``lse``),
    ``g = p_coef * p - target_coef * [j == target] - uniform * w_j``, times ``1 - tanh^2``
    of the soft cap."""
    p = tl.exp(x - shift) * inv_sum
    g = p * p_coef - tl.where(cols == target, target_coef, 0.0)
    if HAS_SMOOTHING:
        if HAS_WEIGHT:
            g = g - uniform * w
        else:
            g = g - uniform
    if SOFTCAP:
        g = g * (1.0 - t_cap * t_cap)
    return tl.where(mask, g * scale, 0.0)


@triton.jit
def _load_block(logits, c, mask, softcap, other, SOFTCAP: tl.constexpr):
    """One block of a row in fp32, soft-capped; ``other`` where masked (also after the cap,
    which would turn -inf into -softcap). Also returns the cap's tanh (x where no cap)."""
    x = tl.load(logits + c, mask=mask, other=other).to(tl.float32)
    t = x
    if SOFTCAP:
        x, t = _soft_cap(x, softcap)
        x = tl.where(mask, x, other)
    return x, t


@triton.jit
def _row_coefs(
    lse,
    w_t,
    w_sum,
    smoothing,
    z_loss,
    V,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """The gradient's per-row coefficients ``(p_coef, target_coef, uniform)``: ``p_coef =
    (1 - eps) w_t + eps / V * sum_j w_j + 2 z lse w_t``, which is ``1 + 2 z lse`` without
    class weights (taken as such: no rounding of ``(1 - eps) + eps``)."""
    target_coef = w_t
    uniform = 0.0
    if HAS_SMOOTHING:
        target_coef = (1.0 - smoothing) * w_t
        uniform = smoothing / V
    p_coef = 1.0
    if HAS_WEIGHT:
        p_coef = target_coef
        if HAS_SMOOTHING:
            p_coef += uniform * w_sum
    if HAS_Z:
        p_coef += 2.0 * z_loss * lse * w_t
    return p_coef, target_coef, uniform


@triton.jit
def _cross_entropy_fwd_kernel(
    Logits,
    Target,
    Weight,
    WSum,
    Loss,
    Lse,
    Argmax,
    DLogits,
    stride_l,
    stride_d,
    V,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    target = tl.load(Target + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < V)
    safe_target = tl.where(in_range, target, 0)
    cols = tl.arange(0, BLOCK_V)
    # Pass 1: running max and exp-sum, merged block by block (the row's (weighted) sum for
    # smoothing, and the first index of the maximum, torch.argmax's tie rule).
    m = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    d = 0.0
    row_sum = 0.0
    arg = 0
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x, _ = _load_block(logits, c, mask, softcap, float("-inf"), SOFTCAP)
        block_max = tl.max(x, axis=0)
        if COMPUTE_ARGMAX:
            first = tl.min(tl.where(x == block_max, c, V), axis=0)
            arg = tl.where(block_max > m, first, arg)
        m_new = tl.maximum(m, block_max)
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(Weight + c, mask=mask, other=0.0)
                # w is 0 past V, where x is -inf: mask x, not the product (0 * -inf).
                row_sum += tl.sum(w * tl.where(mask, x, 0.0), axis=0)
            else:
                row_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
    lse = m + tl.log(d)
    x_target = tl.load(logits + safe_target).to(tl.float32)
    if SOFTCAP:
        x_target, _ = _soft_cap(x_target, softcap)
    w_t = 1.0
    w_sum = V * 1.0
    if HAS_WEIGHT:
        w_t = tl.load(Weight + safe_target)
        w_sum = tl.load(WSum)
    loss = w_t * (lse - x_target)
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + smoothing * (lse * w_sum - row_sum) / V
    if HAS_Z:
        loss += z_loss * lse * lse * w_t
    loss = tl.where(in_range, loss, float("nan"))
    tl.store(Loss + row, tl.where(valid, loss, 0.0))
    tl.store(Lse + row, lse)
    if COMPUTE_ARGMAX:
        tl.store(Argmax + row, arg)
    if COMPUTE_GRAD:
        # Pass 2: the gradient of this row's loss; it may overwrite the logits just read.
        scale = tl.where(valid, 1.0, 0.0)
        p_coef, target_coef, uniform = _row_coefs(
            lse, w_t, w_sum, smoothing, z_loss, V, HAS_SMOOTHING, HAS_Z, HAS_WEIGHT
        )
        inv_d = 1.0 / d
        dlogits = DLogits + row * stride_d
        for start in range(0, V, BLOCK_V):
            c = start + cols
            mask = c < V
            x, t_cap = _load_block(logits, c, mask, softcap, 0.0, SOFTCAP)
            w = 1.0
            if HAS_WEIGHT:
                w = tl.load(Weight + c, mask=mask, other=0.0)
            g = _grad_block(
                x,
                t_cap,
                c,
                mask,
                target,
                m,
                inv_d,
                p_coef,
                target_coef,
                uniform,
                w,
                scale,
                HAS_SMOOTHING,
                HAS_WEIGHT,
                SOFTCAP,
            )
            tl.store(dlogits + c, g.to(DLogits.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_bwd_kernel(
    Logits,
    Target,
    Weight,
    WSum,
    Lse,
    DLoss,
    DLogits,
    stride_l,
    stride_d,
    V,
    ignore_index,
    smoothing,
    z_loss,
    softcap,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits = Logits + row * stride_l
    dlogits = DLogits + row * stride_d
    target = tl.load(Target + row)
    lse = tl.load(Lse + row)
    scale = tl.where(target != ignore_index, tl.load(DLoss + row), 0.0)
    w_t = 1.0
    w_sum = V * 1.0
    if HAS_WEIGHT:
        w_t = tl.load(Weight + tl.where((target >= 0) & (target < V), target, 0))
        w_sum = tl.load(WSum)
    p_coef, target_coef, uniform = _row_coefs(
        lse, w_t, w_sum, smoothing, z_loss, V, HAS_SMOOTHING, HAS_Z, HAS_WEIGHT
    )
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        mask = c < V
        x, t_cap = _load_block(logits, c, mask, softcap, 0.0, SOFTCAP)
        w = 1.0
        if HAS_WEIGHT:
            w = tl.load(Weight + c, mask=mask, other=0.0)
        g = _grad_block(
            x,
            t_cap,
            c,
            mask,
            target,
            lse,
            1.0,
            p_coef,
            target_coef,
            uniform,
            w,
            scale,
            HAS_SMOOTHING,
            HAS_WEIGHT,
            SOFTCAP,
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


def _flags(smoothing: float, z_loss: float, weight, softcap: float) -> dict:
    return dict(
        HAS_SMOOTHING=smoothing != 0.0,
        HAS_Z=z_loss != 0.0,
        HAS_WEIGHT=weight is not None,
        SOFTCAP=softcap != 0.0,
    )


def _weights(weight: torch.Tensor | None, fallback: torch.Tensor):
    """Class weights as fp32 and their sum (a 0-d device tensor: no host sync); the
    fallback stands in for both pointers when there are none (never read)."""
    if weight is None:
        return fallback, fallback
    w = weight.float().contiguous()
    return w, w.sum()


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    smoothing: float,
    z_loss: float,
    dlogits: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    softcap: float = 0.0,
    argmax: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(loss, lse)`` (fp32, (N,)) of ``logits`` (N, V); with ``dlogits`` (N, V)
    given (which may be ``logits`` itself), also writes each row's loss gradient there.
    ``weight``: (V,) class weights; ``softcap``: the cap (0: none); ``argmax``: an (N,)
    int32 tensor that receives each row's first maximal (capped) logit index.
    Inputs are validated by ``fastlm.ops``; here only the layout is."""
    assert logits.stride(-1) == 1 and (dlogits is None or dlogits.stride(-1) == 1)
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss, lse
    cfg = block_config(v)
    w, w_sum = _weights(weight, loss)
    kernel = on_device(_cross_entropy_fwd_kernel, logits.device)
    kernel[(n,)](
        logits,
        target,
        w,
        w_sum,
        loss,
        lse,
        loss if argmax is None else argmax,
        logits if dlogits is None else dlogits,
        logits.stride(0),
        logits.stride(0) if dlogits is None else dlogits.stride(0),
        v,
        ignore_index,
        smoothing,
        z_loss,
        softcap,
        COMPUTE_ARGMAX=argmax is not None,
        COMPUTE_GRAD=dlogits is not None,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
        **_flags(smoothing, z_loss, weight, softcap),
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
    *,
    weight: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """``dlogits`` (N, V, dtype of ``logits``) from the per-row fp32 gradient ``dloss``,
    written into ``out`` when given (which may be ``logits`` itself, as in the forward)."""
    assert logits.stride(-1) == 1 and (out is None or out.stride(-1) == 1)
    n, v = logits.shape
    dlogits = torch.empty((n, v), dtype=logits.dtype, device=logits.device) if out is None else out
    if n == 0:
        return dlogits
    cfg = block_config(v)
    w, w_sum = _weights(weight, lse)
    kernel = on_device(_cross_entropy_bwd_kernel, logits.device)
    kernel[(n,)](
        logits,
        target,
        w,
        w_sum,
        lse,
        dloss.float().contiguous(),
        dlogits,
        logits.stride(0),
        dlogits.stride(0),
        v,
        ignore_index,
        smoothing,
        z_loss,
        softcap,
        BLOCK_V=cfg.block_v,
        num_warps=cfg.num_warps,
        **_flags(smoothing, z_loss, weight, softcap),
    )
    return dlogits


_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_specs() -> list[KernelSpec]:
    """Forward (loss only, and loss + in-place gradient) and backward, all features on
    (smoothing, z-loss, class weights, soft cap, argmax), in bf16 at every block size
    256..4096, plus fp16 and fp32 at the largest; and the plain loss (every feature off) in
    bf16 at the largest, the common training call."""
    specs = []
    features = dict(HAS_SMOOTHING=True, HAS_Z=True, HAS_WEIGHT=True, SOFTCAP=True)
    plain = dict(HAS_SMOOTHING=False, HAS_Z=False, HAS_WEIGHT=False, SOFTCAP=False)
    block = 256
    while block <= MAX_BLOCK_V:
        cfg = block_config(block)
        dtypes = _TRITON_DTYPE.values() if block == MAX_BLOCK_V else ("bf16",)
        for t in dtypes:
            variants = [("all", features)]
            if block == MAX_BLOCK_V and t == "bf16":
                variants.append(("plain", plain))
            for name, flags in variants:
                specs += _specs(t, cfg, name, flags)
        block *= 2
    return specs


def _specs(t: str, cfg: BlockConfig, name: str, flags: dict) -> list[KernelSpec]:
    label = f"cross_entropy {t} block={cfg.block_v} w={cfg.num_warps} {name}"
    common = dict(BLOCK_V=cfg.block_v, **flags)
    scalars = {"V": "i32", "ignore_index": "i32", "smoothing": "fp32", "z_loss": "fp32"}
    scalars["softcap"] = "fp32"
    specs = []
    for grad in (False, True):
        specs.append(
            KernelSpec(
                label=f"{label} fwd" + ("+grad" if grad else ""),
                kernel=_cross_entropy_fwd_kernel,
                signature={
                    "Logits": f"*{t}",
                    "Target": "*i64",
                    "Weight": "*fp32",
                    "WSum": "*fp32",
                    "Loss": "*fp32",
                    "Lse": "*fp32",
                    "Argmax": "*i32",
                    "DLogits": f"*{t}",
                    "stride_l": "i32",
                    "stride_d": "i32",
                    **scalars,
                },
                constexprs=dict(COMPUTE_ARGMAX=flags["HAS_WEIGHT"], COMPUTE_GRAD=grad, **common),
                num_warps=cfg.num_warps,
                aligned=(
                    "Logits",
                    "Target",
                    "Weight",
                    "Loss",
                    "Lse",
                    "Argmax",
                    "DLogits",
                    "stride_l",
                    "stride_d",
                    "V",
                ),
            )
        )
    specs.append(
        KernelSpec(
            label=f"{label} bwd",
            kernel=_cross_entropy_bwd_kernel,
            signature={
                "Logits": f"*{t}",
                "Target": "*i64",
                "Weight": "*fp32",
                "WSum": "*fp32",
                "Lse": "*fp32",
                "DLoss": "*fp32",
                "DLogits": f"*{t}",
                "stride_l": "i32",
                "stride_d": "i32",
                **scalars,
            },
            constexprs=common,
            num_warps=cfg.num_warps,
            aligned=(
                "Logits",
                "Target",
                "Weight",
                "Lse",
                "DLoss",
                "DLogits",
                "stride_l",
                "stride_d",
                "V",
            ),
        )
    )
    return specs
