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
import subprocess
import sys
import tempfile
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

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=rep_ms / 4, rep=rep_ms, return_mode="median")
        return Timing(ms, peak)
    # One thread, Timer's default: with other processes on the cores, OpenMP barriers stall
    # for milliseconds and multi-threaded timings swing 100x. The roofline copy is timed the
    # same way. Warming up under the Timer keeps the thread count (a torch.compile guard)
    # unchanged between the first call (allocator growth, compiles) and the timed ones.
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn})
    timer.timeit(1)
    ms = timer.blocked_autorange(min_run_time=rep_ms / 1000).median * 1e3
    return Timing(ms, cpu_peak_bytes(fn) / 2**20)


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


def run_case(
    case: Case, device: torch.device, env: Environment, device_gbps: float | None, rep_ms: float
) -> Result:
    timing = measure(case.fn, device, rep_ms)
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


def run_cases(
    cases: Iterable[Case],
    device: torch.device,
    env: Environment,
    device_gbps: float | None,
    rep_ms: float,
) -> tuple[list[Result], list[str]]:
    """Results, and one line per case that raised (a provider failing is reported, not fatal).

    ``cases`` is consumed lazily so each shape's inputs are freed before the next is built.
    """
    results, errors = [], []
    for case in cases:
        try:
            results.append(run_case(case, device, env, device_gbps, rep_ms))
        except Exception as exc:  # one broken provider must not hide every other result
            errors.append(f"{case.op} {case.provider} {case.shape}: {type(exc).__name__}: {exc}")
    return results, errors


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
