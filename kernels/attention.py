"""Flash attention (the FlashAttention-2 algorithm) in Triton: forward and backward.

Layout (batch, seqlen, heads, head_dim) as ``flash_attn_func``, or packed (total, heads,
head_dim) with ``cu_seqlens`` for variable-length batches. One kernel family serves both:
a sequence's rows start at ``b * stride_b`` (dense) or at ``cu_seqlens[b]`` (packed).

Masking, all optional and combinable (query i and key j counted within their sequence,
``shift = seqlen_k - seqlen_q`` so masks align bottom-right as FlashAttention >= 2.1):

* window ``(left, right)``: key j is visible when ``i + shift - left <= j <= i + shift +
  right`` (-1: unbounded on that side); causal is ``right = 0``;
* additive ``bias`` (any strides, 0 for broadcast dims) and ALiBi ``-slope * |i + shift - j|``;
* dropout on the normalized probabilities, from Philox keyed by ``(seed, b, h, i, j)``: the
  backward regenerates exactly the forward's mask.

Statistics are fp32; ``lse`` (log-sum-exp of each row's scaled scores) is saved for the
backward, which recomputes the probabilities. A row with no visible key gets output 0 and
``lse = -inf``, and contributes zero gradient. The backward is deterministic: dK/dV are
accumulated per key block over every query head of the KV group, dQ (and dBias) per query
block over the keys, with no atomics.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

# Stand-in for an unbounded window side: larger than any sequence, small enough for int32.
_UNBOUNDED = 1 << 30
_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _sequence(Cu, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence ``b``."""
    if IS_VARLEN:
        start = tl.load(Cu + b)
        length = tl.load(Cu + b + 1) - start
    else:
        start = b * 0
        length = seqlen
    return start, length


@triton.jit
def _load_rows(base, rows, stride, offs_d, n_rows, head_dim):
    """Rows ``base + row * stride`` as a (len(rows), BLOCK_D) tile; rows past ``n_rows`` and
    columns past ``head_dim`` read as zero."""
    mask = (rows < n_rows)[:, None] & (offs_d < head_dim)[None, :]
    return tl.load(
        base + rows[:, None].to(tl.int64) * stride + offs_d[None, :], mask=mask, other=0.0
    )


@triton.jit
def _load_paged_rows(base, pages, rows, stride, stride_page, page_size, offs_d, n_rows, head_dim):
    """Rows of a paged cache (num_pages, page_size, ...): row r lies in page
    ``pages[r // page_size]`` at slot ``r % page_size``; rows past ``n_rows`` and columns
    past ``head_dim`` read as zero (and their page is not looked up)."""
    in_seq = rows < n_rows
    page = tl.load(pages + rows // page_size, mask=in_seq, other=0).to(tl.int64)
    offsets = page * stride_page + (rows % page_size).to(tl.int64) * stride
    mask = in_seq[:, None] & (offs_d < head_dim)[None, :]
    return tl.load(base + offsets[:, None] + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _key_range(
    first_m, len_q, len_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """[lo, hi): the keys any query row first_m .. first_m + BLOCK_M - 1 can see, lo aligned
    to BLOCK_N (the window clipped to the sequence)."""
    shift = len_k - len_q
    last_m = tl.minimum(first_m + BLOCK_M, len_q) - 1
    lo = tl.maximum(first_m + shift - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(last_m + shift + window_right + 1, len_k)
    return lo, hi


@triton.jit
def _scores(
    q,
    k,
    offs_m,
    offs_n,
    seqlen_q,
    seqlen_k,
    scale,
    window_left,
    window_right,
    bias_ptrs,
    slope,
    softcap,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Scaled, soft-capped, biased and masked scores (BLOCK_M, BLOCK_N) in fp32, and the
    cap's ``t = tanh(raw / softcap)`` that the backward's chain rule needs (the raw scores
    where there is no cap). Masked entries, and rows or columns past the sequence, are -inf
    (so nothing is read out of bounds)."""
    shift = seqlen_k - seqlen_q
    s = tl.dot(q, tl.trans(k)) * scale
    t = s
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (e^(2x) + 1): one exp2 and one reciprocal, and e^(2x) = inf for
        # large x still gives 1 (no inf / inf), which the interpreter runs as it stands.
        t = 1.0 - 2.0 / (tl.exp2(s * (2.0 * _LOG2E / softcap)) + 1.0)
        s = softcap * t
    visible = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if HAS_MASK:
        diag = offs_m[:, None] + shift
        visible &= (offs_n[None, :] >= diag - window_left) & (
            offs_n[None, :] <= diag + window_right
        )
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=visible, other=0.0).to(tl.float32)
    if HAS_ALIBI:
        s -= slope * tl.abs(offs_m[:, None] + shift - offs_n[None, :]).to(tl.float32)
    return tl.where(visible, s, float("-inf")), t


@triton.jit
def _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, rng_cols, dropout_p):
    """Which probabilities dropout keeps: Philox keyed by (seed, b, h) with 32-bit counters
    ``i * rng_cols + j`` (64-bit counters would double the random-number registers)."""
    stream = (tl.cast(b * n_heads + h, tl.uint64) << 32) | tl.cast(seed, tl.uint64)
    offsets = offs_m[:, None] * rng_cols + offs_n[None, :]
    return tl.rand(stream, offsets) >= dropout_p


@triton.jit
def _attn_fwd_kernel(
    Q,
    K,
    V,
    Out,
    LSE,
    Bias,
    Alibi,
    CuQ,
    CuK,
    BlockTable,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    stride_tb,
    stride_kp,
    stride_vp,
    page_size,
    seqlen_q,
    seqlen_k,
    n_heads,
    group,
    head_dim,
    scale,
    window_left,
    window_right,
    dropout_p,
    seed,
    rng_cols,
    softcap,
    IS_VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PAGED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < head_dim
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + q_rows[:, None] * stride_qs + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    k_base = K + b64 * stride_kb + kvh64 * stride_kh
    v_base = V + b64 * stride_vb + kvh64 * stride_vh
    pages = BlockTable + b64 * stride_tb  # paged K/V: this sequence's page numbers
    if not PAGED:
        k_base += k_start.to(tl.int64) * stride_ks
        v_base += k_start.to(tl.int64) * stride_vs
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h64)

    lo, hi = _key_range(pid_m * BLOCK_M, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if PAGED:
            k = _load_paged_rows(
                k_base, pages, cols, stride_ks, stride_kp, page_size, offs_d, len_k, head_dim
            )
        else:
            k = _load_rows(k_base, cols, stride_ks, offs_d, len_k, head_dim)
        s, _ = _scores(
            q,
            k,
            offs_m,
            cols,
            len_q,
            len_k,
            scale,
            window_left,
            window_right,
            bias_base + cols[None, :] * stride_bn,
            slope,
            softcap,
            HAS_MASK,
            HAS_BIAS,
            HAS_ALIBI,
            SOFTCAP,
        )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Rows with nothing visible yet keep a finite reference, so no inf - inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2((s - m_ref[:, None]) * _LOG2E)
        alpha = tl.exp2((m_i - m_ref) * _LOG2E)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, cols, rng_cols, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        if PAGED:
            v = _load_paged_rows(
                v_base, pages, cols, stride_vs, stride_vp, page_size, offs_d, len_k, head_dim
            )
        else:
            v = _load_rows(v_base, cols, stride_vs, offs_d, len_k, head_dim)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(
        Out + b64 * stride_ob + h64 * stride_oh + q_rows[:, None] * stride_os + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + q_rows, lse, mask=m_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    Out,
    DO,
    Delta,
    CuQ,
    stride_ob,
    stride_os,
    stride_oh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_lb,
    stride_lh,
    seqlen_q,
    n_heads,
    head_dim,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O): the softmax backward's per-row correction."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    b64, h64 = b.to(tl.int64), h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < len_q)[:, None] & (offs_d < head_dim)[None, :]
    rows = (q_start + offs_m).to(tl.int64)[:, None]
    o = tl.load(
        Out + b64 * stride_ob + h64 * stride_oh + rows * stride_os + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + rows * stride_dos + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(
        Delta + b64 * stride_lb + h64 * stride_lh + q_start + offs_m, delta, mask=offs_m < len_q
    )


@triton.jit
def _probabilities(s, lse):
    """softmax probabilities from scores and the forward's log-sum-exp; rows that saw no
    key (lse = -inf) give zeros."""
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    return tl.exp2((s - lse[:, None]) * _LOG2E)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DK,
    DV,
    Bias,
    Alibi,
    CuQ,
    CuK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_lb,
    stride_lh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    seqlen_q,
    seqlen_k,
    n_heads,
    n_kv_heads,
    group,
    head_dim,
    scale,
    window_left,
    window_right,
    dropout_p,
    seed,
    rng_cols,
    softcap,
    IS_VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dK and dV of one key block of one KV head, summed over the heads of its group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, kvh = pid_bh // n_kv_heads, pid_bh % n_kv_heads
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if pid_n * BLOCK_N >= len_k:
        return
    b64, kvh64 = b.to(tl.int64), kvh.to(tl.int64)
    shift = len_k - len_q
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_mask = (offs_n < len_k)[:, None] & d_mask[None, :]
    k_rows = (k_start + offs_n).to(tl.int64)[:, None]
    k = tl.load(
        K + b64 * stride_kb + kvh64 * stride_kh + k_rows * stride_ks + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b64 * stride_vb + kvh64 * stride_vh + k_rows * stride_vs + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Query rows that can see any key of this block.
    last_n = tl.minimum(pid_n * BLOCK_N + BLOCK_N, len_k) - 1
    lo = tl.maximum(pid_n * BLOCK_N - shift - window_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(last_n - shift + window_left + 1, len_q)
    for h in range(kvh * group, kvh * group + group):
        h64 = tl.cast(h, tl.int64)
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qs
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dos
        stat_base = b64 * stride_lb + h64 * stride_lh + q_start
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b64 * stride_ab + h64)
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q = _load_rows(q_base, rows, stride_qs, offs_d, len_q, head_dim)
            do = _load_rows(do_base, rows, stride_dos, offs_d, len_q, head_dim)
            lse = tl.load(LSE + stat_base + rows, mask=rows < len_q, other=float("-inf"))
            delta = tl.load(Delta + stat_base + rows, mask=rows < len_q, other=0.0)
            bias_ptrs = (
                Bias
                + b64 * stride_bb
                + h64 * stride_bh
                + rows[:, None].to(tl.int64) * stride_bm
                + offs_n[None, :] * stride_bn
            )
            s, t = _scores(
                q,
                k,
                rows,
                offs_n,
                len_q,
                len_k,
                scale,
                window_left,
                window_right,
                bias_ptrs,
                slope,
                softcap,
                HAS_MASK,
                HAS_BIAS,
                HAS_ALIBI,
                SOFTCAP,
            )
            p = _probabilities(s, lse)
            dp = tl.dot(do, tl.trans(v)).to(tl.float32)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, b, h, n_heads, rows, offs_n, rng_cols, dropout_p)
                dv += tl.dot(tl.trans(tl.where(keep, p / (1.0 - dropout_p), 0.0).to(do.dtype)), do)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            else:
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    store_mask = (offs_n < len_k)[:, None] & d_mask[None, :]
    tl.store(
        DK + b64 * stride_dkb + kvh64 * stride_dkh + k_rows * stride_dks + offs_d[None, :],
        (dk * scale).to(DK.dtype.element_ty),
        mask=store_mask,
    )
    tl.store(
        DV + b64 * stride_dvb + kvh64 * stride_dvh + k_rows * stride_dvs + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=store_mask,
    )


@triton.jit
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    Delta,
    DQ,
    DBias,
    Bias,
    Alibi,
    CuQ,
    CuK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_bn,
    stride_ab,
    stride_dbb,
    stride_dbh,
    stride_dbm,
    seqlen_q,
    seqlen_k,
    n_heads,
    group,
    head_dim,
    scale,
    window_left,
    window_right,
    dropout_p,
    seed,
    rng_cols,
    softcap,
    IS_VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dQ of one query block of one head (and dBias, the score gradient, when asked)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    q_start, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    if pid_m * BLOCK_M >= len_q:
        return
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), (h // group).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_mask = (offs_m < len_q)[:, None] & d_mask[None, :]
    q_rows = (q_start + offs_m).to(tl.int64)[:, None]
    q = tl.load(
        Q + b64 * stride_qb + h64 * stride_qh + q_rows * stride_qs + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b64 * stride_dob + h64 * stride_doh + q_rows * stride_dos + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    stat = b64 * stride_lb + h64 * stride_lh + q_start + offs_m
    lse = tl.load(LSE + stat, mask=offs_m < len_q, other=float("-inf"))
    delta = tl.load(Delta + stat, mask=offs_m < len_q, other=0.0)
    k_base = K + b64 * stride_kb + kvh64 * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + kvh64 * stride_vh + k_start.to(tl.int64) * stride_vs
    bias_base = Bias + b64 * stride_bb + h64 * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm
    dbias_base = (
        DBias + b64 * stride_dbb + h64 * stride_dbh + offs_m[:, None].to(tl.int64) * stride_dbm
    )
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b64 * stride_ab + h64)
    lo, hi = _key_range(pid_m * BLOCK_M, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_ks, offs_d, len_k, head_dim)
        v = _load_rows(v_base, cols, stride_vs, offs_d, len_k, head_dim)
        s, t = _scores(
            q,
            k,
            offs_m,
            cols,
            len_q,
            len_k,
            scale,
            window_left,
            window_right,
            bias_base + cols[None, :] * stride_bn,
            slope,
            softcap,
            HAS_MASK,
            HAS_BIAS,
            HAS_ALIBI,
            SOFTCAP,
        )
        p = _probabilities(s, lse)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, b, h, n_heads, offs_m, cols, rng_cols, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(
                dbias_base + cols[None, :],
                ds,
                mask=(offs_m < len_q)[:, None] & (cols < len_k)[None, :],
            )
        if SOFTCAP:  # after dBias: the bias is added to the capped scores
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(
        DQ + b64 * stride_dqb + h64 * stride_dqh + q_rows * stride_dqs + offs_d[None, :],
        (dq * scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit
def _dropout_keep_kernel(
    Keep,
    CuQ,
    CuK,
    stride_kb,
    stride_kh,
    stride_km,
    seqlen_q,
    seqlen_k,
    n_heads,
    dropout_p,
    seed,
    rng_cols,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The keep pattern (1 kept, 0 dropped) of the attention kernels' dropout, from the very
    function they call (:func:`_dropout_keep`), for one (BLOCK_M, BLOCK_N) tile of (b, h)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    _, len_q = _sequence(CuQ, b, seqlen_q, IS_VARLEN)
    _, len_k = _sequence(CuK, b, seqlen_k, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, b, h, n_heads, offs_m, offs_n, rng_cols, dropout_p)
    ptrs = (
        Keep
        + b.to(tl.int64) * stride_kb
        + h.to(tl.int64) * stride_kh
        + offs_m[:, None].to(tl.int64) * stride_km
        + offs_n[None, :]
    )
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m < len_q)[:, None] & (offs_n < len_k)[None, :])


@dataclasses.dataclass(frozen=True)
class AttentionArgs:
    """Everything but the tensors' data that the kernels take, normalized by the launcher."""

    causal: bool
    softmax_scale: float
    # Visible keys j of query i: i + shift - left <= j <= i + shift + right, shift = Sk - Sq;
    # None: unbounded. Negative bounds are allowed (top-left aligned causal is right = -shift).
    window: tuple[int | None, int | None]
    dropout_p: float
    seed: int
    # flash-attn's soft cap of the scaled scores, softcap * tanh(s / softcap); 0: none.
    softcap: float = 0.0


@dataclasses.dataclass(frozen=True)
class TileConfig:
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


# Tile shapes by head_dim bucket, from a register sweep at sm_80 and sm_90 (compile_check):
# the largest spill-free tiles. "heavy" kernels carry a bias, ALiBi, dropout or packed
# sequences, whose extra live values (bias tiles, Philox state) need smaller tiles. The plain
# forward tiles keep warpgroup MMA (wgmma) on sm_90. Checked with Triton 3.6 and 3.8, whose
# register allocations differ (d=256 dK/dV at 32x64 spills on 3.6 only, and its heavy
# tile at 16x32 with every feature and the soft cap on).
_FWD = {
    64: (TileConfig(128, 64, 8, 3), TileConfig(128, 64, 8, 3)),
    128: (TileConfig(128, 64, 8, 3), TileConfig(64, 32, 8, 2)),
    256: (TileConfig(64, 32, 4, 2), TileConfig(64, 16, 8, 2)),
}
_BWD_DKDV = {
    64: (TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 2)),
    128: (TileConfig(32, 64, 8, 2), TileConfig(16, 64, 8, 2)),
    256: (TileConfig(16, 32, 8, 2), TileConfig(16, 16, 8, 2)),
}
_BWD_DQ = {
    64: (TileConfig(64, 32, 8, 2), TileConfig(64, 32, 8, 2)),
    128: (TileConfig(64, 32, 8, 2), TileConfig(64, 32, 8, 2)),
    256: (TileConfig(64, 32, 8, 2), TileConfig(32, 32, 8, 2)),
}


def _bucket(head_dim: int) -> int:
    return min(b for b in (64, 128, 256) if _block_d(head_dim) <= b)


def tile_configs(head_dim: int, heavy: bool) -> tuple[TileConfig, TileConfig, TileConfig]:
    """(forward, dK/dV, dQ) tiles for ``head_dim``; ``heavy``: bias, ALiBi, dropout or
    packed sequences are on."""
    bucket = _bucket(head_dim)
    return tuple(table[bucket][heavy] for table in (_FWD, _BWD_DKDV, _BWD_DQ))


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _window(causal: bool, window: tuple[int | None, int | None]) -> tuple[int, int, bool]:
    left, right = window
    if causal:
        right = 0 if right is None else min(right, 0)
    has_mask = left is not None or right is not None
    return (_UNBOUNDED if left is None else left, _UNBOUNDED if right is None else right, has_mask)


def _heavy(varlen, bias, alibi_slopes, args: AttentionArgs) -> bool:
    return varlen or bias is not None or alibi_slopes is not None or args.dropout_p > 0


def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, row, head) strides; packed tensors have no batch dim (stride 0)."""
    return (0, *t.stride()[:2]) if varlen else t.stride()[:3]


def _bias_strides(bias: torch.Tensor | None) -> tuple[int, int, int, int]:
    return (0, 0, 0, 0) if bias is None else tuple(bias.stride())


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: AttentionArgs,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out, lse)``. Dense: q (B, Sq, H, D), k/v (B, Sk, Hkv, D), lse (B, H, Sq).
    Packed: q (total_q, H, D), k/v (total_k, Hkv, D), lse (H, total_q). Paged (packed
    queries only): k/v (num_pages, page_size, Hkv, D) and ``block_table`` int32 (B,
    max_pages): key j of sequence b is slot ``j % page_size`` of page
    ``block_table[b, j // page_size]``, for j below ``cu_seqlens_k[b + 1] - cu_seqlens_k[b]``.

    ``bias`` is 4-D (batch, heads, seqlen_q, seqlen_k) with any strides (0 where broadcast);
    ``alibi_slopes`` is fp32 (B, H) with stride 0 over batch when shared. Inputs are checked
    by ``fastlm.ops``; here the last dim must be contiguous.
    """
    varlen = cu_seqlens_q is not None
    out = torch.empty_like(q)
    if varlen:
        batch, (n_heads, head_dim) = cu_seqlens_q.numel() - 1, q.shape[1:]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        lse = torch.empty((n_heads, q.shape[0]), dtype=torch.float32, device=q.device)
        strides_q, strides_k, strides_v, strides_o = (_row_strides(t, True) for t in (q, k, v, out))
        strides_l = (0, lse.stride(0))
        if block_table is not None:  # (page, slot, head) strides: rows within a page
            strides_k, strides_v = ((0, *t.stride()[1:3]) for t in (k, v))
    else:
        batch, seqlen_q, n_heads, head_dim = q.shape
        seqlen_k = k.shape[1]
        lse = torch.empty((batch, n_heads, seqlen_q), dtype=torch.float32, device=q.device)
        strides_q, strides_k, strides_v, strides_o = (
            _row_strides(t, False) for t in (q, k, v, out)
        )
        strides_l = lse.stride()[:2]
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    left, right, has_mask = _window(args.causal, args.window)
    cfg = tile_configs(head_dim, _heavy(varlen, bias, alibi_slopes, args))[0]
    kernel = on_device(_attn_fwd_kernel, q.device)
    paged = block_table is not None
    grid = (triton.cdiv(seqlen_q, cfg.block_m), batch * n_heads)
    kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        q if bias is None else bias,
        lse if alibi_slopes is None else alibi_slopes,
        cu_seqlens_q if varlen else lse,
        cu_seqlens_k if varlen else lse,
        block_table if paged else lse,
        *strides_q,
        *strides_k,
        *strides_v,
        *strides_o,
        *strides_l,
        *_bias_strides(bias),
        0 if alibi_slopes is None else alibi_slopes.stride(0),
        block_table.stride(0) if paged else 0,
        k.stride(0) if paged else 0,
        v.stride(0) if paged else 0,
        k.shape[1] if paged else 1,
        seqlen_q,
        seqlen_k,
        n_heads,
        n_heads // k.shape[-2],
        head_dim,
        args.softmax_scale,
        left,
        right,
        args.dropout_p,
        args.seed,
        seqlen_k,
        args.softcap,
        IS_VARLEN=varlen,
        HAS_MASK=has_mask,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=args.dropout_p > 0,
        SOFTCAP=args.softcap > 0,
        PAGED=paged,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=_block_d(head_dim),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    args: AttentionArgs,
    bias: torch.Tensor | None = None,
    bias_grad: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`attention_fwd`: ``(dq, dk, dv, dbias)``. ``dbias`` (with
    ``bias_grad``) is the fp32 gradient of the scores, (B, H, Sq, Sk) (max lengths when
    packed): the caller sums it over the bias's broadcast dims."""
    varlen = cu_seqlens_q is not None
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if varlen:
        batch, (n_heads, head_dim) = cu_seqlens_q.numel() - 1, q.shape[1:]
        seqlen_q, seqlen_k = max_seqlen_q, max_seqlen_k
        strides = [_row_strides(t, varlen) for t in (q, k, v, do, dq, dk, dv)]
        strides_l = (0, lse.stride(0))
    else:
        batch, seqlen_q, n_heads, head_dim = q.shape
        seqlen_k = k.shape[1]
        strides = [_row_strides(t, varlen) for t in (q, k, v, do, dq, dk, dv)]
        strides_l = lse.stride()[:2]
    s_q, s_k, s_v, s_do, s_dq, s_dk, s_dv = strides
    n_kv_heads = k.shape[-2]
    dbias = None
    if bias_grad:
        dbias = torch.zeros(
            (batch, n_heads, seqlen_q, seqlen_k), dtype=torch.float32, device=q.device
        )
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    left, right, has_mask = _window(args.causal, args.window)
    block_d = _block_d(head_dim)
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse
    flags = dict(
        IS_VARLEN=varlen,
        HAS_MASK=has_mask,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=alibi_slopes is not None,
        HAS_DROPOUT=args.dropout_p > 0,
        SOFTCAP=args.softcap > 0,
    )
    shared = (
        *_bias_strides(bias),
        0 if alibi_slopes is None else alibi_slopes.stride(0),
    )
    run = (args.softmax_scale, left, right, args.dropout_p, args.seed, seqlen_k, args.softcap)
    bias_arg = q if bias is None else bias
    alibi_arg = lse if alibi_slopes is None else alibi_slopes

    delta = torch.empty_like(lse)
    on_device(_attn_bwd_delta_kernel, q.device)[(triton.cdiv(seqlen_q, 64), batch * n_heads)](
        out,
        do,
        delta,
        cu_q,
        *_row_strides(out, varlen),
        *s_do,
        *strides_l,
        seqlen_q,
        n_heads,
        head_dim,
        IS_VARLEN=varlen,
        BLOCK_M=64,
        BLOCK_D=block_d,
    )
    _, kv_cfg, q_cfg = tile_configs(head_dim, _heavy(varlen, bias, alibi_slopes, args))
    on_device(_attn_bwd_dkdv_kernel, q.device)[
        (triton.cdiv(seqlen_k, kv_cfg.block_n), batch * n_kv_heads)
    ](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        bias_arg,
        alibi_arg,
        cu_q,
        cu_k,
        *s_q,
        *s_k,
        *s_v,
        *s_do,
        *s_dk,
        *s_dv,
        *strides_l,
        *shared,
        seqlen_q,
        seqlen_k,
        n_heads,
        n_kv_heads,
        n_heads // n_kv_heads,
        head_dim,
        *run,
        **flags,
        BLOCK_M=kv_cfg.block_m,
        BLOCK_N=kv_cfg.block_n,
        BLOCK_D=block_d,
        num_warps=kv_cfg.num_warps,
        num_stages=kv_cfg.num_stages,
    )
    on_device(_attn_bwd_dq_kernel, q.device)[
        (triton.cdiv(seqlen_q, q_cfg.block_m), batch * n_heads)
    ](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        q if dbias is None else dbias,
        bias_arg,
        alibi_arg,
        cu_q,
        cu_k,
        *s_q,
        *s_k,
        *s_v,
        *s_do,
        *s_dq,
        *strides_l,
        *shared,
        *((0, 0, 0) if dbias is None else dbias.stride()[:3]),
        seqlen_q,
        seqlen_k,
        n_heads,
        n_heads // n_kv_heads,
        head_dim,
        *run,
        **flags,
        BIAS_GRAD=dbias is not None,
        BLOCK_M=q_cfg.block_m,
        BLOCK_N=q_cfg.block_n,
        BLOCK_D=block_d,
        num_warps=q_cfg.num_warps,
        num_stages=q_cfg.num_stages,
    )
    return dq, dk, dv, dbias


_KEEP_BLOCK = 32


def dropout_keep(
    batch: int,
    n_heads: int,
    seqlen_q: int,
    seqlen_k: int,
    args: AttentionArgs,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which attention probabilities :func:`attention_fwd` with ``args`` keeps: bool
    (batch, n_heads, seqlen_q, seqlen_k), True = kept. Packed: ``seqlen_q``/``seqlen_k``
    are the max lengths, and a sequence's pattern fills its top-left corner (the rest is
    False). The kernel calls the forward's own random function with the forward's keys, so
    the pattern is the one the forward and backward used, bit for bit."""
    keep = torch.zeros((batch, n_heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)
    if keep.numel() == 0 or args.dropout_p == 0:
        return keep.fill_(1).bool()
    varlen = cu_seqlens_q is not None
    grid = (
        triton.cdiv(seqlen_q, _KEEP_BLOCK),
        triton.cdiv(seqlen_k, _KEEP_BLOCK),
        batch * n_heads,
    )
    on_device(_dropout_keep_kernel, keep.device)[grid](
        keep,
        cu_seqlens_q if varlen else keep,
        cu_seqlens_k if varlen else keep,
        *keep.stride()[:3],
        seqlen_q,
        seqlen_k,
        n_heads,
        args.dropout_p,
        args.seed,
        seqlen_k,  # the forward's rng_cols: counters i * seqlen_k + j
        IS_VARLEN=varlen,
        BLOCK_M=_KEEP_BLOCK,
        BLOCK_N=_KEEP_BLOCK,
    )
    return keep.bool()


def _spec_types(kernel, t: str) -> dict[str, str]:
    """Triton types of a kernel's runtime arguments, for activations of dtype ``t``."""
    fp32_ptrs = {"LSE", "Delta", "Alibi", "DBias"}
    types = {}
    for name in kernel.arg_names:
        if name in fp32_ptrs:
            types[name] = "*fp32"
        elif name in ("CuQ", "CuK", "BlockTable"):
            types[name] = "*i32"
        elif name[0].isupper():
            types[name] = f"*{t}"
        elif name in ("scale", "dropout_p", "softcap"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# One head_dim per distinct block configuration, and one with every feature switched on.
_SPEC_HEAD_DIMS = (64, 128, 256)


def compile_specs() -> list[KernelSpec]:
    """Forward, dK/dV and dQ kernels at every shipped tile configuration: masking only (fp16
    and bf16), masking with the soft cap (bf16), and every feature on (varlen, bias, ALiBi,
    dropout, soft cap; bf16); the forward on paged K/V (bf16); the dropout pattern."""
    plain = dict(IS_VARLEN=False, HAS_BIAS=False, HAS_ALIBI=False, HAS_DROPOUT=False)
    specs = []
    for head_dim in _SPEC_HEAD_DIMS:
        for dtype, t in _DTYPES.items():
            variants = [dict(plain, SOFTCAP=False)]
            if dtype == torch.bfloat16:
                variants.append(dict(plain, SOFTCAP=True))
                variants.append(
                    dict(
                        IS_VARLEN=True,
                        HAS_BIAS=True,
                        HAS_ALIBI=True,
                        HAS_DROPOUT=True,
                        SOFTCAP=True,
                    )
                )
            for flags in variants:
                specs += _specs_for(head_dim, t, dict(HAS_MASK=True, **flags))
            if dtype == torch.bfloat16:
                flags = dict(plain, IS_VARLEN=True, SOFTCAP=False)
                specs += _specs_for(head_dim, t, dict(HAS_MASK=True, **flags), paged=True)
    return specs + [_keep_spec(varlen) for varlen in (False, True)]


def _keep_spec(varlen: bool) -> KernelSpec:
    signature = {
        name: "*i8" if name == "Keep" else "*i32" if name in ("CuQ", "CuK") else "i32"
        for name in _dropout_keep_kernel.arg_names
        if name not in ("IS_VARLEN", "BLOCK_M", "BLOCK_N")
    }
    signature["dropout_p"] = "fp32"
    return KernelSpec(
        label=f"attention dropout keep{' varlen' if varlen else ''} {_KEEP_BLOCK}x{_KEEP_BLOCK}",
        kernel=_dropout_keep_kernel,
        signature=signature,
        constexprs=dict(IS_VARLEN=varlen, BLOCK_M=_KEEP_BLOCK, BLOCK_N=_KEEP_BLOCK),
        num_warps=4,
        num_stages=1,
        aligned=("Keep", "CuQ", "CuK", "stride_kb", "stride_kh", "stride_km"),
        needs_wide_loads=False,  # it loads nothing but two offsets: it only stores
    )


def _specs_for(head_dim: int, t: str, flags: dict, paged: bool = False) -> list[KernelSpec]:
    """The three kernels with ``flags``; ``paged``: the forward alone reading paged K/V
    (there is no paged backward)."""
    block_d = _block_d(head_dim)
    heavy = flags["IS_VARLEN"] or flags["HAS_BIAS"] or flags["HAS_ALIBI"] or flags["HAS_DROPOUT"]
    fwd, dkdv, dq = tile_configs(head_dim, heavy)
    what = "+".join(k[4:].lower() for k, on in flags.items() if on and k.startswith("HAS_"))
    what += "+varlen" if flags["IS_VARLEN"] else ""
    what += "+softcap" if flags["SOFTCAP"] else ""
    what += "+paged" if paged else ""
    kernels = [  # (name, kernel, tiles, extra constexprs, must use wgmma on sm_90)
        ("fwd", _attn_fwd_kernel, fwd, {"PAGED": paged}, True),
        ("bwd dk/dv", _attn_bwd_dkdv_kernel, dkdv, {}, False),
        ("bwd dq", _attn_bwd_dq_kernel, dq, {"BIAS_GRAD": flags["HAS_BIAS"]}, False),
    ][: 1 if paged else 3]
    specs = []
    for name, kernel, cfg, extra, wgmma in kernels:
        constexprs = dict(flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, **extra)
        signature = {k: v for k, v in _spec_types(kernel, t).items() if k not in constexprs}
        aligned = tuple(k for k, v in signature.items() if v.startswith("*") or "stride" in k)
        specs.append(
            KernelSpec(
                label=f"attention {t} d={head_dim} {what} {name} {cfg.block_m}x{cfg.block_n} "
                f"w={cfg.num_warps}",
                kernel=kernel,
                signature=signature,
                constexprs=constexprs,
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                aligned=(*aligned, "head_dim"),
                needs_wgmma=wgmma,
            )
        )
    return specs
