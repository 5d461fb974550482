"""The decode benchmark: its bytes formula, its page shuffle, and its CPU cases agreeing."""

from __future__ import annotations

import torch


def test_bytes_formula(bench):
    b, h, h_kv, d, length, e = 2, 8, 2, 16, 33, 2
    kv = 2 * b * length * h_kv * d * e
    qo = 2 * b * h * d * e
    append = 4 * b * h_kv * d * e
    assert bench.decode_bytes(b, h, h_kv, d, length, e) == kv + qo + append
    # 33 positions fill 3 pages of 16: 3 int32 entries per sequence.
    assert bench.decode_bytes(b, h, h_kv, d, length, e, 16) == kv + qo + append + 4 * b * 3
    assert bench.decode_flops(b, h, d, length) == 4 * b * h * length * d


def test_paged_copy_holds_the_same_keys(bench):
    caches = [torch.randn(3, 8, 2, 4) for _ in "kv"]
    (k_pages, v_pages), table = bench.paged(caches, 4)
    assert table.dtype == torch.int32 and table.shape == (3, 2)
    for cache, pages in zip(caches, (k_pages, v_pages), strict=True):
        assert torch.equal(pages[table.long()].reshape(cache.shape), cache)


def test_quick_cpu_cases_agree(bench, monkeypatch):
    """Every provider at a small shape gives the same attention (the plain steps too)."""
    monkeypatch.setitem(bench.SIZES, ("cpu", True), ((2, 4, 2, 16, 21),))
    cases = list(bench.cases(True, torch.device("cpu")))
    providers = {c.provider for c in cases}
    assert {"fastlm-torch", "fastlm-torch paged16", "torch cat+sdpa"} <= providers
    outs = {c.provider: c.fn() for c in cases}
    plain = outs["fastlm-torch"]
    for name, out in outs.items():
        if "softcap" in name:
            continue
        out = out if out.shape == plain.shape else out.transpose(1, 2)  # heads-first steps
        torch.testing.assert_close(out, plain, msg=name)
    torch.testing.assert_close(
        outs["fastlm-torch paged16 softcap=30"], outs["fastlm-torch softcap=30"]
    )
