"""``fastlm eval`` end to end on saved checkpoints: the table, the JSON file, exit codes and
the errors that name their argument."""

from __future__ import annotations

import json
import re

import pytest

from fastlm.eval import cli, tasks
from fastlm.train.run import load_model

MMLU = [
    {
        "question": f"What is {a} + {b}?",
        "choices": [str(a + b), str(a * b), str(a - b), "0"],
        "answer": i % 4,
    }
    for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 9)])
]
BBH = [
    {"input": f"Sort: {w}", "target": " ".join(sorted(w.split()))}
    for w in ("b a", "c a b", "trophy box", "sky blue", "one two three", "z y")
]


def test_multiple_choice_with_a_dev_file(checkpoints, write_jsonl, tmp_path, capsys):
    task, dev = write_jsonl("task.jsonl", MMLU), write_jsonl("dev.jsonl", MMLU[::-1])
    out = tmp_path / "results" / "mmlu.json"
    argv = [
        "--checkpoint",
        str(checkpoints["gpt"]),
        "--task",
        str(task),
        "--dev",
        str(dev),
        "--shots",
        "2",
        "--seed",
        "3",
        "--batch-size",
        "4",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    model, tokenizer = load_model(checkpoints["gpt"])
    results, records = tasks.evaluate(
        model, tokenizer, tasks.load_task(task), tasks.load_task(dev), shots=2, seed=3
    )
    assert saved["results"] == {
        "task": str(task),
        "dev": str(dev),
        "checkpoint": str(checkpoints["gpt"]),
        **results,
    }
    assert saved["records"] == records
    assert printed.splitlines() == [
        f"task      {task} (mmlu)",
        f"shots     2 (dev: {dev}; seed 3)",
        "examples  5",
        f"accuracy  {results['accuracy']:.4f}",
        f"acc_norm  {results['acc_norm']:.4f}",
        f"wrote {out}",
    ]


def test_bbh_with_held_out_demonstrations(checkpoints, write_jsonl, capsys):
    task = write_jsonl("bbh.jsonl", BBH)
    assert (
        cli.main(
            [
                "--checkpoint",
                str(checkpoints["t5"]),
                "--task",
                str(task),
                "--shots",
                "1",
                "--limit",
                "3",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [
        f"task         {task} (bbh)",
        "shots        1 (dev: held out from the task file; seed 0)",
        "examples     3",
    ]
    assert lines[3].startswith("exact_match  ") and len(lines) == 4


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["--task", str(p["dir"] / "missing.jsonl")], "--task: no such file: .*missing"),
        (lambda p: ["--task", str(p["bad"])], r"--task: .*bad.jsonl, line 2: not valid JSON"),
        (
            lambda p: ["--task", str(p["mmlu"]), "--dev", str(p["bbh"])],
            r"--dev: .*bbh.jsonl, line 1: missing 'question', 'choices', 'answer' "
            r"for the mmlu format",
        ),
        (lambda p: ["--task", str(p["bbh"]), "--format", "mmlu"], "--task: .* for the mmlu format"),
        (
            lambda p: ["--task", str(p["mmlu"]), "--dev", str(p["small"]), "--shots", "3"],
            "--shots: 3 shots exceed the 2 examples of the dev split",
        ),
        (
            lambda p: ["--task", str(p["mmlu"]), "--shots", "5"],
            "--shots: 5 shots held out of the 5 examples .* leave none to score",
        ),
        (
            lambda p: ["--task", str(p["mmlu"]), "--checkpoint", str(p["dir"])],
            "--checkpoint: .* is neither a checkpoint nor a run directory",
        ),
        (
            lambda p: ["--task", str(p["mmlu"]), "--checkpoint", str(p["bert"])],
            "--checkpoint: model must be a fastlm GPT or T5",
        ),
        (lambda p: ["--task", str(p["mmlu"]), "--device", "abacus"], "--device: "),
    ],
)
def test_errors_name_the_argument(make_args, message, checkpoints, write_jsonl, tmp_path, capsys):
    paths = {
        "dir": tmp_path,
        "mmlu": write_jsonl("mmlu.jsonl", MMLU),
        "small": write_jsonl("small.jsonl", MMLU[:2]),
        "bbh": write_jsonl("bbh.jsonl", BBH),
        "bert": checkpoints["bert"],
    }
    paths["bad"] = write_jsonl("bad.jsonl", MMLU[:1])
    paths["bad"].write_text(paths["bad"].read_text() + "{oops\n")
    args = make_args(paths)
    if "--checkpoint" not in args:
        args += ["--checkpoint", str(checkpoints["gpt"])]
    assert cli.main([*args, "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fastlm eval: ")
    assert len(captured.err.splitlines()) == 1
    assert re.search(message, captured.err), captured.err


@pytest.mark.parametrize(
    "bad",
    [
        ["--shots", "-1"],
        ["--shots", "two"],
        ["--batch-size", "0"],
        ["--format", "squad"],
        ["--limit", "0"],
    ],
)
def test_bad_flags_are_usage_errors(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--checkpoint", "x", "--task", "y", *bad])
    assert exit_info.value.code == 2
    assert bad[0] in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--checkpoint", "x"])
    assert exit_info.value.code == 2
