"""``fastlm eval``: n-shot evaluation of a ``fastlm train`` checkpoint on a local JSONL task
(MMLU, WinoGrande or BIG-Bench Hard format; see :mod:`fastlm.eval.tasks`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastlm.errors import report
from fastlm.eval import tasks


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastlm eval",
        description="n-shot evaluation of a checkpoint on a JSONL task file: multiple choice "
        "(MMLU, WinoGrande) scored by log-likelihood, or BIG-Bench Hard by greedy generation "
        "and exact match",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory of fastlm train, or a run directory (its newest)",
    )
    p.add_argument("--task", required=True, help="the JSONL file of examples to score")
    p.add_argument(
        "--dev",
        help="a JSONL file of the same format to draw demonstrations from "
        "(default: --shots examples of the task file, held out and not "
        "scored)",
    )
    p.add_argument(
        "--shots",
        type=_count(0),
        default=0,
        help="solved examples before each question (default: 0)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="fixes the held-out examples and each question's demonstrations",
    )
    p.add_argument("--batch-size", type=_count(1), default=8)
    p.add_argument("--limit", type=_count(1), help="score only the first N examples")
    p.add_argument(
        "--format",
        choices=sorted(tasks.FORMATS),
        help="the task format (default: detected from the fields)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=_count(1),
        default=32,
        help="BBH: the longest answer generated, in tokens (default: 32)",
    )
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1...")
    p.add_argument("--output", help="write the results and per-example records here (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def table(results: dict, task: tasks.Task, dev: tasks.Task | None) -> str:
    """The results as aligned ``name  value`` lines."""
    source = f"{dev.path}" if dev is not None else "held out from the task file"
    rows = [
        ("task", f"{task.path} ({task.format})"),
        ("shots", f"{results['shots']} (dev: {source}; seed {results['seed']})"),
        ("examples", str(results["n"])),
    ]
    rows += [
        (k, f"{results[k]:.4f}") for k in ("accuracy", "acc_norm", "exact_match") if k in results
    ]
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


def _fail(message: str) -> int:
    print(f"fastlm eval: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``fastlm eval``: 0 on success, 1 on bad input (the message on stderr)."""
    return report("fastlm eval", lambda: _evaluate(argv))


def _evaluate(argv: list[str] | None) -> int:
    args = parser().parse_args(argv)
    try:
        task = tasks.load_task(args.task, args.format)
    except ValueError as e:
        return _fail(f"--task: {e}")
    try:
        dev = None if args.dev is None else tasks.load_task(args.dev, task.format)
    except ValueError as e:
        return _fail(f"--dev: {e}")
    try:
        tasks.split_dev(task, dev, args.shots, args.seed)
    except ValueError as e:
        return _fail(f"--shots: {e}")
    import torch  # after the task files are checked: --help and bad files answer at once

    from fastlm.eval.scoring import check_model

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        return _fail(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {args.device}: no CUDA device is available")
    # The model stack loads after the cheap checks.
    from fastlm.models.loading import load_model
    from fastlm.parallel.checkpoint import load_sharded

    try:
        model, tokenizer = load_model(args.checkpoint, device, load_weights=load_sharded)
        check_model(model)
    except ValueError as e:
        return _fail(f"--checkpoint: {e}")
    results, records = tasks.evaluate(
        model,
        tokenizer,
        task,
        dev,
        args.shots,
        args.seed,
        args.batch_size,
        args.limit,
        args.max_new_tokens,
        progress=not args.no_progress,
    )
    results = {
        "task": str(task.path),
        "dev": None if dev is None else str(dev.path),
        "checkpoint": args.checkpoint,
        **results,
    }
    print(table(results, task, dev))
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"results": results, "records": records}, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
