"""Run the benchmark suite: ``fastlm bench`` or ``python bench/run.py``.

Each ``bench/bench_<name>.py`` exposes ``cases(quick, device)``, an iterable of
:class:`bench.harness.Case`; this script times them all and writes the results.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: make ``bench`` importable. Appended, so an installed fastlm still wins
    # over the source tree (whose fastlm/ lacks the kernels/ mapping of an install).
    sys.path.append(str(Path(__file__).resolve().parent.parent))

BENCH_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastlm bench",
        description="Run the benchmark suite and write CSV, JSON and a plot per device.",
    )
    parser.add_argument("--full", action="store_true", help="every size (default: quick)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<dev>)")
    parser.add_argument(
        "--only",
        action="append",
        choices=available(),
        metavar="NAME",
        help=f"run only this bench (repeatable): {', '.join(available())}",
    )
    args = parser.parse_args(argv)
    # After parsing: --help and a mistyped flag answer without waiting for torch.
    import torch

    from bench import harness

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick, rep_ms = not args.full, 40 if not args.full else 100
    env = harness.environment(device)
    start = time.perf_counter()
    device_gbps = harness.copy_bandwidth(device, rep_ms)
    if device_gbps is None:
        print(f"{env.device}: no roofline on a CPU (its caches outrun a DRAM copy)")
    else:
        print(f"{env.device}: copy bandwidth {device_gbps:.1f} GB/s (read + write), the roofline")

    results, errors = [], []
    for name in args.only or available():
        module = importlib.import_module(f"bench.bench_{name}")
        done, failed = harness.run_cases(
            module.cases(quick, device), device, env, device_gbps, rep_ms
        )
        results += done
        errors += failed
    results.sort(key=lambda r: (r.op, int(r.shape.split("x")[-1]), r.provider))

    print(harness.table(results))
    if ratio_table := harness.ratios(results):
        print("fastlm's torch backend against plain PyTorch (time ratio; at most 1 is the bar):")
        print(ratio_table)
    if model_table := harness.ratios(results, "fastlm", "transformers-sdpa"):
        print("fastlm's models against transformers (SDPA) on the same weights (time ratio):")
        print(model_table)
    for line in errors:
        print(f"FAILED {line}")
    out = args.out or harness.RESULTS / env.slug
    written = harness.write_results(results, out)
    print(
        f"{len(results)} results, {len(errors)} failed, {time.perf_counter() - start:.1f} s; "
        f"wrote {', '.join(str(p) for p in written)}"
    )
    return 1 if errors or not results else 0


if __name__ == "__main__":
    sys.exit(main())
