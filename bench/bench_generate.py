"""Generation: the paged KV cache against the padded one, continuous batching against static
batches, and fastlm's ``generate`` against Hugging Face's on the same GPT-2 weights.

Three tables, every greedy output asserted identical between the providers compared:

* padded vs paged, a batch of prompts of uneven lengths: ``generate(ids, new)`` with the
  contiguous cache (B x (longest prompt + new) positions per layer) and with
  ``paged=True``. Cache bytes: padded = ``layers x 2 (k, v) x B x (S + new) x Hkv x D x
  bytes``, the tensors it allocates; paged = the pool allocated (pages x page bytes) and
  the most pages held at once x page bytes, where a page holds ``page_size`` tokens of k and
  v in every layer. tokens/s counts the new tokens of every row.
* continuous vs static batching: more prompts than slots, each with its own budget of new
  tokens (no EOS, so the work is fixed): static runs ``generate`` on consecutive groups of
  ``max_batch`` prompts, each group decoding until its largest budget (tokens past a
  prompt's budget are wasted, not counted); continuous is ``generate_many(prompts, budgets,
  max_batch)``. tokens/s counts the budgets' tokens only.
* fastlm vs transformers: ``GPT2LMHeadModel.generate`` (SDPA attention, its default) on the
  weights of fastlm's model (``fastlm.models.hf.to_hf``), ``min_new_tokens = new`` so that
  neither stops early, against ``generate`` (padded, and paged). Rounds alternate the
  providers, so that other work on the machine lands on all of them alike.

Times are the fastest of the rounds (other processes on the machine only ever add time, so
the minimum is the estimate least skewed by them; the median is reported beside it), and
"vs transformers" is the ratio of the fastest times, with the median of the per-round
ratios beside it.

A fourth table, its own file (``generate_compiled.md``, ``--compiled``), for the bench's model
and a narrow twin of the same depth (where a step's time is its per-op costs): the decode step
compiled (``generate(compile=True)``: static KV buffers of a 256-position bucket, one
``torch.compile(fullgraph=True)`` step; Inductor's default mode on the CPU, CUDA graphs on
GPUs) against eager ``generate``, the same static step run eagerly, and transformers'
``generate`` on the same weights. The compile (Dynamo, Inductor, its C++ build) is timed
apart: the first call minus a compiled call; the rounds time warm calls only.

On the CPU everything runs on one thread, as the harness times every bench (with other
processes on the cores, OpenMP barriers stall and multi-threaded timings swing widely).
``python -m bench.bench_generate`` writes ``generate.md`` under ``bench/results/<device>/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from bench import harness
from bench.harness import Case
from fastlm.models import create
from fastlm.models.generation import CACHE_BUCKET, BatchScheduler, StaticDecoder, left_align


@dataclasses.dataclass(frozen=True)
class Sizes:
    model: dict  # create("gpt2", **model)
    uneven: tuple[int, ...]  # prompt lengths of the padded-vs-paged batch
    new: int  # new tokens per row there
    batch_vs_hf: tuple[int, int, int]  # (batch, prompt, new) against transformers
    many: tuple[int, int, int, int]  # (prompts, max_batch, shortest budget, longest budget)
    page_size: int
    rounds: int


_GPT2_SMALL = dict(num_layers=6, hidden_size=384, num_heads=6)  # the case
SIZES = {
    True: Sizes(
        dict(num_layers=2, hidden_size=64, num_heads=4, vocab_size=512),
        (3, 17, 9, 30),
        8,
        (2, 8, 6),
        (6, 2, 2, 9),
        4,
        2,
    ),
    False: Sizes(
        _GPT2_SMALL,
        (8, 96, 24, 64, 12, 128, 40, 16),
        64,
        (4, 32, 64),
        (16, 4, 8, 64),
        16,
        5,
    ),
}


def _transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _time(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def _rounds(
    providers: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Seconds per call of each provider over ``rounds`` alternating rounds (after one
    warm-up call each), and each provider's output."""
    outputs = {name: fn() for name, fn in providers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            seconds[name].append(_time(fn, device)[0])
    return seconds, outputs


def _same(outputs: dict[str, object], what: str) -> None:
    names = list(outputs)
    first = outputs[names[0]]
    for name in names[1:]:
        got = outputs[name]
        same = (
            all(torch.equal(a, b) for a, b in zip(first, got, strict=True))
            if isinstance(first, list)
            else torch.equal(first, got)
        )
        if not same:
            raise AssertionError(f"{what}: {name}'s greedy tokens differ from {names[0]}'s")


def padded_bytes(model, batch: int, positions: int) -> int:
    """Bytes of the contiguous cache ``generate`` allocates: every layer's k and v."""
    e = next(model.parameters()).element_size()
    return sum(2 * batch * positions * h * d * e for h, d in model.kv_layout())


def measure_uneven(model, s: Sizes, device: torch.device, vocab: int) -> list[dict]:
    """Padded vs paged ``generate`` on one batch of uneven prompts (left-padded)."""
    g = torch.Generator().manual_seed(0)
    width = max(s.uneven)
    ids = torch.randint(0, vocab, (len(s.uneven), width), generator=g).to(device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(s.uneven):
        mask[row, width - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    providers = {
        "padded": lambda: model.generate(ids, s.new, attention_mask=mask),
        "paged": lambda: model.generate(
            ids, s.new, attention_mask=mask, paged=True, page_size=s.page_size
        ),
    }
    seconds, outputs = _rounds(providers, s.rounds, device)
    _same(outputs, "padded vs paged")
    # The scheduler generate(paged=True) runs, run once more for its cache's figures.
    rows_alone = [ids[r, mask[r].bool()] for r in range(ids.shape[0])]
    scheduler = BatchScheduler(model, max_batch=len(rows_alone), page_size=s.page_size)
    with torch.no_grad():
        scheduler.run(rows_alone, [s.new] * len(rows_alone), lambda x: x.argmax(-1), None)
    cache = scheduler.cache
    tokens = len(s.uneven) * s.new
    held = sum(n + s.new - 1 for n in s.uneven)  # the last token is never fed back
    padded = padded_bytes(model, len(s.uneven), width + s.new)
    rows = []
    for name in providers:
        ms = 1e3 * min(seconds[name])
        allocated = padded if name == "padded" else cache.bytes_allocated()
        peak = padded if name == "padded" else cache.peak_pages * cache.bytes_per_page
        rows.append(
            dict(
                provider=name,
                allocated_mb=allocated / 2**20,
                peak_mb=peak / 2**20,
                bytes_per_token_held=peak / held,
                ms=ms,
                tokens_per_s=tokens / (ms / 1e3),
            )
        )
    return rows


def measure_many(model, s: Sizes, device: torch.device, vocab: int) -> list[dict]:
    """Continuous batching (generate_many) vs static groups of max_batch prompts."""
    count, slots, low, high = s.many
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(4, 4 + 2 * s.batch_vs_hf[1], (count,), generator=g).tolist()
    budgets = torch.randint(low, high + 1, (count,), generator=g).tolist()
    prompts = [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]

    def static():
        outs = []
        for at in range(0, count, slots):
            group, wants = prompts[at : at + slots], budgets[at : at + slots]
            width = max(len(p) for p in group)
            ids = torch.zeros(len(group), width, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(group):  # left-padded, as tokenizers pad for generation
                ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
            out = model.generate(ids, max(wants), attention_mask=mask)
            outs += [
                torch.cat([p, out[r, width : width + n]])
                for r, (p, n) in enumerate(zip(group, wants, strict=True))
            ]
        return outs

    providers = {
        "static batches": static,
        "continuous": lambda: model.generate_many(
            prompts, budgets, max_batch=slots, page_size=s.page_size
        ),
    }
    seconds, outputs = _rounds(providers, s.rounds, device)
    _same(outputs, "static vs continuous batching")
    tokens = sum(budgets)
    computed = {
        "static batches": sum(
            len(budgets[at : at + slots]) * max(budgets[at : at + slots])
            for at in range(0, count, slots)
        ),
        "continuous": tokens,
    }
    return [
        dict(
            provider=name,
            prompts=count,
            max_batch=slots,
            tokens=tokens,
            decoded=computed[name],
            ms=1e3 * min(seconds[name]),
            tokens_per_s=tokens / min(seconds[name]),
        )
        for name in providers
    ]


def measure_vs_hf(model, s: Sizes, device: torch.device, vocab: int) -> list[dict]:
    """fastlm's generate (padded and paged) against transformers' on the same weights."""
    from fastlm.models.hf import to_hf

    batch, prompt, new = s.batch_vs_hf
    hf = to_hf(model).to(device).eval()
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(2))
    ids = ids.to(device)
    ones = torch.ones_like(ids)
    providers = {
        "transformers": lambda: hf.generate(
            input_ids=ids,
            attention_mask=ones,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        ),
        "fastlm": lambda: model.generate(ids, new),
        "fastlm paged": lambda: model.generate(ids, new, paged=True, page_size=s.page_size),
    }
    seconds, outputs = _rounds(providers, s.rounds, device)
    _same(outputs, "transformers vs fastlm")
    base = seconds["transformers"]
    return [
        dict(
            provider=name,
            ms=1e3 * min(seconds[name]),
            median_ms=1e3 * statistics.median(seconds[name]),
            tokens_per_s=batch * new / min(seconds[name]),
            vs_transformers=min(base) / min(seconds[name]),
            vs_transformers_median=statistics.median(
                b / t for b, t in zip(base, seconds[name], strict=True)
            ),
            attention=hf.config._attn_implementation if name == "transformers" else "fastlm",
        )
        for name in providers
    ]


def measure_compiled(
    model, s: Sizes, device: torch.device, vocab: int, compile: bool | dict = True
) -> tuple[list, dict]:
    """Compiled decode step (``generate(compile=compile)``) vs eager ``generate`` (and the
    static step uncompiled, and transformers' when installed) on one batch; the compile's
    seconds apart."""
    batch, prompt, new = s.batch_vs_hf
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    # Its own decoder: the model keeps one, which the compiled provider's would replace.
    static = StaticDecoder(model, batch, -(-(prompt + new) // CACHE_BUCKET) * CACHE_BUCKET)
    start = time.perf_counter()
    compiled = model.generate(ids, new, compile=compile)
    first = time.perf_counter() - start
    steady = _time(lambda: model.generate(ids, new, compile=compile), device)[0]
    providers = {
        "fastlm eager": lambda: model.generate(ids, new),
        "fastlm static, eager step": lambda: _static_eager(static, ids, new),
        "fastlm compiled step": lambda: model.generate(ids, new, compile=compile),
    }
    if _transformers_available():
        from fastlm.models.hf import to_hf

        hf = to_hf(model).to(device).eval()
        ones = torch.ones_like(ids)
        providers["transformers"] = lambda: hf.generate(
            input_ids=ids,
            attention_mask=ones,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    seconds, outputs = _rounds(providers, s.rounds, device)
    outputs["first compiled call"] = compiled
    _same(outputs, "compiled vs eager decoding")
    base = seconds["fastlm eager"]
    rows = [
        dict(
            provider=name,
            ms=1e3 * min(seconds[name]),
            median_ms=1e3 * statistics.median(seconds[name]),
            ms_per_step=1e3 * min(seconds[name]) / new,
            tokens_per_s=batch * new / min(seconds[name]),
            vs_eager=min(base) / min(seconds[name]),
            vs_eager_median=statistics.median(
                b / t for b, t in zip(base, seconds[name], strict=True)
            ),
        )
        for name in providers
    ]
    return rows, dict(compile_s=first - steady, first_s=first)


def _static_eager(decoder: StaticDecoder, ids: torch.Tensor, new: int) -> torch.Tensor:
    """``generate(compile=True)``'s loop with the step not compiled: the static buffers and
    tensor positions without the compiler."""
    with torch.no_grad():
        prompt, lengths = left_align(ids, torch.ones_like(ids, dtype=torch.bool))
        out = decoder.generate(prompt, lengths, new, lambda x: x.argmax(-1), None, 0)
    return torch.cat([ids, out], dim=1)


# The compiled-step table's second model: the first one's depth at a width where the
# arithmetic is negligible, so that a step's time is what it costs per op and layer.
NARROW = dict(hidden_size=64, num_heads=4, vocab_size=512)


def markdown_compiled(results: dict, env: harness.Environment, meta: dict) -> str:
    s: Sizes = meta["sizes"]
    b, p, n = s.batch_vs_hf
    lines = [
        f"# Generation, compiled decode step: {env.device}",
        "",
        "| device | torch | transformers | commit | date | threads | load average before |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {env.device} ({os.cpu_count()} cores) | {env.torch} | {meta['transformers']} "
        f"| {env.commit} | {meta['date']} | {meta['threads']} | {meta['load']:.2f} |",
        "",
        f"GPT-2 style models, {meta['dtype']}, greedy; batch {b} x {p}-token prompts, {n} new "
        f"tokens (the prefill included, eager everywhere); fastest of {s.rounds} alternating "
        "rounds after a warm-up call (`python -m bench.bench_generate --compiled`). Every "
        "provider gave the same tokens (asserted).",
    ]
    for title, (rows, timing, c) in results.items():
        lines += [
            "",
            f"## {title}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads, "
            f"vocabulary {c.vocab_size}",
            "",
            *_table(
                [
                    "provider",
                    "ms (fastest)",
                    "ms (median)",
                    "ms / step",
                    "tokens/s",
                    "vs fastlm eager",
                    "per-round ratio (median)",
                ],
                [
                    (
                        r["provider"],
                        f"{r['ms']:.0f}",
                        f"{r['median_ms']:.0f}",
                        f"{r['ms_per_step']:.1f}",
                        f"{r['tokens_per_s']:.0f}",
                        f"{r['vs_eager']:.2f}x",
                        f"{r['vs_eager_median']:.2f}x",
                    )
                    for r in rows
                ],
            ),
            "",
            f"Compile (once per batch size and 256-position bucket; Dynamo, Inductor and its "
            f"C++ build, one thread): {timing['compile_s']:.1f} s (first call "
            f"{timing['first_s']:.1f} s).",
        ]
    lines += [
        "",
        "ms / step: the whole call's time over the new tokens. Inductor's on-disk cache "
        f"(TORCHINDUCTOR_CACHE_DIR) at the start: {meta['cache']}.",
    ]
    return "\n".join(lines) + "\n"


def report_compiled(
    quick: bool,
    device: torch.device,
    out: Path | None = None,
    threads: int | None = 1,
    sizes: Sizes | None = None,
    compile: bool | dict = True,
) -> tuple[dict, Path]:
    """Measure the compiled-step tables (``compile``: ``generate``'s argument) of the
    bench's GPT-2 shape and of its narrow twin (:data:`NARROW`), and write
    ``generate_compiled.md``."""
    s = sizes or SIZES[quick]
    saved = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        env = harness.environment(device)
        load = os.getloadavg()[0]
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        inductor_cache = Path(cache_dir())
        cold = not inductor_cache.is_dir() or not any(inductor_cache.iterdir())
        results = {}
        for title, shape in (
            ("The generate bench's model", s.model),
            ("Narrow, the same depth (per-op costs)", {**s.model, **NARROW}),
        ):
            torch.manual_seed(0)
            model = create("gpt2", dropout=0.0, **shape).to(device).eval()
            rows, timing = measure_compiled(model, s, device, model.config.vocab_size, compile)
            results[title] = (rows, timing, model.config)
        transformers = None
        if _transformers_available():
            import transformers

            transformers = transformers.__version__
        meta = dict(
            sizes=s,
            cache="cold (empty)" if cold else "warm (earlier builds reused)",
            transformers=transformers,
            threads=torch.get_num_threads(),
            load=load,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}",
        )
    finally:
        torch.set_num_threads(saved)
    text = markdown_compiled(results, env, meta)
    print(text)
    path = (out or harness.RESULTS / env.slug) / "generate_compiled.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")
    return results, path


def _table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
        *("| " + " | ".join(row) + " |" for row in body),
    ]


def markdown(results: dict, env: harness.Environment, meta: dict) -> str:
    s: Sizes = meta["sizes"]
    c = meta["config"]
    lines = [
        f"# Generation: {env.device}",
        "",
        "| device | torch | transformers | commit | date | threads | load average before |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {env.device} ({os.cpu_count()} cores) | {env.torch} | {meta['transformers']} "
        f"| {env.commit} | {meta['date']} | {meta['threads']} | {meta['load']:.2f} |",
        "",
        f"GPT-2 style model: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} "
        f"heads, vocabulary {c.vocab_size}, {meta['dtype']}; greedy decoding; fastest of "
        f"{s.rounds} alternating rounds after a warm-up call ({meta['seconds']:.0f} s in all, "
        "`python -m bench.bench_generate`; formulas in `bench/bench_generate.py`). Every "
        "table's providers gave the same tokens (asserted).",
        "",
        f"## Padded vs paged cache: {len(s.uneven)} prompts of {', '.join(map(str, s.uneven))} "
        f"tokens, {s.new} new each, pages of {s.page_size} tokens",
        "",
        *_table(
            ["cache", "allocated MB", "peak held MB", "bytes / token held", "ms", "tokens/s"],
            [
                (
                    r["provider"],
                    f"{r['allocated_mb']:.2f}",
                    f"{r['peak_mb']:.2f}",
                    f"{r['bytes_per_token_held']:.0f}",
                    f"{r['ms']:.0f}",
                    f"{r['tokens_per_s']:.0f}",
                )
                for r in results["uneven"]
            ],
        ),
        "",
        "Tokens held: each prompt's tokens + its new ones but the last (never fed back). "
        "The padded cache holds the longest prompt + new for every row; the paged one the "
        "pages each row's own tokens fill (allocated: its pool, grown by doubling from the "
        "prompts' pages).",
        "",
        f"## Continuous vs static batching: {s.many[0]} prompts, {s.many[1]} slots, budgets "
        f"of {s.many[2]} to {s.many[3]} new tokens",
        "",
        *_table(
            ["batching", "tokens wanted", "row-steps decoded", "ms", "tokens/s (wanted)"],
            [
                (
                    r["provider"],
                    str(r["tokens"]),
                    str(r["decoded"]),
                    f"{r['ms']:.0f}",
                    f"{r['tokens_per_s']:.0f}",
                )
                for r in results["many"]
            ],
        ),
        "",
        "Static: each group of slots decodes until its largest budget (row-steps = group "
        "size x largest budget); continuous: a prompt takes a slot as soon as one frees.",
    ]
    if results.get("hf"):
        b, p, n = s.batch_vs_hf
        lines += [
            "",
            f"## fastlm vs transformers `generate`: batch {b} x {p}-token prompts, {n} new tokens",
            "",
            *_table(
                [
                    "provider",
                    "attention",
                    "ms (fastest)",
                    "ms (median)",
                    "tokens/s",
                    "vs transformers",
                    "per-round ratio (median)",
                ],
                [
                    (
                        r["provider"],
                        r["attention"],
                        f"{r['ms']:.0f}",
                        f"{r['median_ms']:.0f}",
                        f"{r['tokens_per_s']:.0f}",
                        f"{r['vs_transformers']:.2f}x",
                        f"{r['vs_transformers_median']:.2f}x",
                    )
                    for r in results["hf"]
                ],
            ),
            "",
            "vs transformers: transformers' fastest time / this provider's fastest time; "
            "per-round ratio: the median over the rounds of the same ratio within a round.",
        ]
    else:
        lines += ["", "transformers is not installed: no comparison with its `generate`."]
    return "\n".join(lines) + "\n"


def report(
    quick: bool,
    device: torch.device,
    out: Path | None = None,
    threads: int | None = 1,
    sizes: Sizes | None = None,
) -> tuple[dict, Path]:
    """Measure the three tables (``sizes``: default ``SIZES[quick]``), print them and write
    ``generate.md`` to ``out`` (default ``bench/results/<device>/``)."""
    s = sizes or SIZES[quick]
    saved = torch.get_num_threads()
    if device.type == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        env = harness.environment(device)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        torch.manual_seed(0)
        model = create("gpt2", dropout=0.0, **s.model).to(device).eval()
        vocab = model.config.vocab_size
        results = {
            "uneven": measure_uneven(model, s, device, vocab),
            "many": measure_many(model, s, device, vocab),
        }
        transformers = None
        if _transformers_available():
            import transformers

            transformers = transformers.__version__
            results["hf"] = measure_vs_hf(model, s, device, vocab)
        meta = dict(
            sizes=s,
            config=model.config,
            transformers=transformers,
            threads=torch.get_num_threads(),
            load=load,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}",
            seconds=time.perf_counter() - start,
        )
    finally:
        torch.set_num_threads(saved)
    text = markdown(results, env, meta)
    print(text)
    path = (out or harness.RESULTS / env.slug) / "generate.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"generate: {meta['seconds']:.1f} s; wrote {path}")
    return results, path


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """For ``fastlm bench``: the report (its own ``generate.md``), then padded and paged
    decoding of one batch timed by the harness (bytes: the weights read once per step)."""
    report(quick, device)
    s = SIZES[quick]
    model = create("gpt2", dropout=0.0, **s.model).to(device).eval()
    batch, prompt, new = s.batch_vs_hf
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    params = sum(p.numel() for p in model.parameters())
    e = next(model.parameters()).element_size()
    for name, paged in (("padded", False), ("paged", True)):
        yield Case(
            "generate",
            name,
            (batch, prompt, new),
            next(model.parameters()).dtype,
            lambda paged=paged: model.generate(ids, new, paged=paged, page_size=s.page_size),
            params * e * new,
            2 * params * batch * new,
            batch * new,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="folder of generate.md")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="only the compiled decode step's table (generate_compiled.md; compiles once)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.compiled:
        report_compiled(args.quick, device, args.out, args.threads)
    else:
        report(args.quick, device, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
