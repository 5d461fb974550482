"""KV-cache decode attention (flash-decoding) in Triton: split-K over the cached keys.

Contract: :func:`attention_decode`. Layout (batch, seqlen, heads, head_dim) as flash-attn's
``flash_attn_with_kvcache``; causal masks align bottom-right.

* One program per (batch, KV head, key split, block of query rows). Its query rows are the
  H/Hkv query heads sharing that KV head times the Sq queries (GQA packing): each K/V tile is
  read once per KV head and feeds a ``tl.dot`` with (H/Hkv)*Sq rows, never a repeated cache.
* Each sequence's keys ``[0, L_b)`` are cut into ``num_splits`` chunks of whole BLOCK_N
  blocks. With several splits, each writes its normalized partial output and log-sum-exp to
  fp32 scratch and :func:`_attention_decode_combine_kernel` merges them; with one split the
  first kernel writes the final output itself (no scratch, one launch).
* ``k_new``/``v_new`` are appended by the same kernel: keys at positions ``>=
  cache_seqlens[b]`` are read from ``k_new``/``v_new``, attended to, and stored into the
  cache by the program that owns them, so appending costs no extra launch or pass.
* Paged caches (``block_table``): each tile looks up the page of each of its BLOCK_N
  positions and loads whole page rows (a row is one position's D contiguous features), so a
  row is as wide a load as in a contiguous cache and pages may be any size. Cache rows
  (``cache_batch_idx``) move the base pointer once per program.
* Left padding, sliding windows, ALiBi and the soft cap are masks and score terms in the
  inner loop, each behind a constexpr flag: a call without them compiles to the plain loop.
  The key range a program walks starts at the first position any of its rows can see.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, on_device

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

MAX_HEAD_DIM = 256
# Splits the combine kernel merges per step; more splits take more steps.
COMBINE_BLOCK_S = 16
# Cap on automatic splits, and the fewest cache positions worth a split of their own: below
# that, the partial's write and merge cost more than the parallelism gains.
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256
# Under the interpreter: enough splits that the combine path (and empty splits) always run.
INTERPRETER_SPLITS = 3


@triton.jit
def _attend(
    q,
    k,
    v,
    pos,
    end,
    diag,
    slope,
    m_i,
    l_i,
    acc,
    qk_scale,
    softcap,
    window_left,
    window_right,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) with one K/V tile at key positions ``pos``.

    Scores are in log2 units (``qk_scale`` includes log2(e)). Query row r's diagonal is
    ``diag[r] = L_b - Sq + i``. Keys at or past ``end``, right of the diagonal (causal) or
    outside the window are masked (left padding: no tile starts before it); a row with nothing
    visible yet keeps m_i = -inf, l_i = 0, acc = 0 because exponents are taken against 0
    instead of -inf.
    """
    s = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        # softcap * tanh(raw / softcap) of the raw scaled score raw = s * qk_scale / log2(e),
        # in log2 units; tanh(x) = 1 - 2 / (e^(2x) + 1), whose e^(2x) = inf still gives 1.
        t = 1.0 - 2.0 / (tl.exp2(s * (2.0 * qk_scale / softcap)) + 1.0)
        s = (softcap * _LOG2E) * t
    else:
        s = s * qk_scale
    visible = pos[None, :] < end
    if CAUSAL:
        visible &= pos[None, :] <= diag[:, None]
    if HAS_WINDOW:
        visible &= (pos[None, :] >= diag[:, None] - window_left) & (
            pos[None, :] <= diag[:, None] + window_right
        )
    if HAS_ALIBI:  # slope in log2 units
        s -= slope[:, None] * tl.abs(diag[:, None] - pos[None, :]).to(tl.float32)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _cache_rows(Table, pos, valid, page_size, stride_b, stride_s, PAGED: tl.constexpr):
    """Element offsets of cache positions ``pos``: ``pos * stride_s`` from the sequence's
    base, or with pages, ``page * stride_b + (pos % page_size) * stride_s`` from the cache's
    base with ``page = Table[pos // page_size]`` (Table: the sequence's block-table row)."""
    if PAGED:
        page = tl.load(Table + pos // page_size, mask=valid, other=0).to(tl.int64)
        return page * stride_b + (pos % page_size).to(tl.int64) * stride_s
    else:
        return pos.to(tl.int64) * stride_s


@triton.jit
def _attention_decode_split_kernel(
    Q,
    K,
    V,
    KNew,
    VNew,
    SeqLens,
    Out,
    Lse,
    OPart,
    LsePart,
    BlockTable,
    CacheBatchIdx,
    LeftPad,
    Slopes,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_knb,
    stride_kns,
    stride_knh,
    stride_vnb,
    stride_vns,
    stride_vnh,
    stride_tb,
    stride_sb,
    num_kv_heads,
    group,
    seqlen_q,
    seqlen_new,
    num_splits,
    page_size,
    window_left,
    window_right,
    qk_scale,
    softcap,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_NEW: tl.constexpr,
    SPLIT: tl.constexpr,
    PAGED: tl.constexpr = False,
    HAS_BATCH_IDX: tl.constexpr = False,
    HAS_LEFTPAD: tl.constexpr = False,
    HAS_WINDOW: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kv_head = (pid_bh % num_kv_heads).to(tl.int64)
    num_heads = num_kv_heads * group

    cached = tl.load(SeqLens + b)
    seqlen_k = cached + seqlen_new
    first = 0
    if HAS_LEFTPAD:
        first = tl.load(LeftPad + b)
    # The first position a row of this program may see (left padding: cache_leftpad <=
    # cache_seqlens, the contract says) or must append: the splits share [start, seqlen_k)
    # in whole BLOCK_N blocks, so every tile but a sequence's last one is full; splits past
    # the end get lo >= hi and write an empty partial.
    start = first
    if HAS_WINDOW:  # row 0's diagonal is seqlen_k - seqlen_q
        start = tl.maximum(start, seqlen_k - seqlen_q - window_left)
    if HAS_NEW:
        start = tl.minimum(start, cached)
    chunk = tl.cdiv(tl.cdiv(seqlen_k - start, num_splits), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seqlen_k)

    # Row r of the tile is query r // group of head kv_head * group + r % group.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < group * seqlen_q
    qi = rows // group
    head = kv_head * group + rows % group
    d = tl.arange(0, BLOCK_D)
    d_mask = d[None, :] < HEAD_DIM
    q_rows = b * stride_qb + qi.to(tl.int64) * stride_qs + head * stride_qh
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_mask[:, None] & d_mask, other=0.0)
    diag = seqlen_k - seqlen_q + qi
    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Slopes + b * stride_sb + head, mask=row_mask, other=0.0) * _LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    # Paged: K/V stay at the cache's base (pages are found per position); else at the
    # sequence's cache row.
    K += kv_head * stride_kh
    V += kv_head * stride_vh
    BlockTable += b * stride_tb
    if not PAGED:
        cache_row = b
        if HAS_BATCH_IDX:
            cache_row = tl.load(CacheBatchIdx + b).to(tl.int64)
        K += cache_row * stride_kb
        V += cache_row * stride_vb
    cache_end = tl.minimum(hi, cached)
    for tile in range(lo, cache_end, BLOCK_N):
        pos = tile + n
        valid = pos < cache_end
        mask = valid[:, None] & d_mask
        k_rows = _cache_rows(BlockTable, pos, valid, page_size, stride_kb, stride_ks, PAGED)
        v_rows = _cache_rows(BlockTable, pos, valid, page_size, stride_vb, stride_vs, PAGED)
        k = tl.load(K + k_rows[:, None] + d[None, :], mask=mask, other=0.0)
        v = tl.load(V + v_rows[:, None] + d[None, :], mask=mask, other=0.0)
        m_i, l_i, acc = _attend(
            q,
            k,
            v,
            pos,
            cache_end,
            diag,
            slope,
            m_i,
            l_i,
            acc,
            qk_scale,
            softcap,
            window_left,
            window_right,
            CAUSAL,
            HAS_WINDOW,
            HAS_ALIBI,
            SOFTCAP,
        )
    if HAS_NEW:
        KNew += b * stride_knb + kv_head * stride_knh
        VNew += b * stride_vnb + kv_head * stride_vnh
        for tile in range(tl.maximum(lo, cached), hi, BLOCK_N):
            pos = tile + n
            valid = pos < hi
            mask = valid[:, None] & d_mask
            src = (pos - cached).to(tl.int64)[:, None]
            k = tl.load(KNew + src * stride_kns + d[None, :], mask=mask, other=0.0)
            v = tl.load(VNew + src * stride_vns + d[None, :], mask=mask, other=0.0)
            # Each new key lies in exactly one split; that split's first row block stores
            # it. Nothing else reads these cache slots during the launch: every program
            # takes positions >= cached from k_new/v_new.
            k_rows = _cache_rows(BlockTable, pos, valid, page_size, stride_kb, stride_ks, PAGED)
            v_rows = _cache_rows(BlockTable, pos, valid, page_size, stride_vb, stride_vs, PAGED)
            tl.store(K + k_rows[:, None] + d[None, :], k, mask=mask & (pid_m == 0))
            tl.store(V + v_rows[:, None] + d[None, :], v, mask=mask & (pid_m == 0))
            m_i, l_i, acc = _attend(
                q,
                k,
                v,
                pos,
                hi,
                diag,
                slope,
                m_i,
                l_i,
                acc,
                qk_scale,
                softcap,
                window_left,
                window_right,
                CAUSAL,
                HAS_WINDOW,
                HAS_ALIBI,
                SOFTCAP,
            )

    # l_i is 0 for a row with no key, else positive, or NaN (a NaN query): NaN must reach
    # the output and the lse, as in the reference, so test != 0 rather than > 0.
    has_keys = l_i != 0.0
    out = acc * (1.0 / tl.where(has_keys, l_i, 1.0))[:, None]
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_row = (b * seqlen_q + qi) * num_heads + head  # row of (B, Sq, H)
    mask = row_mask[:, None] & d_mask
    if SPLIT:
        part = out_row * num_splits + split
        tl.store(OPart + part[:, None] * HEAD_DIM + d[None, :], out, mask=mask)
        tl.store(LsePart + part, lse, mask=row_mask)
    else:
        tl.store(
            Out + out_row[:, None] * HEAD_DIM + d[None, :], out.to(Out.dtype.element_ty), mask=mask
        )
        tl.store(Lse + (b * num_heads + head) * seqlen_q + qi, lse * _LN2, mask=row_mask)


@triton.jit
def _attention_decode_combine_kernel(
    OPart,
    LsePart,
    Out,
    Lse,
    num_heads,
    seqlen_q,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merge the splits of one (batch, query, head) row: out = sum_s w_s * O_s / sum_s w_s
    with w_s = 2^(lse_s - max lse). Empty splits have lse_s = -inf and O_s = 0: weight 0."""
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    s = tl.arange(0, BLOCK_S)
    m = tl.full([], float("-inf"), tl.float32)
    w_sum = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, num_splits, BLOCK_S):
        s_mask = start + s < num_splits
        part = row * num_splits + start + s
        lse = tl.load(LsePart + part, mask=s_mask, other=float("-inf"))
        o = tl.load(
            OPart + part[:, None] * HEAD_DIM + d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp2(lse - m_ref)
        alpha = tl.exp2(m - m_ref)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        w_sum = w_sum * alpha + tl.sum(w, 0)
        m = m_new
    has_keys = w_sum != 0.0  # NaN partials stay NaN (see the split kernel)
    out = acc / tl.where(has_keys, w_sum, 1.0)
    tl.store(Out + row * HEAD_DIM + d, out.to(Out.dtype.element_ty), mask=d_mask)
    lse_row = tl.where(
        has_keys, (m + tl.log2(tl.where(has_keys, w_sum, 1.0))) * _LN2, float("-inf")
    )
    head = row % num_heads
    qi = (row // num_heads) % seqlen_q
    b = row // (num_heads * seqlen_q)
    tl.store(Lse + (b * num_heads + head) * seqlen_q + qi, lse_row)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, rows: int) -> DecodeConfig:
    """Tile shape for ``rows`` = (H/Hkv) * Sq query rows per KV head of size ``head_dim``.

    The fp32 accumulator is BLOCK_M x BLOCK_D: row blocks are capped, and the larger tiles
    get 8 warps, so that it and the query tile fit in registers without spilling at
    sm_80/sm_90 (4 warps spill at 64x128; see compile_check); more rows take more row
    blocks. K/V tiles are triple-buffered in shared memory (double at 16 x 128).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    max_m = 64 if block_d <= 128 else 32
    block_m = min(max(16, triton.next_power_of_2(rows)), max_m)
    block_n = 64 if block_d <= 128 else 32
    num_warps = 4 if block_m * block_d <= 4096 else 8
    # Triton 3.6 spills the 16 x 128 tile triple-buffered on sm_90 (the pipeline's extra
    # live addresses); double-buffered it fits on 3.6 and 3.8.
    num_stages = 2 if (block_m, block_d) == (16, 128) else 3
    return DecodeConfig(block_m, block_n, block_d, num_warps=num_warps, num_stages=num_stages)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def auto_num_splits(device: torch.device, programs: int, max_keys: int) -> int:
    """Splits per sequence for ``programs`` (batch x KV heads x row blocks) over at most
    ``max_keys`` keys: enough programs for about two per SM, each with a worthwhile chunk.

    It is sized from the cache's capacity, not the current lengths, so choosing it needs no
    device-to-host copy; splits past a sequence's length exit at once.
    """
    if device.type != "cuda":
        return INTERPRETER_SPLITS
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(2 * sms, programs)
    return max(1, min(wanted, triton.cdiv(max_keys, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _validate(q, k_cache, v_cache, num_splits) -> None:
    """The launcher's own limits. Shapes, dtypes, devices, lengths and room in the caches
    are the op's contract (``fastlm.ops.attention_with_kvcache`` checks them for every
    backend); this kernel trusts them, and would read and write out of bounds without."""
    _check(q.dtype in (torch.float16, torch.bfloat16), f"q must be fp16/bf16, got {q.dtype}")
    _check(q.shape[1] >= 1, "q must hold at least one query (Sq >= 1)")
    _check(q.shape[3] <= MAX_HEAD_DIM, f"head_dim must be at most {MAX_HEAD_DIM}, got {q.shape[3]}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache.stride(-1) == 1, f"{name} must have unit stride in head_dim")
    _check(num_splits is None or num_splits >= 1, f"num_splits must be >= 1, got {num_splits}")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    softmax_scale: float,
    causal: bool,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a few new queries against a KV cache, optionally appending to it.

    q: (B, Sq, H, D) fp16/bf16 (Sq small: 1..16 typical, any >= 1 allowed), D <= 256.
    k_cache, v_cache: (B, S_max, Hkv, D) in q's dtype, unit stride in D, any other strides;
      H % Hkv == 0 (GQA/MQA: K/V are never repeated in memory).
    cache_seqlens: int32 (B,): valid cached tokens per sequence before appending.
    k_new, v_new: optional (B, Sq_new, Hkv, D): written in place into the caches at positions
      cache_seqlens[b] .. cache_seqlens[b] + Sq_new - 1, and attended to. The caller
      guarantees 0 <= cache_seqlens[b] <= S_max - Sq_new (the op's contract checks it).
    The key length of sequence b is L_b = cache_seqlens[b] + Sq_new.
    causal: query i (0-based among the Sq queries) sees keys j <= L_b - Sq + i (bottom-right
      aligned, as flash-attn); otherwise all L_b keys.
    num_splits: key splits per sequence (flash-decoding); None picks one from the cache's
      capacity and the GPU's SM count (:func:`auto_num_splits`).
    block_table: int32 (B, max_pages): the caches are pages (num_pages, page_size, Hkv, D)
      and position j of sequence b is slot j % page_size of page block_table[b, j //
      page_size] (any page_size; entries past a sequence's last page are not read).
    cache_batch_idx: int32 (B,): sequence b's cache row (not with block_table).
    cache_leftpad: int32 (B,): sequence b's keys start at this position (not with pages).
    alibi_slopes: fp32 (H,) or (B, H): adds -slope * |L_b - Sq + i - j| to the scores.
    window: (left, right), -1 unbounded: query i sees keys within [diag - left, diag + right]
      of its diagonal diag = L_b - Sq + i.
    softcap: > 0 caps the scaled scores: softcap * tanh(s / softcap), before ALiBi.
    Value ranges (pages, rows, left padding within the lengths) are the op's contract.

    Returns (out (B, Sq, H, D) in q's dtype, lse fp32 (B, H, Sq), the natural-log
    log-sum-exp of each row's scaled scores). Rows with no visible key (L_b == 0, or causal
    with nothing visible) give out = 0 and lse = -inf.
    """
    _validate(q, k_cache, v_cache, num_splits)
    batch, seqlen_q, heads, head_dim = q.shape
    capacity, kv_heads = k_cache.shape[1], k_cache.shape[2]
    if block_table is not None:
        capacity *= block_table.shape[1]
    seqlen_new = 0 if k_new is None else k_new.shape[1]
    q = _unit_last_stride(q)
    if k_new is not None:
        k_new, v_new = _unit_last_stride(k_new), _unit_last_stride(v_new)
    group = heads // kv_heads
    cfg = decode_config(head_dim, group * seqlen_q)
    m_blocks = triton.cdiv(group * seqlen_q, cfg.block_m)
    if num_splits is None:
        num_splits = auto_num_splits(q.device, batch * kv_heads * m_blocks, capacity)

    out = torch.empty((batch, seqlen_q, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    split = num_splits > 1
    rows = batch * seqlen_q * heads
    # Scratch is only touched with several splits; a 1-element stand-in keeps the signature.
    o_part = torch.empty(
        (rows, num_splits, head_dim) if split else (1,), dtype=torch.float32, device=q.device
    )
    lse_part = torch.empty(
        (rows, num_splits) if split else (1,), dtype=torch.float32, device=q.device
    )
    kn = k_cache if k_new is None else k_new
    vn = v_cache if v_new is None else v_new
    # Absent index tensors and slopes: cache_seqlens and lse stand in (never read).
    table = cache_seqlens[:, None] if block_table is None else block_table
    slopes, slopes_batch_stride = lse, 0
    if alibi_slopes is not None:
        slopes = alibi_slopes.contiguous()
        slopes_batch_stride = heads if slopes.dim() == 2 else 0
    left, right = window
    # An unbounded side of a bounded window: further than any position.
    far = 2**30
    kernel = on_device(_attention_decode_split_kernel, q.device)
    kernel[(batch * kv_heads, num_splits, m_blocks)](
        q,
        k_cache,
        v_cache,
        kn,
        vn,
        cache_seqlens,
        out,
        lse,
        o_part,
        lse_part,
        table,
        cache_seqlens if cache_batch_idx is None else cache_batch_idx,
        cache_seqlens if cache_leftpad is None else cache_leftpad,
        slopes,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        kn.stride(0),
        kn.stride(1),
        kn.stride(2),
        vn.stride(0),
        vn.stride(1),
        vn.stride(2),
        table.stride(0),
        slopes_batch_stride,
        kv_heads,
        group,
        seqlen_q,
        seqlen_new,
        num_splits,
        k_cache.shape[1],
        far if left < 0 else left,
        far if right < 0 else right,
        softmax_scale * math.log2(math.e),
        float(softcap) if softcap else 1.0,
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d,
        CAUSAL=causal,
        HAS_NEW=k_new is not None,
        SPLIT=split,
        PAGED=block_table is not None,
        HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_LEFTPAD=cache_leftpad is not None,
        HAS_WINDOW=(left, right) != (-1, -1),
        HAS_ALIBI=alibi_slopes is not None,
        SOFTCAP=softcap > 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        combine = on_device(_attention_decode_combine_kernel, q.device)
        combine[(rows,)](
            o_part,
            lse_part,
            out,
            lse,
            heads,
            seqlen_q,
            num_splits,
            HEAD_DIM=head_dim,
            BLOCK_D=cfg.block_d,
            BLOCK_S=COMBINE_BLOCK_S,
            num_warps=_combine_warps(cfg.block_d),
        )
    return out, lse


def _combine_warps(block_d: int) -> int:
    # 16 splits x BLOCK_D fp32 values at 16 per thread.
    return max(1, min(4, COMBINE_BLOCK_S * block_d // (32 * 16)))


# ---------------------------------------------------------------------------------------------
# Static compile check

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# Head dims whose padded tile is shipped (80 runs the masked, non-power-of-two path), and
# the one also checked in fp16 (the dtype changes no tile or register allocation).
_CHECKED_HEAD_DIMS = (64, 80, 128, 256)
_FP16_HEAD_DIM = 128


_FEATURE_FLAGS = ("PAGED", "HAS_BATCH_IDX", "HAS_LEFTPAD", "HAS_WINDOW", "HAS_ALIBI", "SOFTCAP")
# The optional features' variants, split, at every head dim: the paged cache and the soft
# cap (the bench's rows) with the smallest and the largest row block; the others with the
# largest only (the most registers).
_FEATURE_VARIANTS = {
    "paged": (dict(PAGED=True), True),
    "softcap": (dict(SOFTCAP=True), True),
    "paged+alibi+window+softcap": (
        dict(PAGED=True, HAS_ALIBI=True, HAS_WINDOW=True, SOFTCAP=True),
        False,
    ),
    "rows+leftpad": (dict(HAS_BATCH_IDX=True, HAS_LEFTPAD=True), False),
}


def compile_specs() -> list[KernelSpec]:
    """The split kernel at every row block it ships for each checked head dim, with causal
    masking and appending on, split and unsplit; its feature variants (paged, soft cap,
    ...: :data:`_FEATURE_VARIANTS`); the combine kernel for each head dim.
    All in bf16, and in fp16 at one head dim."""
    specs = []
    for head_dim in _CHECKED_HEAD_DIMS:
        dtypes = (
            (torch.bfloat16, torch.float16) if head_dim == _FP16_HEAD_DIM else (torch.bfloat16,)
        )
        block_ms = sorted({decode_config(head_dim, 1 << i).block_m for i in range(13)})
        for dtype in dtypes:
            t = _TRITON_DTYPE[dtype]
            for block_m in block_ms:
                for split in (True, False):
                    specs.append(_split_spec(head_dim, t, block_m, split))
            specs.append(_combine_spec(head_dim, t))
        for name, (flags, smallest_too) in _FEATURE_VARIANTS.items():
            for block_m in sorted({block_ms[0] if smallest_too else block_ms[-1], block_ms[-1]}):
                specs.append(_split_spec(head_dim, "bf16", block_m, True, name, flags))
    return specs


def _split_spec(
    head_dim: int, t: str, block_m: int, split: bool, variant: str = "", flags: dict | None = None
) -> KernelSpec:
    cfg = decode_config(head_dim, block_m)
    strides = [f"stride_{p}{s}" for p in ("q", "k", "v", "kn", "vn") for s in "bsh"]
    return KernelSpec(
        label=(
            f"attention_decode {t} d={head_dim} tile={block_m}x{cfg.block_n}x{cfg.block_d}"
            f" w={cfg.num_warps} s={cfg.num_stages} {'split' if split else 'single'}"
            f"{f' {variant}' if variant else ''}"
        ),
        kernel=_attention_decode_split_kernel,
        signature={
            "Q": f"*{t}",
            "K": f"*{t}",
            "V": f"*{t}",
            "KNew": f"*{t}",
            "VNew": f"*{t}",
            "SeqLens": "*i32",
            "Out": f"*{t}",
            "Lse": "*fp32",
            "OPart": "*fp32",
            "LsePart": "*fp32",
            "BlockTable": "*i32",
            "CacheBatchIdx": "*i32",
            "LeftPad": "*i32",
            "Slopes": "*fp32",
            **dict.fromkeys(strides, "i32"),
            "stride_tb": "i32",
            "stride_sb": "i32",
            "num_kv_heads": "i32",
            "group": "i32",
            "seqlen_q": "i32",
            "seqlen_new": "i32",
            "num_splits": "i32",
            "page_size": "i32",
            "window_left": "i32",
            "window_right": "i32",
            "qk_scale": "fp32",
            "softcap": "fp32",
        },
        constexprs=dict(
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_D=cfg.block_d,
            CAUSAL=True,
            HAS_NEW=True,
            SPLIT=split,
            **{**dict.fromkeys(_FEATURE_FLAGS, False), **(flags or {})},
        ),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        aligned=(
            "Q",
            "K",
            "V",
            "KNew",
            "VNew",
            "SeqLens",
            "Out",
            "Lse",
            "OPart",
            "LsePart",
            "BlockTable",
            "CacheBatchIdx",
            "LeftPad",
            "Slopes",
            *strides,
            # Pages of 16 (vLLM's default) or 256 (flash-attn's); the block table's row
            # stride (pages per sequence) and the slopes' (heads) are any number.
            "page_size",
        ),
    )


def _combine_spec(head_dim: int, t: str) -> KernelSpec:
    block_d = decode_config(head_dim, 1).block_d
    warps = _combine_warps(block_d)
    return KernelSpec(
        label=f"attention_decode_combine {t} d={head_dim} tile={COMBINE_BLOCK_S}x{block_d} "
        f"w={warps}",
        kernel=_attention_decode_combine_kernel,
        signature={
            "OPart": "*fp32",
            "LsePart": "*fp32",
            "Out": f"*{t}",
            "Lse": "*fp32",
            "num_heads": "i32",
            "seqlen_q": "i32",
            "num_splits": "i32",
        },
        constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=COMBINE_BLOCK_S),
        num_warps=warps,
        aligned=("OPart", "LsePart", "Out", "Lse"),
    )
