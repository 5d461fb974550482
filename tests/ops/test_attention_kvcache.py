"""``fastlm.ops.attention_with_kvcache``: flash-attn's ``flash_attn_with_kvcache`` keywords
(paged caches, cache rows, left padding, ALiBi, windows, soft cap, rotary) against a float64
reference built row by row, and its contract.

The reference follows flash-attn's semantics (its ``test_flash_attn_kvcache``): row b's keys
are cache positions ``[cache_leftpad[b], cache_seqlens[b] + Sq_new)`` of cache row
``cache_batch_idx[b]`` (or of the pages ``block_table[b]``), masks and ALiBi distances are
bottom-right aligned at that key count, and rotary rotates k_new token t at position
``cache_seqlens[b] + t`` and query i at ``cache_seqlens[b] + i`` (causal or windowed) or at
``cache_seqlens[b]``. The baseline, "PyTorch's own error", is the same formula evaluated in
the inputs' dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlm
from fastlm import ops
from fastlm.ops.attention import _reference
from fastlm.ops.masks import window_bounds
from fastlm.ops.rotary import apply_rotary_ref
from fastlm.testing import assert_policy, poisoned_outputs

BACKENDS = ["torch", "triton"]


def _dtype(be: str, dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The Triton kernel takes fp16/bf16: its fp32 cases run in fp16."""
    return torch.float16 if be == "triton" and dtype == torch.float32 else dtype


def _angles(positions: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    angles = torch.outer(torch.arange(positions).double(), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _paged(caches, page_size):
    """The caches as shuffled pages plus two spare pages, and the block table."""
    b, s = caches[0].shape[:2]
    n = b * s // page_size + 2
    order = torch.randperm(n)[: b * s // page_size]
    pages = []
    for cache in caches:
        p = torch.full((n, page_size, *cache.shape[2:]), math.nan, dtype=cache.dtype)
        p[order] = cache.reshape(-1, page_size, *cache.shape[2:])
        pages.append(p)
    return pages, order.view(b, s // page_size).int()


def _rotated(x, cos, sin, interleaved, positions, dtype):
    """x (B, S, H, D) rotated at positions (B, S), computed in ``dtype``."""
    return apply_rotary_ref(
        x.to(dtype), cos.to(dtype), sin.to(dtype), interleaved, position_ids=positions
    )


def _expected(q, k_rows, v_rows, lengths, n_new, k_new, v_new, kw, dtype):
    """out (B, Sq, H, D) and lse (B, H, Sq) computed in ``dtype`` row by row; ``k_rows``,
    ``v_rows``: each row's logical cache (B, S, Hkv, D) before the append."""
    batch, seqlen_q = q.shape[:2]
    cos, sin = kw.get("rotary_cos"), kw.get("rotary_sin")
    leftpad = kw.get("cache_leftpad")
    window = window_bounds(kw.get("window", (-1, -1)))
    slopes = kw.get("alibi_slopes")
    outs, lses = [], []
    for b in range(batch):
        n = int(lengths[b])
        qb, kb, vb = (t[b : b + 1].to(dtype) for t in (q, k_rows, v_rows))
        if n_new:
            knb, vnb = k_new[b : b + 1].to(dtype), v_new[b : b + 1].to(dtype)
            if cos is not None:
                interleaved = kw.get("rotary_interleaved", True)
                t_pos = torch.arange(n, n + n_new)[None]
                windowed = kw.get("causal", False) or window != (None, None)
                q_pos = torch.arange(n, n + seqlen_q)[None] if windowed else None
                q_pos = torch.full((1, seqlen_q), n) if q_pos is None else q_pos
                qb = _rotated(qb, cos, sin, interleaved, q_pos, dtype)
                knb = _rotated(knb, cos, sin, interleaved, t_pos, dtype)
            kb = torch.cat((kb[:, :n], knb), 1)
            vb = torch.cat((vb[:, :n], vnb), 1)
        start = 0 if leftpad is None else int(leftpad[b])
        kb, vb = kb[:, start : n + n_new], vb[:, start : n + n_new]
        row_slopes = None
        if slopes is not None:
            row_slopes = (slopes if slopes.dim() == 1 else slopes[b]).to(dtype)[None]
        out, lse = _reference(
            qb,
            kb,
            vb,
            causal=kw.get("causal", False),
            scale=kw.get("softmax_scale") or q.shape[-1] ** -0.5,
            window=window,
            slopes=row_slopes,
            softcap=kw.get("softcap", 0.0),
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def run_case(
    be="torch",
    lengths=(0, 5, 13),
    sq=1,
    n_new=1,
    h=4,
    hkv=2,
    d=16,
    dtype=torch.float32,
    spare=3,
    page_size=None,
    batch_idx=False,
    leftpad=False,
    rotary=None,
    **kw,
):
    """One call of the op against the reference, its appends against the expected caches."""
    batch = len(lengths)
    capacity = max(lengths) + n_new + spare
    if page_size:
        capacity = -(-capacity // page_size) * page_size
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(batch, sq, h, d, dtype=dtype)
    k_new = v_new = None
    if n_new:
        k_new, v_new = (torch.randn(batch, n_new, hkv, d, dtype=dtype) for _ in "kv")
    rows = [torch.randn(batch, capacity, hkv, d, dtype=dtype) for _ in "kv"]
    extra = {}
    if leftpad:
        extra["cache_leftpad"] = torch.tensor([torch.randint(0, n + 1, ()) for n in lengths]).int()
    if page_size or batch_idx:
        # Read through a copy whose free slots the op zeroes: they may hold anything.
        for row in rows:
            for b, n in enumerate(lengths):
                row[b, n:] = math.nan
                if leftpad:
                    row[b, : extra["cache_leftpad"][b]] = math.nan
    caches = rows
    if page_size:
        caches, extra["block_table"] = _paged(rows, page_size)
    elif batch_idx:  # query row b uses cache row idx[b] of a larger cache
        idx = torch.randperm(batch + 2)[:batch]
        caches = [torch.full((batch + 2, *rows[0].shape[1:]), math.nan, dtype=dtype) for _ in "kv"]
        for cache, row in zip(caches, rows, strict=True):
            cache[idx] = row
        extra["cache_batch_idx"] = idx.int()
    if rotary is not None:  # rotary = (rotary_dim, interleaved)
        extra["rotary_cos"], extra["rotary_sin"] = _angles(capacity + sq, rotary[0])
        extra["rotary_interleaved"] = rotary[1]
    kw = {**kw, **extra}
    before = [c.clone() for c in caches]

    again = [c.clone() for c in caches]
    with poisoned_outputs(), fastlm.use_backend(be):
        out, lse = ops.attention_with_kvcache(
            q, *caches, lengths_t, k_new, v_new, return_lse=True, **kw
        )
        # Without the lse the torch backend takes SDPA (unless ALiBi or the cap need the
        # scores): both paths, on the same caches.
        alone = ops.attention_with_kvcache(q, *again, lengths_t, k_new, v_new, **kw)

    ref_out, ref_lse = _expected(q, *rows, lengths, n_new, k_new, v_new, kw, torch.float64)
    base_out, base_lse = _expected(q, *rows, lengths, n_new, k_new, v_new, kw, dtype)
    assert out.shape == q.shape and out.dtype == dtype
    live = ref_lse > -math.inf  # (B, H, Sq)
    dead = ~live.transpose(1, 2)  # (B, Sq, H)
    assert torch.equal(out[dead], torch.zeros_like(out[dead])), "rows with no key must be 0"
    assert (lse[~live] == -math.inf).all(), "rows with no key must have lse -inf"
    assert_policy(out[~dead], ref_out[~dead], base_out[~dead], "out")
    assert torch.equal(alone[dead], torch.zeros_like(alone[dead])), "rows with no key must be 0"
    assert_policy(alone[~dead], ref_out[~dead], base_out[~dead], "out without lse")
    assert_policy(lse[live], ref_lse[live], base_lse[live].float(), "lse")
    _check_appends(before, caches, lengths, k_new, v_new, extra, n_new, dtype)
    return out


def _check_appends(before, caches, lengths, k_new, v_new, extra, n_new, dtype):
    """The caches changed exactly at the appended slots, to the (rotated) new keys."""
    expected = [c.clone() for c in before]
    for b, n in enumerate(lengths):
        for t in range(n_new):
            pos = n + t
            if "block_table" in extra:
                page_size = before[0].shape[1]
                where = (int(extra["block_table"][b, pos // page_size]), pos % page_size)
            elif "cache_batch_idx" in extra:
                where = (int(extra["cache_batch_idx"][b]), pos)
            else:
                where = (b, pos)
            k_t = k_new[b : b + 1, t : t + 1]
            if "rotary_cos" in extra:
                cos, sin = extra["rotary_cos"], extra["rotary_sin"]
                at = torch.tensor([[pos]])
                # The op rotates in fp32 and rounds once, as the rotary op's torch backend.
                k_t = _rotated(k_t, cos, sin, extra["rotary_interleaved"], at, torch.float32)
            expected[0][where] = k_t[0, 0].to(dtype)
            expected[1][where] = v_new[b, t]
    for name, got, want in zip(("k_cache", "v_cache"), caches, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=name)


# (id, keywords): each feature alone, then in the combinations flash-attn allows.
CASES = [
    ("plain", {}),
    ("one length", dict(lengths=(9, 9, 9), causal=True)),
    ("one length sq3", dict(lengths=(9, 9), sq=3, n_new=3, causal=True)),
    ("no append", dict(n_new=0, lengths=(0, 4, 11))),
    ("every row empty", dict(n_new=0, lengths=(0, 0))),
    ("paged4", dict(page_size=4, lengths=(0, 5, 13), n_new=2, sq=2, causal=True)),
    ("paged1", dict(page_size=1, lengths=(3, 1))),
    # Several 64-key tiles per split, each spanning pages; a split boundary inside a page.
    ("paged16 long", dict(page_size=16, lengths=(0, 70, 150), num_splits=2, causal=True)),
    ("batch idx", dict(batch_idx=True, n_new=2)),
    ("leftpad", dict(leftpad=True, lengths=(2, 7, 12), sq=2, n_new=2, causal=True)),
    ("alibi (H,)", dict(alibi_slopes=torch.rand(4), causal=True)),
    ("alibi (B,H)", dict(alibi_slopes=torch.rand(3, 4), sq=3, n_new=3)),
    ("window left", dict(window=(3, -1), causal=True, sq=2, n_new=2)),
    ("window both", dict(window=(4, 1), sq=3, n_new=1, lengths=(1, 6, 10))),
    # New keys left of every query's window: still appended.
    ("window past new keys", dict(window=(1, -1), causal=True, n_new=4, lengths=(0, 3, 9))),
    ("softcap", dict(softcap=5.0, softmax_scale=0.9)),
    ("rotary interleaved causal", dict(rotary=(8, True), causal=True, sq=2, n_new=2)),
    ("rotary neox non-causal", dict(rotary=(16, False), sq=3, n_new=2)),
    ("rotary windowed non-causal", dict(rotary=(8, True), window=(6, 2), sq=3, n_new=3)),
    ("mqa bf16", dict(h=6, hkv=1, dtype=torch.bfloat16, n_new=2, sq=2, causal=True)),
    (
        "paged + rotary + alibi + softcap + window",
        dict(
            page_size=4,
            rotary=(8, False),
            alibi_slopes=torch.rand(4),
            softcap=3.0,
            window=(5, -1),
            causal=True,
            sq=2,
            n_new=2,
        ),
    ),
    (
        "batch idx + leftpad + rotary + alibi, bf16",
        dict(
            batch_idx=True,
            leftpad=True,
            rotary=(16, True),
            alibi_slopes=torch.rand(3, 4),
            causal=True,
            dtype=torch.bfloat16,
        ),
    ),
]


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("kw", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(be, kw):
    run_case(be, **{**kw, "dtype": _dtype(be, kw.get("dtype", torch.float32))})


@pytest.mark.parametrize("be", BACKENDS)
def test_paged_decode_loop_matches_contiguous(be):
    """Eight decode steps (prefill of three, then one token a step) into a paged cache and a
    contiguous one give the same outputs: the paged layout changes addresses only."""
    batch, h, hkv, d, page_size, steps = 2, 4, 2, 16, 4, 8
    capacity, dtype = 12, _dtype(be)
    contiguous = [torch.zeros(batch, capacity, hkv, d, dtype=dtype) for _ in "kv"]
    # Never-written slots hold NaN; page 4 is not used.
    pages = [torch.full((7, page_size, hkv, d), math.nan, dtype=dtype) for _ in "kv"]
    table = torch.tensor([[5, 0, 3], [1, 6, 2]], dtype=torch.int32)
    # Row 1 starts with two tokens: the rows' lengths differ at every step.
    lengths = torch.tensor([0, 2], dtype=torch.int32)
    for cache, paged in zip(contiguous, pages, strict=True):
        cache[1, :2] = torch.randn(2, hkv, d, dtype=dtype)
        paged[1, :2] = cache[1, :2]
    with fastlm.use_backend(be):
        for step in range(steps):
            n = 3 if step == 0 else 1
            q = torch.randn(batch, n, h, d, dtype=dtype)
            k_new, v_new = (torch.randn(batch, n, hkv, d, dtype=dtype) for _ in "kv")
            a = ops.attention_with_kvcache(q, *contiguous, lengths, k_new, v_new, causal=True)
            b = ops.attention_with_kvcache(
                q, *pages, lengths, k_new, v_new, causal=True, block_table=table
            )
            # The same arithmetic on the same numbers, read from other addresses.
            assert torch.equal(a, b), (step, (a - b).abs().max())
            lengths += n


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("lengths", [(7, 7), (3, 9)], ids=["one length", "ragged"])
def test_nan_query_gives_nan_only_where_it_sees_a_key(be, lengths):
    q = torch.randn(2, 1, 2, 16, dtype=_dtype(be))
    q[1, 0, 0, 5] = math.nan
    caches = [torch.randn(2, 12, 2, 16, dtype=_dtype(be)) for _ in "kv"]
    with fastlm.use_backend(be):
        out = ops.attention_with_kvcache(q, *caches, torch.tensor(lengths, dtype=torch.int32))
    assert out[1, 0, 0].isnan().all()
    assert not out[1, 0, 1].isnan().any() and not out[0].isnan().any()


def test_compiles_fullgraph_with_pages():
    q = torch.randn(2, 1, 4, 16)
    k_new, v_new = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lengths = torch.tensor([3, 6], dtype=torch.int32)
    table = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)

    def step(q, k_cache, v_cache, k_new, v_new):
        return ops.attention_with_kvcache(
            q, k_cache, v_cache, lengths, k_new, v_new, causal=True, block_table=table
        )

    caches = [torch.randn(4, 4, 2, 16) for _ in range(2)]
    copies = [c.clone() for c in caches]
    eager = step(q, *caches, k_new, v_new)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, *copies, k_new, v_new)
    torch.testing.assert_close(compiled, eager)
    assert all(torch.equal(a, b) for a, b in zip(caches, copies, strict=True))


# --- the contract: refused before a backend is chosen ------------------------------------------


def _args(batch=2, pages=None):
    q = torch.randn(batch, 1, 4, 16)
    shape = (batch, 8, 2, 16) if pages is None else (pages, 4, 2, 16)
    kc, vc = torch.randn(shape), torch.randn(shape)
    kn, vn = torch.randn(batch, 1, 2, 16), torch.randn(batch, 1, 2, 16)
    return q, kc, vc, torch.tensor([3, 5], dtype=torch.int32), kn, vn


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


REFUSED = [
    (dict(block_table=_i32(0, 1)), ValueError, "block_table must be \\(batch, max_pages\\)"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]])), TypeError, "block_table must be an int32"),
    (dict(block_table=_i32(0, 1, 2, 9).view(2, 2)), ValueError, "num_pages = 6"),
    # Named as flash-attn's own bounds test expects: the block table is what is short.
    (dict(block_table=_i32(0, 1).view(2, 1)), ValueError, "no room: .* exceed block_table's 1"),
    (
        dict(block_table=_i32(0, 1, 2, 3, 4, 5).view(2, 3), cache_leftpad=_i32(0, 0)),
        ValueError,
        "cache_leftpad cannot be combined with block_table",
    ),
    (
        dict(block_table=_i32(0, 1, 2, 3, 4, 5).view(2, 3), cache_batch_idx=_i32(0, 1)),
        ValueError,
        "cache_batch_idx cannot be combined with block_table",
    ),
]
REFUSED_DENSE = [
    (dict(cache_batch_idx=_i32(0, 2)), ValueError, "cache_batch_idx values must lie in \\[0, 2\\)"),
    (dict(cache_batch_idx=_i32(0, 1, 1)), ValueError, "cache_batch_idx must have shape"),
    (dict(cache_leftpad=_i32(0, 6)), ValueError, "cache_leftpad must be <= cache_seqlens"),
    (dict(cache_leftpad=_i32(-1, 0)), ValueError, "cache_leftpad must be >= 0"),
    (dict(cache_leftpad=torch.tensor([0, 1])), TypeError, "cache_leftpad must be an int32"),
    (dict(rotary_cos=torch.ones(9, 4)), ValueError, "rotary_cos and rotary_sin"),
    (
        dict(rotary_cos=torch.ones(9, 4), rotary_sin=torch.ones(9, 4), no_new=True),
        ValueError,
        "they need k_new",
    ),
    (dict(rotary_cos=torch.ones(9, 9), rotary_sin=torch.ones(9, 9)), ValueError, "rotary_dim"),
    (dict(rotary_cos=torch.ones(5, 4), rotary_sin=torch.ones(5, 4)), ValueError, "position 5"),
    (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(window=(2,)), (TypeError, ValueError), "window"),
]


@pytest.mark.parametrize("be", ["torch", "triton"])
@pytest.mark.parametrize(
    "kw,error,match", REFUSED + REFUSED_DENSE, ids=[m for _, _, m in REFUSED + REFUSED_DENSE]
)
def test_contract_refuses(be, kw, error, match):
    kw = dict(kw)
    no_new = kw.pop("no_new", False)
    paged = "block_table" in kw
    q, kc, vc, lengths, kn, vn = _args(pages=6 if paged else None)
    if no_new:
        kn = vn = None
    half = [None if t is None else t.half() for t in (q, kc, vc, kn, vn)]
    with fastlm.use_backend(be), pytest.raises(error, match=match):
        ops.attention_with_kvcache(*half[:3], lengths, *half[3:], **kw)


# --- issue 21: the decode step's fast check, and the op's two entrances ---------------------


def _step_args(b=2, s_max=9, h=4, hkv=2, d=8, lengths=(3, 5), new=1, dtype=torch.float32):
    q = torch.randn(b, 1, h, d, dtype=dtype)
    caches = [torch.randn(b, s_max, hkv, d, dtype=dtype) for _ in "kv"]
    news = [torch.randn(b, new, hkv, d, dtype=dtype) for _ in "kv"]
    return q, *caches, torch.tensor(lengths, dtype=torch.int32), *news


def _with(i, value):
    """The step's arguments with argument i replaced (``value`` maps the old one)."""

    def make():
        args = list(_step_args())
        args[i] = value(args[i])
        return args

    return make


_STEP_CALLS = {
    "plain": _step_args,
    "gqa 4 of 1": lambda: _step_args(hkv=1),
    "full cache": lambda: _step_args(lengths=(8, 2)),
    "no room": lambda: _step_args(lengths=(9, 2)),
    "negative length": lambda: _step_args(lengths=(-1, 2)),
    "int64 lengths": _with(3, lambda t: t.long()),
    "lengths shape": _with(3, lambda t: t[:1]),
    "k_new heads": _with(4, lambda t: t.repeat(1, 1, 2, 1)),
    "v_new shape": _with(5, lambda t: t[:, :, :, :4]),
    "v_new dtype": _with(5, lambda t: t.double()),
    "k_cache dtype": _with(1, lambda t: t.half()),
    "v_cache shape": _with(2, lambda t: t[:, :8]),
    "cache batch": _with(1, lambda t: t[:1]),
    "q dims": _with(0, lambda t: t[0]),
    "empty q": _with(0, lambda t: t[:, :0]),
    "int q": _with(0, lambda t: t.int()),
    "list lengths": _with(3, lambda t: t.tolist()),
    "head_dim": lambda: _step_args(d=0),
}
_STEP_OPTIONS = {
    "defaults": {},
    "causal, scale": dict(causal=True, softmax_scale=0.3),
    "int scale": dict(softmax_scale=1),
    "nan scale": dict(softmax_scale=math.nan),
    "softcap": dict(softcap=2.0),
    "bad softcap": dict(softcap=-1.0),
}


def _step_outcome(make, options):
    torch.manual_seed(0)
    args = make()
    try:
        out = ops.attention_with_kvcache(*args, **options)
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    return out, args[1], args[2]  # the caches, appended in place


@pytest.mark.parametrize("options", _STEP_OPTIONS.values(), ids=_STEP_OPTIONS)
@pytest.mark.parametrize("make", _STEP_CALLS.values(), ids=_STEP_CALLS)
def test_decode_step_fast_check_answers_as_the_full_check(monkeypatch, make, options):
    from fastlm.ops import attention_kvcache

    fast = _step_outcome(make, options)
    monkeypatch.setattr(attention_kvcache, "_decode_step", lambda *args: None)
    monkeypatch.setattr(attention_kvcache, "_PASSED_STEPS", {})  # and its inline twin
    monkeypatch.setattr(attention_kvcache, "_new_step", lambda *args: None)
    full = _step_outcome(make, options)
    if isinstance(full[0], torch.Tensor):
        assert all(torch.equal(a, b) for a, b in zip(fast, full, strict=True))
    else:
        assert fast == full


def test_decode_step_calls_cover_both_answers():
    outcomes = [_step_outcome(make, {}) for make in _STEP_CALLS.values()]
    accepted = sum(isinstance(o[0], torch.Tensor) for o in outcomes)
    assert 3 <= accepted <= len(outcomes) - 10, accepted
    from fastlm.ops.attention_kvcache import _decode_step

    assert _decode_step(*_step_args(), None) is not None  # the fast check serves the usual call


def test_torch_decode_step_is_the_plain_step_bit_for_bit():
    """Contiguous caches, one new token per row at a shared length: the torch backend's step
    is the plain one (write the token, SDPA over the valid prefix), bit for bit."""
    q, k_cache, v_cache, lengths, k_new, v_new = _step_args(lengths=(5, 5), hkv=4)
    plain_k, plain_v = k_cache.clone(), v_cache.clone()
    out = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new, causal=True)
    plain_k[:, 5:6], plain_v[:, 5:6] = k_new, v_new
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), plain_k[:, :6].transpose(1, 2), plain_v[:, :6].transpose(1, 2)
    ).transpose(1, 2)
    assert torch.equal(out, plain)
    assert torch.equal(k_cache, plain_k) and torch.equal(v_cache, plain_v)


def test_kernel_step_eager_and_compiled_agree(monkeypatch):
    """Forced Triton (the interpreter): eager calls the decode kernel directly (no
    dispatcher), torch.compile through the custom op that declares the cache writes; the
    same output and the same caches, bit for bit."""
    from fastlm.ops import attention_kvcache

    q, k_cache, v_cache, lengths, k_new, v_new = _step_args(dtype=torch.float16)
    caches = [k_cache.clone(), v_cache.clone()]

    def step(q, k_cache, v_cache, k_new, v_new):
        return ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new, causal=True)

    dispatched = []
    real = attention_kvcache.attention_kvcache_op.op
    monkeypatch.setattr(
        attention_kvcache.attention_kvcache_op, "op", lambda *a: dispatched.append(1) or real(*a)
    )
    with fastlm.use_backend("triton"):
        eager = step(q, k_cache, v_cache, k_new, v_new)
        assert dispatched == []
        monkeypatch.undo()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(
            q, *caches, k_new, v_new
        )
    assert torch.equal(eager, compiled)
    assert torch.equal(caches[0], k_cache) and torch.equal(caches[1], v_cache)


def test_decode_step_memo_checks_values_every_call():
    """A decode step's metadata checks are remembered per signature; the lengths are read
    on every call, so a remembered signature with no room left still raises, and a
    failing signature raises every time."""
    from fastlm.ops import attention_kvcache

    k_cache, v_cache = (torch.zeros(2, 6, 1, 4, dtype=torch.float64) for _ in "kv")
    q, k_new, v_new = (torch.randn(2, 1, 1, 4, dtype=torch.float64) for _ in "qkv")
    attention_kvcache._PASSED_STEPS.clear()
    for step in range(2):  # the second step answers from the memo
        lengths = torch.full((2,), 4 + step, dtype=torch.int32)
        out = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
        keys = 5 + step
        ref, _ = _reference(q, k_cache[:, :keys], v_cache[:, :keys], causal=False, scale=0.5)
        eps = torch.finfo(torch.float64).eps
        torch.testing.assert_close(out, ref, rtol=64 * eps, atol=64 * eps)
    assert len(attention_kvcache._PASSED_STEPS) == 1
    full = torch.full((2,), 6, dtype=torch.int32)
    for _ in range(2):
        with pytest.raises(ValueError, match="no room"):
            ops.attention_with_kvcache(q, k_cache, v_cache, full, k_new, v_new)
        with pytest.raises(TypeError, match="v_new is torch.float32"):
            ops.attention_with_kvcache(q, k_cache, v_cache, full - 2, k_new, v_new.float())
        with pytest.raises(ValueError, match="k_new must be"):
            ops.attention_with_kvcache(q, k_cache, v_cache, full - 2, k_new[:1], v_new[:1])
    assert len(attention_kvcache._PASSED_STEPS) == 1


def test_decode_step_lengths_memo_sees_in_place_changes_and_new_tensors():
    """The lengths' values are read once per tensor and version (every layer of a decode step
    passes the same tensor): an in-place advance after a good call is seen ("no room" still
    raises), and a new tensor that may reuse a freed one's id is read afresh."""
    from fastlm.ops import _common

    k_cache, v_cache = (torch.zeros(2, 6, 1, 4, dtype=torch.float64) for _ in "kv")
    q, k_new, v_new = (torch.randn(2, 1, 1, 4, dtype=torch.float64) for _ in "qkv")
    lengths = torch.full((2,), 4, dtype=torch.int32)
    ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
    assert _common._ranges[id(lengths)][2:] == (4, 4)
    lengths += 2  # no room left for the new token
    with pytest.raises(ValueError, match="no room: cache_seqlens up to 6"):
        ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
    lengths.fill_(1)  # in place again: shorter rows attend to fewer keys
    out = ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
    ref, _ = _reference(q, k_cache[:, :2], v_cache[:, :2], causal=False, scale=0.5)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(out, ref, rtol=64 * eps, atol=64 * eps)
    for _ in range(8):  # new tensors, often at the freed one's id: never the old values
        del lengths
        lengths = torch.full((2,), 6, dtype=torch.int32)
        with pytest.raises(ValueError, match="no room"):
            ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
        lengths.fill_(1)
        ops.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new, v_new)
