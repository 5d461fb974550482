"""The ``fastlm`` command: ``info``, ``train``, ``generate``, ``bench``, ``data clean``,
``eval`` and ``finetune``."""

from __future__ import annotations

import argparse
import os
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


def train(argv: list[str]) -> int:
    import torch.distributed as dist

    from fastlm.train import TrainingDiverged, config, run

    try:
        run.train(config.parse(argv))
    except (ValueError, TrainingDiverged) as e:
        print(f"fastlm train: {e}", file=sys.stderr)
        return 1
    if dist.is_initialized():  # under torchrun: leave together
        dist.barrier()
        dist.destroy_process_group()
        # Skip interpreter finalization: gloo's worker threads can still hold work objects
        # then, and tearing those down aborts the process now and then (pytorch#190489).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="fastlm generate", description="sample from a checkpoint of fastlm train"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, or a run directory (its newest)",
    )
    parser.add_argument(
        "--prompt",
        required=True,
        help="GPT: text to continue; T5: the encoder input; BERT: text with <mask>",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fastlm.train import run

    try:
        print(run.generate(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                           args.top_k, args.greedy, args.seed))  # fmt: skip
    except ValueError as e:
        print(f"fastlm generate: {e}", file=sys.stderr)
        return 1
    return 0


def data(argv: list[str]) -> int:
    if argv[:1] != ["clean"]:
        print("usage: fastlm data clean IN... OUT [options] (fastlm data clean --help)",
              file=sys.stderr)  # fmt: skip
        return 2
    from fastlm.data import pipeline

    return pipeline.main(argv[1:])


def evaluate(argv: list[str]) -> int:
    from fastlm.eval import cli as eval_cli

    return eval_cli.main(argv)


def finetune(argv: list[str]) -> int:
    from fastlm.eval import finetune as ft

    return ft.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends each op can use here")
    # These parse their own flags (--help lists them).
    sub.add_parser(
        "train",
        add_help=False,
        help="train a model (with no flags: a small GPT on the built-in corpus)",
    )
    sub.add_parser("generate", add_help=False, help="sample text from a training checkpoint")
    sub.add_parser("bench", help="run the benchmark suite (quick by default; --help for more)",
                   add_help=False)  # fmt: skip
    sub.add_parser("data", add_help=False,
                   help="prepare corpora: 'fastlm data clean IN... OUT' normalizes, scrubs PII, "
                        "filters and deduplicates (--help for its options)")  # fmt: skip
    sub.add_parser("eval", add_help=False,
                   help="n-shot evaluation of a checkpoint on a JSONL task (MMLU, WinoGrande, "
                        "BIG-Bench Hard shapes)")  # fmt: skip
    sub.add_parser("finetune", add_help=False,
                   help="fine-tune a BERT classifier on a TSV/JSONL task, scored as GLUE "
                        "does")  # fmt: skip
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    commands = {"train": train, "generate": generate, "bench": bench, "data": data,
                "eval": evaluate, "finetune": finetune}  # fmt: skip
    return commands[args.command](rest)


if __name__ == "__main__":
    sys.exit(main())
