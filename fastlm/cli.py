"""The ``fastlm`` command. It parses before it imports torch: ``--help``, ``--version`` and
a mistyped flag answer at once; each subcommand loads what it needs when it runs."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import fastlm
from fastlm import errors

if TYPE_CHECKING:
    import torch

    from fastlm.train.config import FinetuneConfig

DESCRIPTION = (
    "fastlm: fused transformer kernels under drop-in PyTorch modules. Train, sample, "
    "evaluate and fine-tune small models, clean corpora, and benchmark the kernels."
)


def _versions() -> list[tuple[str, str]]:
    import torch

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
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (
            f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} "
            f"GiB, {torch.cuda.device_count()} visible)",
            torch.device("cuda"),
        )
    return "cpu (no CUDA device)", torch.device("cpu")


def backend_status(op: str, name: str, device: torch.device) -> str:
    """One-line availability of backend ``name`` for ``op`` on ``device``."""
    from fastlm import backend

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
    import fastlm.ops  # noqa: F401  (importing the ops registers their backends)
    from fastlm import backend

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
        print(
            f"fastlm bench needs a source checkout of fastlm (no bench/run.py under {root})",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    from bench import run

    return run.main(argv)


def train(argv: list[str]) -> int:
    from fastlm.train.config import argument_parser

    args = argument_parser().parse_args(argv)  # --help and flag errors answer before torch
    from fastlm.train import run

    return run.main(args)


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
        help="GPT: text to continue; T5: text with sentinels <extra_id_0>, <extra_id_1>, ... "
        "where spans are missing (it writes each sentinel and its span); BERT: text with "
        "<mask> where tokens are missing",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from fastlm.train import run

    print(
        run.generate(
            args.checkpoint,
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.greedy,
            args.seed,
        )
    )
    return 0


def data(argv: list[str]) -> int:
    if argv[:1] != ["clean"]:
        print(
            "usage: fastlm data clean IN... OUT [options] (fastlm data clean --help)",
            file=sys.stderr,
        )
        return 2
    from fastlm.data import pipeline

    return pipeline.main(argv[1:])


def evaluate(argv: list[str]) -> int:
    from fastlm.eval import cli as eval_cli

    return eval_cli.main(argv)


def finetune(argv: list[str]) -> int:
    config = _finetune_config(argv)  # --help and flag errors answer before torch loads
    from fastlm.train import finetune as ft

    ft.print_summary(ft.finetune(config))
    return 0


def _finetune_config(argv: list[str]) -> FinetuneConfig:
    from fastlm.train.config import PRECISIONS, FinetuneConfig

    parser = argparse.ArgumentParser(
        prog="fastlm finetune",
        description="fine-tune a BERT classifier on a TSV/JSONL file and score it as GLUE does",
    )
    parser.add_argument("--train", required=True, metavar="FILE", help=".tsv or .jsonl")
    parser.add_argument("--validation", required=True, metavar="FILE", help=".tsv or .jsonl")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--init",
        metavar="DIR",
        help="a fastlm train --model bert checkpoint or run directory, or a "
        "Hugging Face BERT directory",
    )
    source.add_argument("--model", help="a BERT preset (bert-tiny, ...) trained from scratch")
    parser.add_argument(
        "--text-fields",
        default="sentence",
        metavar="A[,B]",
        help="the text column(s): one, or two for sentence pairs",
    )
    parser.add_argument("--label-field", default="label")
    parser.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="TSV files have no header row; fields are 0-based column numbers",
    )
    parser.add_argument(
        "--regression",
        action="store_true",
        help="a real-valued label (STS-B): one output, Pearson/Spearman",
    )
    parser.add_argument(
        "--positive-label", help="F1's class for two labels (default: the second label in id order)"
    )
    for name, kind in (
        ("max-length", int),
        ("epochs", int),
        ("lr", float),
        ("batch-size", int),
        ("warmup-ratio", float),
        ("weight-decay", float),
        ("eval-every", int),
        ("vocab-size", int),
        ("seed", int),
    ):
        default = getattr(FinetuneConfig, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=default)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out-dir", default=FinetuneConfig.out_dir)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run --out-dir holds first (else a directory with a run is refused)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    values = vars(args)
    values["text_fields"] = tuple(f.strip() for f in args.text_fields.split(","))
    return FinetuneConfig(**values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastlm", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"fastlm {fastlm.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and which backends each op can use here")
    # These parse their own flags (--help lists them).
    sub.add_parser(
        "train",
        add_help=False,
        help="train a model (with no flags: a small GPT on the built-in corpus)",
    )
    sub.add_parser("generate", add_help=False, help="sample text from a training checkpoint")
    sub.add_parser(
        "bench", help="run the benchmark suite (quick by default; --help for more)", add_help=False
    )
    sub.add_parser(
        "data",
        add_help=False,
        help="prepare corpora: 'fastlm data clean IN... OUT' normalizes, scrubs PII, "
        "filters and deduplicates (--help for its options)",
    )
    sub.add_parser(
        "eval",
        add_help=False,
        help="n-shot evaluation of a checkpoint on a JSONL task (MMLU, WinoGrande, "
        "BIG-Bench Hard shapes)",
    )
    sub.add_parser(
        "finetune",
        add_help=False,
        help="fine-tune a BERT classifier on a TSV/JSONL task, scored as GLUE does",
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return info()
    commands = {
        "train": train,
        "generate": generate,
        "bench": bench,
        "data": data,
        "eval": evaluate,
        "finetune": finetune,
    }
    # Every subcommand's refusals become one line here (a bug keeps its traceback).
    return errors.report(f"fastlm {args.command}", lambda: commands[args.command](rest))


if __name__ == "__main__":
    sys.exit(main())
