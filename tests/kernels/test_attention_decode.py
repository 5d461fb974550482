"""KV-cache decode attention (flash-decoding) against a float64 reference, under the
numerical policy.

Only the Triton kernel exists (the C++ extension has no decode kernel): it runs under the
interpreter on the CPU and compiled on a GPU. The baseline "PyTorch's own error" is
``F.scaled_dot_product_attention`` in the input dtype with the same boolean mask for the
output, and for the log-sum-exp the CPU flash kernel SDPA dispatches to (the one PyTorch op
that returns it), both on K/V repeated to the query heads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fastlm.kernels import attention_decode as kernels
from fastlm.kernels.attention_decode import attention_decode

from fastlm.ops import masks
from fastlm.testing import assert_policy, poisoned_outputs

DTYPES = [torch.float16, torch.bfloat16]


def _visible(lengths: torch.Tensor, seqlen_q: int, capacity: int, causal: bool) -> torch.Tensor:
    """(B, Sq, S_max) bool: which cache positions each query sees: sequence b's first
    ``lengths[b]`` (bottom-right causal), never the unfilled rest."""
    return torch.stack(
        [
            F.pad(masks.visible(seqlen_q, n, causal), (0, capacity - n), value=False)
            for n in lengths.tolist()
        ]
    )


def _heads_first(q, k, v):
    """(B, H, Sq, D) queries and (B, H, S, D) keys/values, K/V repeated to the query heads."""
    group = q.shape[2] // k.shape[2]
    return (
        q.transpose(1, 2),
        k.repeat_interleave(group, 2).transpose(1, 2),
        v.repeat_interleave(group, 2).transpose(1, 2),
    )


def _reference(q, k, v, visible, scale):
    """out (B, Sq, H, D) and lse (B, H, Sq) in float64; rows seeing nothing get 0 and -inf."""
    q, k, v = _heads_first(q.double(), k.double(), v.double())
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible[:, None], -math.inf)
    lse = torch.logsumexp(scores, -1)
    p = torch.where(visible[:, None], torch.exp(scores - lse[..., None]), 0.0)
    return (p @ v).transpose(1, 2), lse


def _baseline(q, k, v, visible, scale):
    """PyTorch's out and lse at q's dtype (see the module docstring)."""
    q, k, v = _heads_first(q, k, v)
    mask = visible[:, None].expand(-1, q.shape[1], -1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    additive = masks.additive_mask(mask, q.dtype)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    _, lse = flash(q.cpu(), k.cpu(), v.cpu(), 0.0, False, attn_mask=additive, scale=scale)
    return out.transpose(1, 2), lse.to(q.device)


def run_case(
    device,
    lengths,
    sq,
    heads,
    kv_heads,
    head_dim,
    dtype,
    causal,
    sq_new=0,
    num_splits=None,
    capacity=None,
    caches=None,
    q=None,
):
    """One call checked against the reference: output, lse, and the caches after appending."""
    batch = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
    if capacity is None:
        capacity = int(lengths.max()) + sq_new + 3
    if caches is None:
        shape = (batch, capacity, kv_heads, head_dim)
        caches = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]
    k_cache, v_cache = caches
    if q is None:
        q = torch.randn(batch, sq, heads, head_dim, dtype=dtype, device=device)
    new = [None, None]
    if sq_new:
        shape = (batch, sq_new, kv_heads, head_dim)
        new = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]
    expected = [cache.clone() for cache in caches]
    for cache, appended in zip(expected, new, strict=True):
        for b, length in enumerate(lengths.tolist()):
            if appended is not None:
                cache[b, length : length + sq_new] = appended[b]
    scale = head_dim**-0.5 * 1.3

    with poisoned_outputs():
        out, lse = attention_decode(
            q,
            k_cache,
            v_cache,
            lengths,
            k_new=new[0],
            v_new=new[1],
            softmax_scale=scale,
            causal=causal,
            num_splits=num_splits,
        )

    for name, cache, want in zip(("k_cache", "v_cache"), caches, expected, strict=True):
        assert torch.equal(cache, want), f"{name} differs from the expected append"
    visible = _visible(lengths.cpu() + sq_new, sq, capacity, causal).to(device)
    ref_out, ref_lse = _reference(q, k_cache, v_cache, visible, scale)
    base_out, base_lse = _baseline(q, k_cache, v_cache, visible, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (batch, heads, sq) and lse.dtype == torch.float32
    live = visible.any(-1)  # (B, Sq)
    live_lse = live[:, None].expand(-1, heads, -1)
    assert torch.equal(out[~live], torch.zeros_like(out[~live])), "fully masked rows must be 0"
    assert (lse[~live_lse] == -math.inf).all(), "fully masked rows must have lse = -inf"
    assert_policy(out[live], ref_out[live], base_out[live], "out")
    assert_policy(lse[live_lse], ref_lse[live_lse], base_lse[live_lse], "lse")
    return out, lse


def _lengths(*fixed: int, extra: int = 2, most: int = 150) -> list[int]:
    """The given lengths plus ``extra`` fresh random ones in [2, most]."""
    return [*fixed, *torch.randint(2, most + 1, (extra,)).tolist()]


@pytest.fixture
def device(device_backend):
    device, backend = device_backend
    if backend != "triton":
        pytest.skip("decode attention has only a Triton kernel")
    return device


# (query heads, KV heads, head_dim, appends): GQA, MQA and MHA; head dims 16, 80 (padded to
# 128 with masks) and 128; appending k_new/v_new or not.
SHAPES = [(8, 2, 16, True), (4, 1, 80, False), (8, 2, 128, True), (3, 3, 80, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,causal", [(1, False), (1, True), (4, False), (4, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"h{s[0]}kv{s[1]}d{s[2]}new{int(s[3])}")
def test_decode_matches_reference(device, dtype, sq, causal, shape):
    """Lengths 0 and 1 (with Sq = 4 causal, rows that see nothing) and random ones, under the
    default split count (several, so the combine path and empty splits always run here)."""
    heads, kv_heads, head_dim, appends = shape
    run_case(
        device,
        _lengths(0, 1),
        sq,
        heads,
        kv_heads,
        head_dim,
        dtype,
        causal,
        sq_new=sq if appends else 0,
    )


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_split_counts(device, num_splits):
    """One split (no scratch, no combine) and several, some past every sequence's end; with
    several 64-key blocks per split and lengths that are multiples of no block."""
    run_case(
        device,
        _lengths(0, 1, 129, extra=1, most=300),
        2,
        8,
        2,
        64,
        torch.bfloat16,
        causal=True,
        sq_new=2,
        num_splits=num_splits,
    )


def test_splits_past_one_combine_step(device):
    """More non-empty splits than the combine kernel merges per step (COMBINE_BLOCK_S), with
    the largest scores in the last step: the earlier steps must be rescaled to its maximum."""
    first_late = kernels.COMBINE_BLOCK_S * 64  # 64 keys per split at this head dim
    capacity = first_late + 80
    q = torch.randn(2, 1, 2, 16, device=device)
    k_cache = torch.randn(2, capacity, 1, 16, device=device)
    k_cache[:, first_late:, 0] += q.sum(2)  # aligned with both query heads: large scores
    caches = [k_cache.half(), torch.randn(2, capacity, 1, 16, device=device).half()]
    run_case(
        device,
        [capacity - 1, 5],
        1,
        2,
        1,
        16,
        torch.float16,
        causal=False,
        sq_new=1,
        num_splits=kernels.COMBINE_BLOCK_S + 4,
        capacity=capacity,
        caches=caches,
        q=q.half(),
    )


def test_many_query_rows(device):
    """(H/Hkv) * Sq = 72 rows: two row blocks, of which only the first appends."""
    run_case(
        device,
        _lengths(0, 3, extra=1),
        9,
        16,
        2,
        32,
        torch.float16,
        causal=True,
        sq_new=9,
        num_splits=2,
    )


def test_more_new_tokens_than_queries(device):
    run_case(device, _lengths(0, extra=2), 2, 4, 2, 64, torch.bfloat16, causal=True, sq_new=5)


def test_strided_caches_and_query(device):
    """Caches that are slices of a larger pool (batch stride) and a (B, Hkv, S, D) buffer
    seen as (B, S, Hkv, D); q a slice of a fused qkv tensor."""
    batch, capacity, kv_heads, head_dim, heads = 3, 90, 2, 64, 4
    pool = torch.randn(2 * batch, capacity, kv_heads, head_dim, device=device).half()
    k_cache = pool[::2]
    v_cache = torch.randn(batch, kv_heads, capacity, head_dim, device=device).half()
    v_cache = v_cache.transpose(1, 2)
    qkv = torch.randn(batch, 1, 3 * heads, head_dim, device=device).half()
    q = qkv[:, :, :heads]
    assert not (k_cache.is_contiguous() or v_cache.is_contiguous() or q.is_contiguous())
    run_case(
        device,
        [5, 0, 77],
        1,
        heads,
        kv_heads,
        head_dim,
        torch.float16,
        causal=True,
        sq_new=1,
        capacity=capacity,
        caches=[k_cache, v_cache],
        q=q,
    )


def test_offsets_past_2_31_elements(device):
    """Sequences that start beyond element 2**31 of the cache: 32-bit offsets would wrap.

    Batches sit 2**30 elements apart in one 4 GiB (bf16) allocation, of which only the
    touched pages are ever committed.
    """
    batch, capacity, head_dim, stride = 3, 40, 16, 2**30
    caches = []
    for _ in range(2):
        storage = torch.empty(
            (batch - 1) * stride + capacity * head_dim, dtype=torch.bfloat16, device=device
        )
        cache = storage.as_strided((batch, capacity, 1, head_dim), (stride, head_dim, 0, 1))
        cache.copy_(torch.randn(batch, capacity, 1, head_dim))
        caches.append(cache)
    run_case(
        device,
        [3, 20, 33],
        1,
        2,
        1,
        head_dim,
        torch.bfloat16,
        causal=False,
        sq_new=1,
        capacity=capacity,
        caches=caches,
    )


def test_empty_batch(device):
    q = torch.randn(0, 1, 2, 16, device=device).half()
    cache = torch.randn(0, 8, 1, 16, device=device).half()
    lengths = torch.zeros(0, dtype=torch.int32, device=device)
    out, lse = attention_decode(q, cache, cache, lengths, softmax_scale=0.25, causal=True)
    assert out.shape == (0, 1, 2, 16) and lse.shape == (0, 2, 1)


def test_launcher_limits(device):
    """The launcher refuses only what is its own: shapes, dtypes, devices, lengths and room
    are the op's contract (tests/ops/test_attention.py, tests/ops/test_conformance.py)."""
    q = torch.randn(2, 1, 4, 16, device=device).half()
    cache = torch.randn(2, 8, 2, 16, device=device).half()
    lengths = torch.tensor([5, 6], dtype=torch.int32, device=device)

    def call(**overrides):
        args = dict(q=q, k_cache=cache, v_cache=cache, cache_seqlens=lengths)
        args.update(overrides)
        kwargs = {k: args.pop(k) for k in ("k_new", "v_new", "num_splits") if k in args}
        return attention_decode(*args.values(), softmax_scale=0.25, causal=False, **kwargs)

    with pytest.raises(ValueError, match="fp16/bf16"):
        call(q=q.float(), k_cache=cache.float(), v_cache=cache.float())
    with pytest.raises(ValueError, match="unit stride"):
        call(k_cache=cache.transpose(1, 3).contiguous().transpose(1, 3))
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=0)
    with pytest.raises(ValueError, match="Sq >= 1"):
        call(q=q[:, :0])
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(2, 1, 1, 264, device=device).half()
        call(q=torch.randn(2, 1, 2, 264, device=device).half(), k_cache=big, v_cache=big)
