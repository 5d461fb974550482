"""The ``fastlm`` command: ``fastlm info`` and ``fastlm bench``."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

import fastlm
from fastlm import backend


def _versions() -> list[tuple[str, str]]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [
        ("fastlm", fastlm.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("triton", triton_version),
    ]


def _device_line() -> tuple[str, torch.device]:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} "
                f"GiB, {torch.cuda.device_count()} visible)", torch.device("cuda"))  # fmt: skip
    return "cpu (no CUDA device)", torch.device("cpu")


def backend_status(op: str, name: str, device: torch.device) -> str:
    """One-line availability of backend ``name`` for ``op`` on ``device``."""
    if name == "torch":
        return "yes (the CPU default)"
    if device.type == "cpu":
        why = backend.triton_error() if name == "triton" else backend.cuda_extension_error()
        if why:
            return f"no: {why}"
        if name == "triton":
            return "interpreter only (no GPU; force it to run the kernels)"
        return "built; needs a CUDA device"
    why = backend.backend_error(name, device)
    if why:
        return f"no: {why}"
    if name in backend.gpu_order(op):
        return "yes (automatic on CUDA tensors)"
    return "opt-in (built; not yet verified on a GPU, see bench/results/)"


def info() -> int:
    for key, value in _versions():
        print(f"{key:<10}{value}")
    device_text, device = _device_line()
    print(f"{'device':<10}{device_text}")
    ext = backend.cuda_extension_error()
    print(f"{'_C':<10}{'built and loaded' if ext is None else ext}")
    print("\nbackends per op:")
    ops = backend.registered_ops()
    width = max(map(len, ops)) + 2
    for op, names in ops.items():
        for name in names:
            print(f"  {op:<{width}}{name:<8}{backend_status(op, name, device)}")
    return 0


def bench(argv: list[str]) -> int:
    # bench/ lives beside fastlm/ in a source checkout (DESIGN.md); it is not installed.
    root = Path(fastlm.__file__).resolve().parent.parent
    if not (root / "bench" / "run.py").is_file():
        print(f"fastlm bench needs a source checkout of fastlm (no bench/run.py under {root})",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.path.insert(0, str(root))
    from bench import run

    return run.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends each op can use here")
    sub.add_parser("bench", help="run the benchmark suite (quick by default; --help for more)",
                   add_help=False)  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    return bench(rest)


if __name__ == "__main__":
    sys.exit(main())
