"""The runner every ``bench_<op>.py`` shares: timing, the bandwidth roofline, result files.

A bench yields :class:`Case` objects (one op, one provider, one shape) that state the bytes
and FLOPs of the op by formula; the harness times each, turns them into rates and a
percentage of the device's measured copy bandwidth, and writes CSV, JSON and a plot.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from fastlm.kernels.compile_check import format_table

# torch.utils.benchmark imports torch.utils.cpp_extension, which warns "No CUDA runtime is
# found" on every machine without a GPU; nothing here compiles, so it is only noise.
_cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_extension_log.level
_cpp_extension_log.setLevel(logging.ERROR)
import torch.utils.benchmark  # noqa: E402

_cpp_extension_log.setLevel(_level)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


@dataclasses.dataclass
class Case:
    """One timed call. ``bytes_moved`` and ``flops`` come from the bench's stated formula."""

    op: str
    provider: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fn: Callable[[], object]
    bytes_moved: int
    flops: int = 0
    tokens: int = 0  # tokens one call processes (model benchmarks), for tokens/s


@dataclasses.dataclass
class Result:
    op: str
    provider: str
    shape: str  # "4096x1024"; the last dim is the swept one (plotted on x)
    dtype: str
    ms: float
    bytes_moved: int
    flops: int
    gbps: float
    tflops: float
    roofline_pct: float | None  # of the measured copy bandwidth (device_gbps); None on a CPU
    peak_mb: float
    tokens_per_s: float | None
    device_gbps: float | None  # None on a CPU: see copy_bandwidth
    device: str
    torch: str
    triton: str | None
    commit: str | None


@dataclasses.dataclass(frozen=True)
class Timing:
    ms: float  # median
    peak_mb: float  # extra memory allocated by one call


@dataclasses.dataclass(frozen=True)
class Environment:
    device: str
    torch: str
    triton: str | None
    commit: str | None

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")


def measure(fn: Callable[[], object], device: torch.device, rep_ms: float = 100) -> Timing:
    """Median time of ``fn()`` over about ``rep_ms`` of repetitions, and its peak memory."""
    if device.type == "cuda":
        import triton.testing

        peak = _peak_mb(fn, device)
        ms = triton.testing.do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median")
        return Timing(ms, peak)
    # One thread, Timer's default: with other processes on the cores, OpenMP barriers stall
    # for milliseconds and multi-threaded timings swing 100x. The roofline copy is timed the
    # same way. Warming up under the Timer keeps the thread count (a torch.compile guard)
    # unchanged between the first call (allocator growth, compiles) and the timed ones.
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn})
    timer.timeit(1)
    ms = timer.blocked_autorange(min_run_time=rep_ms / 1000).median * 1e3
    return Timing(ms, _peak_mb(fn, device))


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's C++ side logs a start and a stop line per
    use, which would bury the report (exceptions still propagate)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator while ``fn()`` runs, above what was
    allocated before: the running total the profiler records with every allocation."""
    with (
        _quiet_stderr(),
        torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof,
    ):
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not memory:
        return 0
    before = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(m["Total Allocated"] for m in memory) - before


def copy_bandwidth(device: torch.device, rep_ms: float = 100) -> float | None:
    """GB/s of a large ``copy_`` (bytes read + written): the roofline memory-bound ops face
    on a GPU; ``None`` on a CPU.

    Measured rather than taken from a spec sheet, so % of roofline is comparable across
    devices and honest about what this machine actually sustains. A CPU has none: its
    caches serve the small shapes faster than any DRAM copy (the quick suite reached
    1.1-1.8x of it on a 2-core Xeon), and a roofline that is exceeded is not one.
    """
    if device.type != "cuda":
        return None
    mib = 1024  # far beyond any cache
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, rep_ms)
    return 2 * src.nbytes / timing.ms / 1e6


def environment(device: torch.device) -> Environment:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return Environment(_device_name(device), torch.__version__, triton_version, _commit())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and (m := re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())):
        return m.group(1).strip()
    return platform.processor() or platform.machine() or "cpu"


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except OSError:
        return None
    if out.returncode != 0:  # not a checkout, or no commits yet
        return None
    return out.stdout.strip()


def third_party_runs(fn: Callable[[], object], name: str, note: Callable[[str, str], None]) -> bool:
    """Call an optional third-party provider's step once, its warnings silenced: True if
    it runs; else the reason goes to ``note(name, reason)`` and the provider is skipped
    with that one line instead of reported as a FAILED case."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # an optional library failing must not fail the suite
        note(name, f"{type(exc).__name__}: {exc}")
        return False
    return True


def _rounds(rep_ms: float) -> int:
    return 7 if rep_ms < 100 else 11


def time_alternating(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    rep_ms: float = 100,
    first_ms: Sequence[float] | None = None,
) -> list[float]:
    """Median ms per call of each of ``fns``, timed in alternating rounds.

    Providers of one case are compared by ratio, so they are timed side by side: each
    round times every provider once (a block of calls of about ``rep_ms / rounds``), in an
    order that rotates from round to round, and each provider's time is the median over
    rounds. Whatever else the machine is doing then lands on all of them alike, instead of
    on whichever ran during a busy second. ``first_ms``: how long each provider's first
    (warm-up) call took, if the caller made one; when one was slower than a round, a second
    call is timed, and calls still that slow get 3 rounds of one call each (the second call
    the first of them), so a slow case costs a few calls, not a few seconds, and a compiled
    one is timed warm.
    """
    rounds = _rounds(rep_ms)
    per_round = rep_ms / rounds
    samples: list[list[float]] = [[] for _ in fns]
    if first_ms is not None and max(first_ms) > per_round:
        # A first call may have compiled or grown the allocator: a second call says whether
        # the case itself is slow, and counts as a slow case's first round.
        with _one_thread(device):
            warm = [_call_ms(fn, device) for fn in fns]
        if max(warm) > per_round:
            rounds = 2
            for s, ms in zip(samples, warm, strict=True):
                s.append(ms)
        first_ms = warm
    if device.type == "cuda":
        import triton.testing

        def block(fn, _number):
            return triton.testing.do_bench(
                fn, warmup=per_round / 4, rep=per_round, return_mode="median"
            )

        numbers = [0] * len(fns)
    else:
        # The first call (allocator growth, compiles) is left out; a warm one sizes the block.
        numbers = []
        for i, fn in enumerate(fns):
            first = first_ms[i] if first_ms is not None else _block_ms(fn, 1)
            if first < per_round:
                first = min(first, _block_ms(fn, 1))
            numbers.append(max(1, int(per_round / max(first, 1e-4))))
        block = _block_ms

    with _one_thread(device):
        for r in range(rounds):
            for i in range(len(fns)):
                j = (i + r) % len(fns)
                samples[j].append(block(fns[j], numbers[j]))
    return [statistics.median(s) for s in samples]


def _call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """ms of one call, the device's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def _block_ms(fn: Callable[[], object], number: int) -> float:
    """ms per call over ``number`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) * 1e3 / number


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One thread on a CPU, as measure()'s Timer runs: with other processes on the cores,
    OpenMP barriers stall for milliseconds and multi-threaded timings swing 100x. The
    warm-up call runs under it too (the thread count is a torch.compile guard)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_case(
    case: Case,
    device: torch.device,
    env: Environment,
    device_gbps: float | None,
    rep_ms: float,
    ms: float | None = None,
) -> Result:
    """Time ``case`` (or take its alternating-rounds time ``ms``) and measure its memory."""
    if ms is None:
        timing = measure(case.fn, device, rep_ms)
    else:
        timing = Timing(ms, _peak_mb(case.fn, device))
    seconds = timing.ms / 1e3
    gbps = case.bytes_moved / seconds / 1e9
    return Result(
        op=case.op,
        provider=case.provider,
        shape="x".join(map(str, case.shape)),
        dtype=str(case.dtype).removeprefix("torch."),
        ms=timing.ms,
        bytes_moved=case.bytes_moved,
        flops=case.flops,
        gbps=gbps,
        tflops=case.flops / seconds / 1e12,
        roofline_pct=None if device_gbps is None else 100 * gbps / device_gbps,
        peak_mb=timing.peak_mb,
        tokens_per_s=case.tokens / seconds if case.tokens else None,
        device_gbps=device_gbps,
        device=env.device,
        torch=env.torch,
        triton=env.triton,
        commit=env.commit,
    )


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return cpu_peak_bytes(fn) / 2**20


def _same_shape_runs(cases: Iterable[Case]) -> Iterator[list[Case]]:
    """Consecutive cases of one shape and dtype: a bench builds one shape's inputs, yields
    every provider's cases for it, then moves on."""
    run: list[Case] = []
    for case in cases:
        if run and (case.shape, case.dtype) != (run[0].shape, run[0].dtype):
            yield run
            run = []
        run.append(case)
    if run:
        yield run


def run_cases(
    cases: Iterable[Case],
    device: torch.device,
    env: Environment,
    device_gbps: float | None,
    rep_ms: float,
) -> tuple[list[Result], list[str]]:
    """Results, and one line per case that raised (a provider failing is reported, not fatal).

    The providers of one op and shape are timed in alternating rounds
    (:func:`time_alternating`), so their ratios are fair. ``cases`` is consumed one shape at
    a time, so each shape's inputs are freed before the next is built.
    """
    results, errors = [], []
    for run in _same_shape_runs(cases):
        by_op: dict[str, list[Case]] = {}
        for case in run:
            by_op.setdefault(case.op, []).append(case)
        for group in by_op.values():
            with _one_thread(device):
                done, failed = _run_group(group, device, env, device_gbps, rep_ms)
            results += done
            errors += failed
    return results, errors


def _run_group(
    group: list[Case],
    device: torch.device,
    env: Environment,
    device_gbps: float | None,
    rep_ms: float,
) -> tuple[list[Result], list[str]]:
    """One op's providers at one shape: a warm-up call each (a provider that raises is
    reported and left out), then :func:`time_alternating`."""
    errors, working, first_ms = [], [], []
    for case in group:
        try:
            start = time.perf_counter()
            case.fn()
            first_ms.append((time.perf_counter() - start) * 1e3)
            working.append(case)
        except Exception as exc:  # one broken provider must not hide the others
            errors.append(f"{case.op} {case.provider} {case.shape}: {type(exc).__name__}: {exc}")
    if not working:
        return [], errors
    try:
        times = time_alternating([c.fn for c in working], device, rep_ms, first_ms)
        results = [
            run_case(c, device, env, device_gbps, rep_ms, ms)
            for c, ms in zip(working, times, strict=True)
        ]
    except Exception as exc:
        return [], errors + [
            f"{c.op} {c.provider} {c.shape}: {type(exc).__name__}: {exc}" for c in working
        ]
    return results, errors


def ratios(results: Sequence[Result], ours: str = "fastlm-torch", theirs: str = "torch") -> str:
    """A table of ``ours`` / ``theirs`` time per op and shape: provider ``ours<suffix>``
    against ``theirs<suffix>`` (``fastlm-torch softcap=30`` against ``torch softcap=30``)."""
    index = {(r.op, r.shape, r.dtype, r.provider): r for r in results}
    rows = []
    for r in results:
        if not r.provider.startswith(ours):
            continue
        other = index.get((r.op, r.shape, r.dtype, theirs + r.provider.removeprefix(ours)))
        if other is not None:
            rows.append(
                (
                    r.op,
                    r.shape,
                    r.dtype,
                    r.provider,
                    f"{r.ms:.4f}",
                    f"{other.ms:.4f}",
                    f"{r.ms / other.ms:.3f}",
                    f"{(r.ms - other.ms) * 1e3:+.1f}",
                )
            )
    headers = ("op", "shape", "dtype", "provider", "ms", f"{theirs} ms", "ratio", "diff us")
    return format_table(headers, rows) if rows else ""


def table(results: Sequence[Result]) -> str:
    headers = (
        "op",
        "provider",
        "shape",
        "dtype",
        "ms",
        "GB/s",
        "% roof",
        "TFLOP/s",
        "peak MB",
        "tok/s",
    )
    rows = [
        (
            r.op,
            r.provider,
            r.shape,
            r.dtype,
            f"{r.ms:.4f}",
            f"{r.gbps:.1f}",
            "-" if r.roofline_pct is None else f"{r.roofline_pct:.0f}",
            f"{r.tflops:.3f}",
            f"{r.peak_mb:.1f}",
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
        )
        for r in results
    ]
    return format_table(headers, rows)


def write_results(results: Sequence[Result], out_dir: Path) -> list[Path]:
    """``results.csv``, ``results.json`` and (with matplotlib) ``results.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [dataclasses.asdict(r) for r in results]
    csv_path, json_path = out_dir / "results.csv", out_dir / "results.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Result)])
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=2))
    written = [csv_path, json_path]
    if png := _plot(results, out_dir / "results.png"):
        written.append(png)
    return written


def _plot(results: Sequence[Result], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    ops = sorted({r.op for r in results})
    if not ops:
        return None
    fig, axes = plt.subplots(len(ops), 1, figsize=(8, 3.2 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        for provider in sorted({r.provider for r in results if r.op == op}):
            points = sorted(
                (int(r.shape.split("x")[-1]), r.gbps)
                for r in results
                if r.op == op and r.provider == provider
            )
            ax.plot(*zip(*points, strict=True), marker="o", label=provider)
        if results[0].device_gbps is not None:
            ax.axhline(results[0].device_gbps, color="gray", linestyle="--", label="copy roofline")
        sizes = sorted({int(r.shape.split("x")[-1]) for r in results if r.op == op})
        ax.set(title=op, xlabel="size (last dim)", ylabel="GB/s", xscale="log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
