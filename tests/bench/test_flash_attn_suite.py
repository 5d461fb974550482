"""bench/flash_attn_suite.py: the flash_attn shim's translation onto fastlm's ops (no
upstream needed), its case selection, and a few upstream cases run through it when a
flash-attention checkout is at hand (FASTLM_FLASH_ATTN_UPSTREAM, or the local mirror)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastlm.ops
from fastlm.ops import attention_with_kvcache, flash_attention, flash_attention_varlen

UPSTREAM = Path(
    os.environ.get("FASTLM_FLASH_ATTN_UPSTREAM", "/work/.mirror/Dao-AILab+flash-attention/repo")
)


def _qkv(b=2, sq=5, sk=7, h=4, hkv=2, d=8, grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, s, n, d, generator=gen) for s, n in ((sq, h), (sk, hkv), (sk, hkv)))
    return [t.requires_grad_(grad) for t in (q, k, v)]


# --- keyword translation, without upstream ---------------------------------------------------


def test_func_translates_window_softcap_alibi_and_deterministic(bench):
    q, k, v = _qkv()
    slopes = torch.rand(4) * 0.3
    out = bench.flash_attn_func(q, k, v, 0.0, None, True, torch.tensor([3, 0]), 30.0, slopes, True)
    ref = flash_attention(q, k, v, causal=True, window=(3, 0), softcap=30.0, alibi_slopes=slopes)
    assert torch.equal(out, ref), (out - ref).abs().max()


def test_packed_layouts_are_views_of_the_same_call(bench):
    q, k, v = _qkv(h=2)
    plain = bench.flash_attn_func(q, k[:, :5], v[:, :5], causal=True)
    qkv = torch.stack((q, k[:, :5], v[:, :5]), dim=2)
    assert torch.equal(bench.flash_attn_qkvpacked_func(qkv, causal=True), plain)
    kv = torch.stack((k, v), dim=2)
    assert torch.equal(bench.flash_attn_kvpacked_func(q, kv), bench.flash_attn_func(q, k, v))
    # varlen: two sequences of 5 packed into 10 rows
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    packed = qkv.reshape(10, 3, 2, 8)
    out = bench.flash_attn_varlen_qkvpacked_func(packed, cu, 5, causal=True)
    ref = flash_attention_varlen(*packed.unbind(1), cu, cu, 5, 5, causal=True)
    assert torch.equal(out, ref)
    kvp = packed[:, 1:]
    out = bench.flash_attn_varlen_kvpacked_func(packed[:, 0], kvp, cu, cu, 5, 5, 0.0)
    assert torch.equal(out, flash_attention_varlen(*packed.unbind(1), cu, cu, 5, 5))


def test_optional_keywords_reach_fastlm_only_when_set(bench, monkeypatch):
    seen = []
    monkeypatch.setattr(fastlm.ops, "flash_attention", lambda *a, **kw: seen.append(kw) or a[0])
    q, k, v = _qkv()
    bench.flash_attn_func(q, k, v)
    assert set(seen[-1]) == {"causal", "softmax_scale", "dropout_p", "window"}
    bench.flash_attn_func(q, k, v, softcap=5.0, deterministic=True)
    assert seen[-1]["softcap"] == 5.0 and seen[-1]["deterministic"] is True


def test_attn_probs_take_flash_attn_form(bench):
    q, k, v = _qkv()
    out, lse, s_dmask = bench.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    _, lse_ref, probs = flash_attention(q, k, v, causal=True, return_attn_probs=True)
    # each row scaled so that its largest entry is exp(m - m) = 1, i.e. p * exp(lse - m)
    peak = s_dmask.abs().amax(-1)
    assert torch.allclose(peak, torch.ones_like(peak))
    assert torch.allclose(s_dmask * probs.amax(-1, keepdim=True), probs, rtol=1e-6, atol=0)
    assert torch.equal(lse, lse_ref)
    zero_row = bench._s_dmask(torch.zeros(1, 1, 2, 3))
    assert torch.equal(zero_row, torch.zeros(1, 1, 2, 3))


def test_fastlm_value_errors_read_as_flash_attn_runtime_errors(bench):
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="softmax_scale") as info:
        bench.flash_attn_func(q, k, v, softmax_scale=float("nan"))
    assert isinstance(info.value.__cause__, ValueError)


def test_kvcache_translation(bench):
    q, _, _ = _qkv(sq=2)
    gen = torch.Generator().manual_seed(1)
    k_cache, v_cache = (torch.randn(2, 16, 2, 8, generator=gen) for _ in range(2))
    k_new, v_new = (torch.randn(2, 2, 2, 8, generator=gen) for _ in range(2))
    caches = [t.clone() for t in (k_cache, v_cache)]
    out, lse = bench.flash_attn_with_kvcache(
        q,
        *caches,
        k_new,
        v_new,
        cache_seqlens=6,
        causal=True,
        window_size=torch.tensor([4, 0]),
        num_splits=0,
        return_softmax_lse=True,
    )
    lens = torch.full((2,), 6, dtype=torch.int32)
    ref_caches = [t.clone() for t in (k_cache, v_cache)]
    ref = attention_with_kvcache(
        q, *ref_caches, lens, k_new, v_new, causal=True, return_lse=True, window=(4, 0)
    )
    assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
    assert torch.equal(caches[0], ref_caches[0])  # k/v appended in place, as k_new/v_new
    # cache_seqlens None: the whole cache
    full = bench.flash_attn_with_kvcache(q, k_cache, v_cache)
    ref = attention_with_kvcache(q, k_cache, v_cache, torch.full((2,), 16, dtype=torch.int32))
    assert torch.equal(full, ref)


def test_rotary_stand_in_rotates_at_row_offsets(bench):
    if importlib.util.find_spec("einops") is None:
        pytest.skip("einops is not installed (upstream's rotary reference needs it)")
    sys.modules.pop("flash_attn", None)
    x = torch.randn(2, 3, 1, 8)
    cos, sin = torch.randn(10, 4), torch.randn(10, 4)
    offsets = torch.tensor([0, 4])

    def rope(x, cos, sin, interleaved):  # upstream's reference, written out for the check
        c = cos.repeat_interleave(2, -1) if interleaved else torch.cat((cos, cos), -1)
        s = sin.repeat_interleave(2, -1) if interleaved else torch.cat((sin, sin), -1)
        if interleaved:
            rot = torch.stack((-x[..., 1::2], x[..., ::2]), -1).flatten(-2)
        else:
            rot = torch.cat((-x[..., 4:], x[..., :4]), -1)
        return x * c[:, :, None] + rot * s[:, :, None]

    fake = type(sys)("flash_attn.layers.rotary")
    fake.apply_rotary_emb_torch = lambda x, c, s, inter: rope(x, c, s, inter)
    sys.modules["flash_attn"] = type(sys)("flash_attn")
    sys.modules["flash_attn.layers"] = type(sys)("flash_attn.layers")
    sys.modules["flash_attn.layers.rotary"] = fake
    try:
        out = bench.apply_rotary(x, cos, sin, seqlen_offsets=offsets, interleaved=True)
    finally:
        for name in ("flash_attn", "flash_attn.layers", "flash_attn.layers.rotary"):
            sys.modules.pop(name, None)
    pos = offsets[:, None] + torch.arange(3)
    assert torch.allclose(out, rope(x, cos[pos], sin[pos], True))


# --- case selection -------------------------------------------------------------------------


def test_rewrite_finds_every_pattern_or_says_which(bench):
    source = textwrap.dedent(
        """
        x = torch.cuda.get_device_capability("cuda")
        m = torch.cuda.get_device_properties("cuda").total_memory
        @pytest.mark.parametrize("has_batch_idx", [False])
        def test_a(has_batch_idx):
            device = "cuda"
        """
    )
    out = bench.rewrite_tests(source)
    assert '"cuda"' not in out and "(8, 0)" in out and "[False, True]" in out
    assert "@_fastlm_parametrize(" in out and out.rstrip().endswith("fastlm_select(globals())")
    with pytest.raises(ValueError, match="total_memory"):
        bench.rewrite_tests(source.replace("total_memory", "memory"))


def test_ids_are_pytests(bench, tmp_path):
    """The ids the suite gives its cases are the ones pytest gives upstream's decorators (so a
    failing id reruns upstream as written): checked against pytest's own collection."""
    decorators = textwrap.dedent(
        """
        import pytest, torch
        @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
        @pytest.mark.parametrize("block", [None, 256])
        @pytest.mark.parametrize("softcap", [0.0, 50.0])
        @pytest.mark.parametrize("mha", ["mha", "gqa"])
        @pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 128), (113, 203)])
        def test_x(seqlen_q, seqlen_k, mha, softcap, block, dtype):
            pass
        """
    )
    (tmp_path / "test_ids.py").write_text(decorators)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*cmd, "-c", os.devnull, "--rootdir", str(tmp_path), str(tmp_path / "test_ids.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    pytest_ids = sorted(
        line.split("[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if "[" in line
    )
    namespace = {"pytest": pytest, "torch": torch}
    exec(
        decorators.replace("@pytest.mark.parametrize(", "@fastlm_parametrize("),
        {**namespace, "fastlm_parametrize": bench.fastlm_parametrize},
        namespace,
    )
    names, cases = bench._expand(namespace["test_x"])
    assert names == ["seqlen_q", "seqlen_k", "mha", "softcap", "block", "dtype"]
    assert len(pytest_ids) == 32, done.stdout[-2000:]
    assert sorted(ident for _, ident in cases) == pytest_ids


def test_sample_reaches_every_group_and_is_seeded(bench):
    items = list(range(200))
    labels = [label for label, _ in bench.GROUPS]
    groups = {i: [labels[i % 7]] + ([labels[20]] if i == 199 else []) for i in items}
    picked = bench.sample(items, groups, 8, seed=3)
    assert len(picked) == 8 and picked == sorted(picked)
    assert {groups[i][0] for i in picked} >= set(labels[:7])
    assert 199 in picked  # the only member of its group
    assert picked == bench.sample(items, groups, 8, seed=3)
    assert bench.sample(items, groups, None, seed=0) == items


def test_size_limits(bench):
    assert bench.too_big({"seqlen_q": 1, "seqlen_k": 2048}, 1024, 1 << 20)
    assert bench.too_big({"seqlen_q": 256, "seqlen_k": 512}, 1024, 65536)
    assert not bench.too_big({"seqlen_q": 113, "seqlen_k": 203}, 1024, 65536)
    assert bench.too_big({"seqlen": 384}, 1024, 65536) and not bench.too_big({"d": 8}, 1, 1)


# --- upstream's own cases ---------------------------------------------------------------------


def _upstream_ready() -> str | None:
    if not UPSTREAM.exists():
        return f"no flash-attention checkout at {UPSTREAM} (set FASTLM_FLASH_ATTN_UPSTREAM)"
    if importlib.util.find_spec("einops") is None:
        return "einops is not installed (upstream's tests import it): pip install einops"
    return None


@pytest.mark.skipif(_upstream_ready() is not None, reason=str(_upstream_ready()))
def test_upstream_cases_pass_and_a_broken_shim_fails_them(bench):
    """Two upstream cases in one run: test_flash_attn_causal through the shim as it is (must
    pass), test_flash_attn_varlen_causal through a shim whose varlen output is nudged by one
    fp16 step (must fail: the suite can tell a wrong answer)."""

    def nudge_varlen(root: Path) -> None:
        interface = root / "flash_attn" / "flash_attn_interface.py"
        interface.write_text(
            interface.read_text()
            + "_exact = flash_attn_varlen_func\n\n\n"
            + "def flash_attn_varlen_func(*args, **kwargs):\n"
            + "    out = _exact(*args, **kwargs)\n"
            + "    return out + 1e-2 * out.detach().abs().amax()\n"
        )

    args = bench.parse_args(
        [
            "--upstream",
            str(UPSTREAM),
            "--tests",
            "test_flash_attn_causal,test_flash_attn_varlen_causal",
            "-k",
            "113-203-False-59-False-dtype0 and not 256 and not 512",
        ]
    )
    cases, header = bench.run_suite(args, tamper=nudge_varlen)
    outcomes = {case["id"].split("[")[0]: case for case in cases}
    assert header["selected"] == 2, header
    assert outcomes["test_flash_attn_causal"]["outcome"] == "passed", outcomes
    varlen = outcomes["test_flash_attn_varlen_causal"]
    assert varlen["outcome"] == "failed" and "assert" in varlen["message"], varlen
    rows = {row["group"]: row for row in bench.tally(cases)}
    assert rows["all"]["passed"] == 1 and rows["all"]["failed"] == 1
    assert "test_flash_attn_varlen_causal" in rows["fwd/bwd: varlen"]["first_failure"]
