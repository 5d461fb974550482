"""Decode attention from a KV cache (``fastlm.ops.attention_with_kvcache``): a contiguous
cache against a paged one (``block_table``), with and without a soft cap, and on the CPU
against the plain PyTorch decode steps a model would otherwise run.

Bytes moved (the GB/s numerator), for q (B, Sq, H, D) against L valid cached tokens per
sequence, e bytes per element, Hkv K/V heads, appending Sq_new tokens:

* the valid K/V cache read once, ``2*B*L*Hkv*D*e``; q read and o written, ``2*B*Sq*H*D*e``;
  the new keys and values read and written into the cache, ``4*B*Sq_new*Hkv*D*e``;
* paged: plus the block table's entries for the pages in use, ``4*B*ceil(L/page_size)``
  (int32). A paged kernel that moves no more than these bytes runs at the contiguous rate.

FLOPs ``4*B*H*Sq*L*D``. With Sq = 1 the op is memory-bound: GB/s (and "% roof" on GPUs) is
the figure of merit, and paged against contiguous at equal GB/s is the indirection's cost.
Soft-capped rows (``softcap=30``) use the same bytes: the tanh is elementwise work.

CPU rows time the torch backend (what CPU ``generate`` runs) at a small GPT-2 decode shape
beside plain PyTorch steps over the same keys: ``torch`` writes the new token into the same
(B, S, Hkv, D) cache and runs SDPA over the valid prefix (the step fastlm's call replaces;
``torch softcap=30`` caps the scores by the eager expression instead), ``torch cat+sdpa``
concatenates the new token to the past keys and values and runs SDPA with the padding mask
(Hugging Face's DynamicCache), ``torch static+sdpa`` writes it into a preallocated cache
with ``index_copy_`` and runs SDPA over the whole cache with a mask of the filled positions
(its StaticCache).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.harness import Case
from fastlm import backend, ops

# (B, H, Hkv, D, L) per (device, quick). GPU: Llama-like GQA at long caches; CPU: the
# generate shape (GPT-2 small's 6-head toy: batch 4, 96 cached tokens) and a longer one.
SIZES = {
    ("cuda", True): ((8, 32, 8, 128, 8192), (1, 32, 8, 128, 32768)),
    ("cuda", False): tuple((b, 32, 8, 128, n) for b in (1, 8, 32) for n in (4096, 16384, 65536)),
    ("cpu", True): ((4, 6, 6, 64, 96),),
    ("cpu", False): ((4, 6, 6, 64, 96), (8, 12, 12, 64, 1024)),
}
PAGE_SIZE = 16  # vLLM's default block size; the kernel takes any page size
SOFTCAP = 30.0


def decode_bytes(
    b: int, h: int, h_kv: int, d: int, length: int, e: int, page_size: int | None = None
) -> int:
    """Bytes by the module docstring's formula, for one query and one appended token."""
    moved = 2 * b * length * h_kv * d * e + 2 * b * h * d * e + 4 * b * h_kv * d * e
    if page_size is not None:
        moved += 4 * b * -(-length // page_size)
    return moved


def decode_flops(b: int, h: int, d: int, length: int) -> int:
    return 4 * b * h * length * d


def paged(
    caches: tuple[torch.Tensor, ...], page_size: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Caches (B, S, Hkv, D) as shuffled pages (B*S/page_size, page_size, Hkv, D) and their
    int32 block table (B, S/page_size): the same keys at scattered addresses."""
    b, s = caches[0].shape[:2]
    n = b * s // page_size
    order = torch.randperm(n, device=caches[0].device)
    pages = []
    for cache in caches:
        pages.append(torch.empty_like(cache).view(n, page_size, *cache.shape[2:]))
        pages[-1][order] = cache.reshape(n, page_size, *cache.shape[2:])
    return pages, order.view(b, s // page_size).int()


def _step(fn: Callable[[], object], name: str | None) -> Callable[[], object]:
    def step():
        with torch.no_grad(), backend.use_backend(name):
            return fn()

    return step


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    name = "triton" if on_gpu else "torch"
    e = dtype.itemsize
    for b, h, h_kv, d, length in SIZES[(device.type, quick)]:
        # Room for the appended token, rounded to whole pages.
        capacity = -(-(length + 1) // PAGE_SIZE) * PAGE_SIZE
        k_cache, v_cache = (
            torch.randn(b, capacity, h_kv, d, device=device, dtype=dtype) for _ in "kv"
        )
        (k_pages, v_pages), table = paged((k_cache, v_cache), PAGE_SIZE)
        q = torch.randn(b, 1, h, d, device=device, dtype=dtype)
        k_new, v_new = (torch.randn(b, 1, h_kv, d, device=device, dtype=dtype) for _ in "kv")
        # Every step rewrites the same slot: the lengths stay put across repetitions.
        lengths = torch.full((b,), length, dtype=torch.int32, device=device)
        shape = (b, h, h_kv, d, length)
        flops = decode_flops(b, h, d, length)
        plain = decode_bytes(b, h, h_kv, d, length, e)
        with_table = decode_bytes(b, h, h_kv, d, length, e, PAGE_SIZE)

        contiguous = functools.partial(
            ops.attention_with_kvcache, q, k_cache, v_cache, lengths, k_new, v_new, causal=True
        )
        pages = functools.partial(
            ops.attention_with_kvcache,
            q,
            k_pages,
            v_pages,
            lengths,
            k_new,
            v_new,
            causal=True,
            block_table=table,
        )
        capped = f"softcap={SOFTCAP:g}"
        rows = [
            (f"fastlm-{name}", contiguous, plain),
            (f"fastlm-{name} paged{PAGE_SIZE}", pages, with_table),
            (f"fastlm-{name} {capped}", functools.partial(contiguous, softcap=SOFTCAP), plain),
            (
                f"fastlm-{name} paged{PAGE_SIZE} {capped}",
                functools.partial(pages, softcap=SOFTCAP),
                with_table,
            ),
        ]
        for provider, fn, moved in rows:
            yield Case("attention decode", provider, shape, dtype, _step(fn, name), moved, flops)
        if not on_gpu:
            # In the same wrapper as fastlm's rows (the backend context is no-op for plain
            # PyTorch), so that the ratio compares the steps and not the wrappers: forcing a
            # backend validates its name, about a microsecond on this step's ~75.
            for provider, fn in _plain_steps(q, k_cache, v_cache, k_new, v_new, length).items():
                yield Case(
                    "attention decode", provider, shape, dtype, _step(fn, name), plain, flops
                )


def _plain_steps(q, k_cache, v_cache, k_new, v_new, length) -> dict[str, Callable[[], object]]:
    """The plain PyTorch decode steps of the module docstring, over the same keys."""
    b, capacity = k_cache.shape[:2]
    # Heads-first, as Hugging Face keeps its caches: (B, Hkv, S, D).
    past_k, past_v = (c[:, :length].transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    static_k, static_v = (c.transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k_new, v_new))
    padding = torch.ones(b, 1, 1, length + 1, dtype=torch.bool, device=q.device)
    filled = torch.zeros(b, 1, 1, capacity, dtype=torch.bool, device=q.device)
    filled[..., : length + 1] = True
    slot = torch.tensor([length], device=q.device)
    gqa = q.shape[2] != k_cache.shape[2]

    # The two steps in fastlm's own layout take q as the op does, (B, 1, H, D), and turn it
    # heads-first per step (as a model's step does with its fresh q) like the keys.
    def plain_sdpa():  # write the token, attend over the valid prefix
        k_cache[:, length : length + 1] = k_new
        v_cache[:, length : length + 1] = v_new
        k, v = (c[:, : length + 1].transpose(1, 2) for c in (k_cache, v_cache))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, enable_gqa=gqa).transpose(
            1, 2
        )

    def plain_softcap():  # the same step, scores capped by the eager expression (Gemma 2's)
        k_cache[:, length : length + 1] = k_new
        v_cache[:, length : length + 1] = v_new
        k, v = (c[:, : length + 1].transpose(1, 2) for c in (k_cache, v_cache))
        if gqa:
            k, v = (t.repeat_interleave(q.shape[2] // k.shape[1], dim=1) for t in (k, v))
        scores = q.transpose(1, 2) @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        scores = torch.tanh(scores / SOFTCAP) * SOFTCAP
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return (probs @ v).transpose(1, 2)

    def cat_sdpa():
        k, v = torch.cat((past_k, k_), 2), torch.cat((past_v, v_), 2)
        return F.scaled_dot_product_attention(q_, k, v, attn_mask=padding, enable_gqa=gqa)

    def static_sdpa():
        static_k.index_copy_(2, slot, k_)
        static_v.index_copy_(2, slot, v_)
        return F.scaled_dot_product_attention(
            q_, static_k, static_v, attn_mask=filled, enable_gqa=gqa
        )

    return {
        "torch": plain_sdpa,
        f"torch softcap={SOFTCAP:g}": plain_softcap,
        "torch cat+sdpa": cat_sdpa,
        "torch static+sdpa": static_sdpa,
    }
