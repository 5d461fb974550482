"""flash-attention's own tests (``tests/test_flash_attn.py``) run against fastlm's ops.

An outsider's check: upstream's test file is read at run time from a flash-attention
checkout (or a bare git directory: ``git show REV:path``) and never stored in this repo.
In a temporary directory the tool lays out a package named ``flash_attn`` whose public
functions call fastlm's public ops (:func:`fastlm.ops.flash_attention`,
:func:`fastlm.ops.flash_attention_varlen`, :func:`fastlm.ops.attention_with_kvcache`),
translating flash-attn's conventions only:

* keyword names: ``window_size`` -> ``window`` (a two-element tensor -> two ints),
  ``k``/``v`` -> ``k_new``/``v_new``, ``return_softmax_lse`` -> ``return_lse``,
  ``num_splits=0`` (flash-attn's "choose") -> ``None``, ``cache_seqlens`` as an int or None
  (the full cache) -> an int32 tensor; ``deterministic`` passes through;
* packed layouts (``qkv``, ``kv``) -> separate views;
* errors: fastlm's argument checks raise ``ValueError``, flash-attn's C++ checks
  ``RuntimeError``, so a ``ValueError`` is re-raised as ``RuntimeError`` (chained);
* ``S_dmask`` (``return_attn_probs``): fastlm returns the probabilities ``p`` (negated where
  dropped); flash-attn stores ``exp(s - m)``, ``m`` the row maximum of the scores when its
  key loop is one block, which the test renormalizes with the block size from
  ``_get_block_size_n``. The shim reports one block (a size past any key length) and
  divides each row by its largest ``|p|``, which is ``exp(m - lse)``.

Optional features are passed to fastlm only when a test sets them, so a keyword fastlm
lacks fails only the cases that use it, with the ``TypeError`` naming it.

Upstream's pure-torch helpers are used as they are (``flash_attn/bert_padding.py``,
``flash_attn/layers/rotary.py``); the Triton rotary kernel the latter imports is replaced by
upstream's own ``apply_rotary_emb_torch`` reference at per-row offsets. The test file is
rewritten only where it asks a CUDA device: ``"cuda"`` -> ``"cpu"``, the device capability
reads as sm80 (the A100, on which every upstream check runs), total memory as 1 TiB (the
size filter below decides what is affordable), and ``has_batch_idx`` gets back upstream's
commented-out ``[False, True]``. Cases whose sequence lengths exceed ``--max-seqlen`` or
whose ``seqlen_q * seqlen_k`` exceeds ``--max-area`` are deselected (counted apart);
``--max-cases`` samples the rest evenly across the feature groups of the table.

Usage::

    python -m bench.flash_attn_suite --upstream PATH [--max-cases N] [-k EXPR]
        [--backend torch|triton] [--output results.md]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/Dao-AILab+flash-attention/repo")
TEST_FILE = "tests/test_flash_attn.py"
HELPERS = ("flash_attn/bert_padding.py", "flash_attn/layers/rotary.py")
ENTRY_POINTS = (
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
)

# ---------------------------------------------------------------------------------------------
# The shim: flash-attn's API on fastlm's ops. Imported by the generated ``flash_attn`` package.

USE_TRITON_ROCM = False
ONE_BLOCK = 1 << 30  # past any key length: the test's S_dmask renormalization sees one block


def _get_block_size_n(device, head_dim, is_dropout, is_causal) -> int:
    """flash-attn's key-block width, used by the test to renormalize S_dmask block by block;
    the shim's S_dmask is one block wide (see :func:`_s_dmask`)."""
    return ONE_BLOCK


def _window(window_size) -> tuple[int, int]:
    """flash-attn's ``window_size`` (two ints or a two-element tensor) as fastlm's ``window``."""
    left, right = (int(w) for w in window_size)
    return (left, right)


def _s_dmask(probs):
    """fastlm's S_dmask (softmax probabilities, negated where dropped) in flash-attn's form,
    ``exp(s - m)`` with m the row's largest score: each row divided by its largest ``|p|``
    (``exp(m - lse)``); rows with no key stay zero."""
    peak = probs.abs().amax(dim=-1, keepdim=True)
    return probs / peak.masked_fill(peak == 0, 1.0)


def _features(**kwargs) -> dict:
    """The optional keywords a call sets (not None, not 0, not False)."""
    return {
        name: value
        for name, value in kwargs.items()
        if value is not None
        and value is not False
        and not (isinstance(value, float) and value == 0.0)
    }


def _call(fn: Callable, *args, **kwargs):
    """``fn`` with fastlm's argument errors raised as flash-attn raises its own (RuntimeError
    from the C++ checks); everything else propagates unchanged."""
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        raise RuntimeError(str(err)) from err


def _finish(result, return_attn_probs: bool):
    if not return_attn_probs:
        return result
    out, lse, probs = result
    return out, lse, _s_dmask(probs)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    from fastlm.ops import flash_attention

    extra = _features(
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        return_attn_probs=return_attn_probs,
        deterministic=deterministic,
    )
    result = _call(
        flash_attention,
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        window=_window(window_size),
        **extra,
    )
    return _finish(result, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    k, v = kv.unbind(dim=2)  # kv: (B, Sk, 2, Hkv, D)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kwargs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **kwargs):
    q, k, v = qkv.unbind(dim=2)  # qkv: (B, S, 3, H, D)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, **kwargs)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    from fastlm.ops import flash_attention_varlen

    extra = _features(
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
        return_attn_probs=return_attn_probs,
        block_table=block_table,
        deterministic=deterministic,
    )
    result = _call(
        flash_attention_varlen,
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        causal=causal,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        window=_window(window_size),
        **extra,
    )
    return _finish(result, return_attn_probs)


def flash_attn_varlen_kvpacked_func(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs
):
    k, v = kv.unbind(dim=1)  # kv: (total_k, 2, Hkv, D)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args, **kwargs
    )


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, *args, **kwargs):
    q, k, v = qkv.unbind(dim=1)  # qkv: (total, 3, H, D)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, *args, **kwargs
    )


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    rotary_cos=None,
    rotary_sin=None,
    cache_seqlens=None,
    cache_batch_idx=None,
    cache_leftpad=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    rotary_interleaved=True,
    alibi_slopes=None,
    num_splits=0,
    return_softmax_lse=False,
):
    import torch

    from fastlm.ops import attention_with_kvcache

    if cache_seqlens is None or isinstance(cache_seqlens, int):
        # flash-attn: an int is every row's length, None the whole cache.
        full = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        length = full if cache_seqlens is None else cache_seqlens
        cache_seqlens = torch.full((q.shape[0],), length, dtype=torch.int32, device=q.device)
    extra = _features(
        rotary_cos=rotary_cos,
        rotary_sin=rotary_sin,
        cache_batch_idx=cache_batch_idx,
        cache_leftpad=cache_leftpad,
        block_table=block_table,
        softcap=float(softcap),
        alibi_slopes=alibi_slopes,
    )
    if rotary_cos is not None:
        extra["rotary_interleaved"] = rotary_interleaved
    window = _window(window_size)
    if window != (-1, -1):
        extra["window"] = window
    return _call(
        attention_with_kvcache,
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        k_new=k,
        v_new=v,
        causal=causal,
        softmax_scale=softmax_scale,
        num_splits=None if num_splits == 0 else num_splits,
        return_lse=return_softmax_lse,
        **extra,
    )


def apply_rotary(
    x,
    cos,
    sin,
    seqlen_offsets=0,
    cu_seqlens=None,
    max_seqlen=None,
    interleaved=False,
    inplace=False,
    conjugate=False,
):
    """Stands in for flash-attn's Triton rotary kernel (``flash_attn.ops.triton.rotary``):
    upstream's own ``apply_rotary_emb_torch`` reference, at position ``offset[b] + t`` for
    token t of row b, in fp32. Positions past the table rotate by zero, as the kernel's masked loads
    do. Only what the attention tests call (no ``cu_seqlens``)."""
    import torch
    from flash_attn.layers.rotary import apply_rotary_emb_torch

    if cu_seqlens is not None:
        raise NotImplementedError("the rotary stand-in takes (B, S, H, D) inputs only")
    batch, seqlen = x.shape[:2]
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).reshape(-1, 1)
    pos = (offsets + torch.arange(seqlen, device=x.device)).expand(batch, seqlen)
    inside = (pos < cos.shape[0])[..., None]
    pos = pos.clamp(max=cos.shape[0] - 1).long()
    cos_b = torch.where(inside, cos[pos], torch.ones_like(cos[pos]))
    sin_b = torch.where(inside, sin[pos], torch.zeros_like(sin[pos]))
    if conjugate:
        sin_b = -sin_b
    # In fp32, rounded once, as the kernel it stands in for (and fastlm) compute it: the
    # reference in x's dtype rounds each product, two or three fp16 steps off.
    out = apply_rotary_emb_torch(x.float(), cos_b.float(), sin_b.float(), interleaved).to(x.dtype)
    if inplace:
        x.copy_(out)
        return x
    return out


# ---------------------------------------------------------------------------------------------
# Reading upstream and laying out the temporary package.


def read_upstream(upstream: Path, rev: str, path: str) -> str:
    """``path`` from a checkout (a work tree) or a git directory (``git show rev:path``)."""
    if (upstream / path).is_file():
        return (upstream / path).read_text()
    git_dir = upstream / ".git" if (upstream / ".git").exists() else upstream
    if not (git_dir / "HEAD").exists():
        raise FileNotFoundError(f"--upstream {upstream}: neither a checkout nor a git directory")
    cmd = ["git", "--git-dir", str(git_dir), "show", f"{rev}:{path}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise FileNotFoundError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def upstream_commit(upstream: Path, rev: str) -> str:
    git_dir = upstream / ".git" if (upstream / ".git").exists() else upstream
    cmd = ["git", "--git-dir", str(git_dir), "rev-parse", "--short=12", rev]
    done = subprocess.run(cmd, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


# (what upstream writes, what the CPU run needs, why); each must be found, so an upstream
# change that moves one shows up as an error instead of a silently different test.
REWRITES = (
    ('torch.cuda.get_device_capability("cuda")', "(8, 0)", "capability of an A100 (sm80)"),
    ('torch.cuda.get_device_properties("cuda").total_memory', "(1 << 40)", "no OOM skips"),
    (
        '@pytest.mark.parametrize("has_batch_idx", [False])',
        '@pytest.mark.parametrize("has_batch_idx", [False, True])',
        "upstream's own commented-out parametrization: cover cache_batch_idx",
    ),
    ('"cuda"', '"cpu"', "CPU tensors"),
)


_PARAMETRIZE = re.compile(r"^(\s*)@pytest\.mark\.parametrize\(", re.MULTILINE)


def rewrite_tests(source: str) -> str:
    for old, new, why in REWRITES:
        if old not in source:
            raise ValueError(f"upstream test file: {old!r} not found (rewrite for: {why})")
        source = source.replace(old, new)
    source, count = _PARAMETRIZE.subn(r"\1@_fastlm_parametrize(", source)
    if count == 0:
        raise ValueError("upstream test file: no @pytest.mark.parametrize decorator found")
    head = "from bench.flash_attn_suite import fastlm_parametrize as _fastlm_parametrize\n"
    tail = "\n\nfrom bench.flash_attn_suite import fastlm_select  # noqa: E402\n\n"
    return head + source + tail + "fastlm_select(globals())\n"


_INIT = "from flash_attn.flash_attn_interface import (\n{names})\n"
_INTERFACE = (
    "# Generated by fastlm's bench/flash_attn_suite.py: flash-attn's API on fastlm's ops.\n"
    "from bench.flash_attn_suite import (  # noqa: F401\n{names}"
    "    USE_TRITON_ROCM,\n    _get_block_size_n,\n)\n"
)
_ROTARY = "from bench.flash_attn_suite import apply_rotary  # noqa: F401\n"
_CONFTEST = (
    "from bench.flash_attn_suite import SuitePlugin\n\n\n"
    "def pytest_configure(config):\n"
    "    config.pluginmanager.register(SuitePlugin.from_env(), 'fastlm_flash_attn_suite')\n"
)


def build_tree(root: Path, upstream: Path, rev: str) -> Path:
    """Lay out the shim package, upstream's helpers and the rewritten test file under
    ``root``; return the test file's path."""
    names = "".join(f"    {name},\n" for name in ENTRY_POINTS)
    files = {
        "flash_attn/__init__.py": _INIT.format(names=names),
        "flash_attn/flash_attn_interface.py": _INTERFACE.format(names=names),
        "flash_attn/layers/__init__.py": "",
        "flash_attn/ops/__init__.py": "",
        "flash_attn/ops/triton/__init__.py": "",
        "flash_attn/ops/triton/rotary.py": _ROTARY,
        "tests/conftest.py": _CONFTEST,
        "pytest.ini": "[pytest]\n",
    }
    for helper in HELPERS:
        files[helper] = read_upstream(upstream, rev, helper)
    files[TEST_FILE] = rewrite_tests(read_upstream(upstream, rev, TEST_FILE))
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / TEST_FILE


# ---------------------------------------------------------------------------------------------
# Feature groups of the table: (label, predicate on the test's name and parameters).

KVCACHE = "test_flash_attn_kvcache"
FWD_BWD = {
    "test_flash_attn_qkvpacked",
    "test_flash_attn_varlen_qkvpacked",
    "test_flash_attn_output",
    "test_flash_attn_varlen_output",
    "test_flash_attn_causal",
    "test_flash_attn_varlen_causal",
    "test_flash_attn_splitkv",
    "test_flash_attn_deterministic",
    "test_flash_attn_varlen_deterministic",
}


def _is(value) -> bool:
    return value is not None and value is not False and value != 0


GROUPS: tuple[tuple[str, Callable[[str, dict], bool]], ...] = (
    ("fwd/bwd: causal", lambda n, p: n in FWD_BWD and (p.get("causal") or "causal" in n)),
    ("fwd/bwd: GQA/MQA", lambda n, p: n in FWD_BWD and p.get("mha_type") in ("gqa", "mqa")),
    ("fwd/bwd: varlen", lambda n, p: n in FWD_BWD and "varlen" in n),
    ("fwd/bwd: packed qkv/kv", lambda n, p: "qkvpacked" in n or p.get("kvpacked") is True),
    ("fwd/bwd: window (local)", lambda n, p: n in FWD_BWD and p.get("local") is True),
    ("fwd/bwd: alibi", lambda n, p: n in FWD_BWD and p.get("alibi") is True),
    ("softcap", lambda n, p: _is(p.get("softcap"))),
    ("return_attn_probs / dropout", lambda n, p: _is(p.get("dropout_p"))),
    ("deterministic", lambda n, p: p.get("deterministic") is True or "deterministic" in n),
    (
        "varlen: paged KV (block_table)",
        lambda n, p: "varlen" in n and _is(p.get("paged_kv_block_size")),
    ),
    (
        "kvcache: plain",
        lambda n, p: (
            n == KVCACHE
            and not any(
                _is(p.get(f))
                for f in (
                    "paged_kv_block_size",
                    "has_leftpad",
                    "has_batch_idx",
                    "alibi",
                    "local",
                    "rotary_fraction",
                )
            )
        ),
    ),
    ("kvcache: append k/v", lambda n, p: n == KVCACHE and p.get("new_kv") is True),
    ("kvcache: causal", lambda n, p: n == KVCACHE and p.get("causal") is True),
    ("kvcache: GQA/MQA", lambda n, p: n == KVCACHE and p.get("mha_type") in ("gqa", "mqa")),
    (
        "kvcache: paged KV (block_table)",
        lambda n, p: n == KVCACHE and _is(p.get("paged_kv_block_size")),
    ),
    ("kvcache: alibi", lambda n, p: n == KVCACHE and p.get("alibi") is True),
    ("kvcache: window", lambda n, p: n == KVCACHE and p.get("local") is True),
    ("kvcache: cache_leftpad", lambda n, p: n == KVCACHE and p.get("has_leftpad") is True),
    ("kvcache: cache_batch_idx", lambda n, p: n == KVCACHE and p.get("has_batch_idx") is True),
    ("kvcache: rotary", lambda n, p: n == KVCACHE and _is(p.get("rotary_fraction"))),
    ("kvcache: num_splits=1", lambda n, p: n == KVCACHE and p.get("num_splits") == 1),
    (
        "kvcache: paged bounds check",
        lambda n, p: n == "test_flash_attn_kvcache_paged_block_table_bounds",
    ),
    *((f"head dim {d}", lambda n, p, d=d: p.get("d") == d) for d in (59, 111, 160, 192, 224, 256)),
    ("other tests", lambda n, p: n not in FWD_BWD and not n.startswith(KVCACHE)),
)

# Upstream tests that exercise flash-attn's private C++/CUDA entry points, not its API.
NOT_API = {
    "test_flash_attn_varlen_paged_kv_num_splits": "calls flash-attn's private "
    "_flash_attn_varlen_forward (no counterpart in the public API the shim maps)",
    "test_flash_attn_generator_arg_must_be_none": "checks flash-attn's C++ entry points "
    "(flash_attn_gpu.fwd/bwd), not its Python API",
}
# Upstream tests that hunt GPU kernel races by repetition: CPU ops have no such races, and
# the repetitions (250 runs at batch 60) cost minutes a case here. Run with --include-slow.
SLOW_ON_CPU = {
    "test_flash_attn_race_condition": "hunts GPU kernel races by 250 repetitions at batch 60 "
    "(minutes a case on this CPU); --include-slow runs it",
}


def groups_of(name: str, params: dict) -> list[str]:
    return [label for label, pred in GROUPS if pred(name, params)]


def upstream_skips(name: str, params: dict) -> bool:
    """The combinations upstream's tests skip in their first lines (invalid ones): left out
    of the sample so that it runs cases, not skips. Full runs (no ``--max-cases``) keep them."""
    p = params
    if name == KVCACHE:
        return (
            (p["seqlen_q"] > p["seqlen_k"] and p["new_kv"])
            or (not p["new_kv"] and p["rotary_fraction"] > 0)
            or ((p["has_batch_idx"] or p["has_leftpad"]) and p["paged_kv_block_size"] is not None)
        )
    return _is(p.get("softcap")) and _is(p.get("dropout_p"))


def _lengths(params: dict) -> list[int]:
    return [int(params[k]) for k in ("seqlen", "seqlen_q", "seqlen_k") if k in params]


def too_big(params: dict, max_seqlen: int, max_area: int) -> bool:
    lengths = _lengths(params)
    if not lengths:
        return False
    if max(lengths) > max_seqlen:
        return True
    if "seqlen_q" in params and "seqlen_k" in params:
        return int(params["seqlen_q"]) * int(params["seqlen_k"]) > max_area
    return max(lengths) ** 2 > max_area


def sample(items: list, groups: dict, max_cases: int | None, seed: int) -> list:
    """At most ``max_cases`` items spread evenly over the feature groups (every group that
    has items gets some before any group gets more), in their original order."""
    if max_cases is None or max_cases >= len(items):
        return items
    rng = random.Random(seed)
    pools: dict[str, list] = {}
    for item in items:
        for label in groups[item]:
            pools.setdefault(label, []).append(item)
    for pool in pools.values():
        rng.shuffle(pool)
    chosen: set = set()
    while len(chosen) < max_cases and any(pools.values()):
        for label, _ in GROUPS:
            pool = pools.get(label, [])
            while pool and pool[-1] in chosen:
                pool.pop()
            if pool and len(chosen) < max_cases:
                chosen.add(pool.pop())
    return [item for item in items if item in chosen]


# ---------------------------------------------------------------------------------------------
# Case selection inside the test module. The rewritten file records its parametrizations with
# ``fastlm_parametrize`` instead of letting pytest expand them (test_flash_attn_kvcache alone
# is 800k cases, minutes to collect on this machine); ``fastlm_select`` then expands them
# here, filters (size, ``-k``), samples and hands pytest only the chosen cases, with the
# ids pytest would have given them, so a failing id can be rerun upstream as it is.


def fastlm_parametrize(argnames, argvalues, **kwargs):
    if kwargs:
        raise TypeError(f"fastlm_parametrize: unsupported arguments {sorted(kwargs)}")

    def record(fn):
        # Decorators apply bottom-up, the order of pytest's id parts.
        fn.__dict__.setdefault("_fastlm_params", []).append((argnames, list(argvalues)))
        return fn

    return record


def _idval(value, argname: str, index: int) -> str:
    """pytest's id of one parameter value (``_pytest.python.IdMaker`` rules)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float, complex)):
        return str(value)
    name = getattr(value, "__name__", None)
    return name if isinstance(name, str) else f"{argname}{index}"


def _expand(fn) -> tuple[list[str], list[tuple[tuple, str]]]:
    """All (values, id) of ``fn``'s recorded parametrizations, in pytest's order."""
    names: list[str] = []
    axes = []
    for argnames, argvalues in fn.__dict__.get("_fastlm_params", []):
        spec = (
            [n.strip() for n in argnames.split(",")]
            if isinstance(argnames, str)
            else list(argnames)
        )
        names += spec
        axis = []
        for index, value in enumerate(argvalues):
            values = tuple(value) if len(spec) > 1 else (value,)
            ident = "-".join(_idval(v, n, index) for v, n in zip(values, spec, strict=True))
            axis.append((values, ident))
        axes.append(axis)
    cases = []
    for combo in itertools.product(*axes):
        values = tuple(v for part, _ in combo for v in part)
        cases.append((values, "-".join(ident for _, ident in combo)))
    return names, cases


def _keyword_filter(expr: str) -> Callable[[str], bool]:
    if not expr:
        return lambda haystack: True
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expr)

    def keep(haystack: str) -> bool:
        # As pytest's -k: a case-insensitive substring of the test's id or its file's name.
        return compiled.evaluate(lambda sub, **_: sub.lower() in haystack)

    return keep


def fastlm_select(namespace: dict) -> None:
    """Replace each test function in ``namespace`` (the test module's globals) by its
    chosen cases, or delete it when none is chosen."""
    import pytest

    settings = json.loads(Path(os.environ["FASTLM_SUITE_SETTINGS"]).read_text())
    keep = _keyword_filter(settings["k"])
    sampling = settings["max_cases"] is not None
    # Tests the plugin skips anyway: a sample spends no case on them.
    known_skips = set(NOT_API) | (set() if settings["include_slow"] else set(SLOW_ON_CPU))
    candidates, groups, table = [], {}, {}
    collected = too_many = 0
    for fname, fn in list(namespace.items()):
        if not (fname.startswith("test_") and callable(fn)):
            continue
        if settings["tests"] and fname not in settings["tests"]:
            del namespace[fname]  # not expanded: the cheap way to run one test function
            continue
        names, cases = _expand(fn)
        table[fname] = (fn, names, cases)
        for index, (values, ident) in enumerate(cases):
            haystack = f"{fname}[{ident}] test_flash_attn.py".lower()
            if not keep(haystack):
                continue
            collected += 1
            params = dict(zip(names, values, strict=True))
            if too_big(params, settings["max_seqlen"], settings["max_area"]):
                too_many += 1
                continue
            if sampling and (upstream_skips(fname, params) or fname in known_skips):
                continue
            key = (fname, index)
            candidates.append(key)
            groups[key] = groups_of(fname, params)
    chosen = sample(candidates, groups, settings["max_cases"], settings["seed"])
    by_fn: dict[str, list[int]] = {}
    for fname, index in chosen:
        by_fn.setdefault(fname, []).append(index)
    for fname, (fn, names, cases) in table.items():
        picked = by_fn.get(fname)
        if not picked:
            del namespace[fname]
        elif names:
            values = [cases[i][0] for i in picked]
            ids = [cases[i][1] for i in picked]
            namespace[fname] = pytest.mark.parametrize(",".join(names), values, ids=ids)(fn)
    counts = {"collected": collected, "too_big": too_many, "selected": len(chosen)}
    counts["sampled_out"] = collected - too_many - len(chosen)
    with open(settings["results"], "a") as out:
        out.write(json.dumps(counts) + "\n")


class SuitePlugin:
    """pytest plugin inside the run: skips of the private-API tests, and one JSON line per
    finished case (its outcome, time, feature groups and failure message)."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.groups: dict[str, list[str]] = {}

    @classmethod
    def from_env(cls) -> SuitePlugin:
        return cls(json.loads(Path(os.environ["FASTLM_SUITE_SETTINGS"]).read_text()))

    def pytest_collection_modifyitems(self, session, config, items):
        import pytest

        for item in items:
            params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
            if item.originalname in NOT_API:
                item.add_marker(pytest.mark.skip(reason=NOT_API[item.originalname]))
            if item.originalname in SLOW_ON_CPU and not self.settings["include_slow"]:
                item.add_marker(pytest.mark.skip(reason=SLOW_ON_CPU[item.originalname]))
            self.groups[item.nodeid] = groups_of(item.originalname, params)

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and report.outcome == "passed":
            return
        message = ""
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            _, line, message = report.longrepr
            if message == "Skipped":
                message = f"upstream's own skip (no reason given), line {line} of the test file"
        elif report.outcome == "failed":
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
        record = {
            "id": report.nodeid.split("::", 1)[-1],
            "outcome": report.outcome,
            "when": report.when,
            "seconds": round(report.duration, 3),
            "groups": self.groups.get(report.nodeid, []),
            "message": message,
        }
        with open(self.settings["results"], "a") as out:
            out.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# Running and reporting.


def run_suite(args, tamper: Callable[[Path], None] | None = None) -> tuple[list[dict], dict]:
    """Build the tree, run pytest on it, return the per-case records and the header counts.
    ``tamper(root)`` may edit the tree before the run (the tests use it to break the shim and
    check that the suite notices)."""
    upstream = Path(args.upstream)
    with tempfile.TemporaryDirectory(prefix="fastlm-flash-attn-suite-") as tmp:
        root = Path(tmp)
        test_file = build_tree(root, upstream, args.rev)
        if tamper is not None:
            tamper(root)
        results = root / "results.jsonl"
        settings = {
            "results": str(results),
            "max_seqlen": args.max_seqlen,
            "max_area": args.max_area,
            "max_cases": args.max_cases,
            "seed": args.seed,
            "k": args.k,
            "tests": [t for t in args.tests.split(",") if t],
            "include_slow": args.include_slow,
        }
        (root / "settings.json").write_text(json.dumps(settings))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(root), str(REPO), env.get("PYTHONPATH", "")])
        env["FASTLM_SUITE_SETTINGS"] = str(root / "settings.json")
        env["FASTLM_BACKEND"] = args.backend
        cmd = [sys.executable, "-m", "pytest", str(test_file), "-q", "-p", "no:cacheprovider"]
        cmd += ["-c", str(root / "pytest.ini"), "--rootdir", str(root), "-rN", "--tb=line"]
        if args.timeout:
            cmd += ["-o", f"faulthandler_timeout={args.timeout}"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        records = (
            [json.loads(line) for line in results.read_text().splitlines()]
            if results.exists()
            else []
        )
    header = next((r for r in records if "collected" in r), None)
    cases = [r for r in records if "id" in r]
    if header is None:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"pytest collected nothing (rc {done.returncode}):\n{tail}")
    header.update(wall=wall, rc=done.returncode)
    return cases, header


def tally(cases: list[dict]) -> list[dict]:
    """Per group: passed / failed / skipped and the first failure (id and message)."""
    rows = []
    for label, _ in (*GROUPS, ("all", None)):
        members = [c for c in cases if label == "all" or label in c["groups"]]
        row = {"group": label, "passed": 0, "failed": 0, "skipped": 0, "first_failure": ""}
        for case in members:
            row[case["outcome"]] += 1
            if case["outcome"] == "failed" and not row["first_failure"]:
                first = (case["message"] or "(no message)").splitlines()[0][:200]
                row["first_failure"] = f"`{case['id']}`: {first}"
        rows.append(row)
    return rows


def skip_reasons(cases: list[dict]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for case in cases:
        if case["outcome"] == "skipped":
            reasons[case["message"] or "(no reason)"] = (
                reasons.get(case["message"] or "(no reason)", 0) + 1
            )
    return reasons


def fastlm_revision() -> str:
    """fastlm's commit, and the files of its attention ops that differ from it (the run used
    the working tree)."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "(not a git checkout)"
    paths = ["fastlm/ops", "kernels"]
    diff = subprocess.run(
        [*git, "diff", "--name-only", "HEAD", "--", *paths], capture_output=True, text=True
    )
    dirty = diff.stdout.split()
    return f"`{head.stdout.strip()}`" + (f" with uncommitted {', '.join(dirty)}" if dirty else "")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}, CPU only"


def report(rows: list[dict], header: dict, cases: list[dict], args) -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"- date: {when}; machine: {machine()}",
        f"- torch {torch.__version__}, triton {triton_version}, fastlm {fastlm_revision()}, "
        f"backend `{args.backend}`",
        f"- upstream: flash-attention `{upstream_commit(Path(args.upstream), args.rev)}` "
        f"(`{TEST_FILE}`, read at run time)",
        f"- selection: --tests `{args.tests}`, -k `{args.k or ''}`, --max-seqlen "
        f"{args.max_seqlen}, --max-area {args.max_area}, --max-cases {args.max_cases}, "
        f"--seed {args.seed}: "
        f"{header['collected']} collected, {header['too_big']} over the size limits, "
        f"{header['sampled_out']} sampled out, {header['selected']} run in {header['wall']:.0f} s",
        "",
        "| feature group | passed | failed | skipped | first failure |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        if row["passed"] + row["failed"] + row["skipped"] == 0:
            lines.append(f"| {row['group']} | - | - | - | (no case selected) |")
            continue
        failure = row["first_failure"].replace("|", "\\|")
        lines.append(
            f"| {row['group']} | {row['passed']} | {row['failed']} | {row['skipped']} | {failure} |"
        )
    reasons = skip_reasons(cases)
    if reasons:
        lines += ["", "Skip reasons:", ""]
        lines += [
            f"- {count} x {reason}"
            for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])
        ]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--upstream", default=str(MIRROR), help="flash-attention checkout or git dir"
    )
    parser.add_argument("--rev", default="HEAD", help="revision to read from a git directory")
    parser.add_argument("-k", default="", help="pytest -k expression over upstream's test ids")
    parser.add_argument("--tests", default="", help="comma-separated test functions to run")
    parser.add_argument("--include-slow", action="store_true", help="run " + ", ".join(SLOW_ON_CPU))
    parser.add_argument("--max-cases", type=int, default=None, help="sample this many cases")
    parser.add_argument("--max-seqlen", type=int, default=1024)
    parser.add_argument("--max-area", type=int, default=65536, help="largest seqlen_q * seqlen_k")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case sampling")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--timeout", type=int, default=0, help="faulthandler dump after s")
    parser.add_argument("--output", help="also write the table (markdown) here")
    parser.add_argument("--jsonl", help="also write one line per case here")
    args = parser.parse_args(argv)
    if args.backend == "triton" and args.max_cases is None:
        # The interpreter runs each program in Python: only a small sample is affordable.
        args.max_cases = 12
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cases, header = run_suite(args)
    rows = tally(cases)
    text = report(rows, header, cases, args)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(c) + "\n" for c in cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
