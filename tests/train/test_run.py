"""``fastlm train`` / ``fastlm generate`` end to end, on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from fastlm import cli
from fastlm.data import default_corpus
from fastlm.models import loading
from fastlm.train import latest_checkpoint

TINY = {
    "gpt": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "bert": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "t5": {
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 2,
        "head_dim": 16,
        "intermediate_size": 64,
    },
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """User data as files: half the documents as .txt files, half as JSONL lines."""
    root = tmp_path_factory.mktemp("corpus")
    docs = default_corpus()[:240]
    for i, doc in enumerate(docs[:120]):
        (root / f"doc{i:03d}.txt").write_text(doc)
    with (root / "more.jsonl").open("w") as f:
        for doc in docs[120:]:
            f.write(json.dumps({"body": doc}) + "\n")
    return root


def flags(family, corpus, out, *extra):
    return [
        "--model",
        family,
        "--model-overrides",
        json.dumps(TINY[family]),
        "--data",
        str(corpus),
        "--text-field",
        "body",
        "--vocab-size",
        "400",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--save-every",
        "3",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--log-every",
        "1",
        "--warmup-steps",
        "2",
        "--keep-last",
        "5",
        "--no-progress",
        "--out-dir",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_train_then_generate(family, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *flags(family, corpus, out)]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "perplexity" in printed
    latest = latest_checkpoint(out / "checkpoints")
    assert latest.name == "step-00000006"
    assert (latest / "tokenizer.json").is_file()
    assert (out / "loss.png").is_file() == bool(importlib.util.find_spec("matplotlib"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    prompt = {"gpt": "Return the", "bert": "Return the <mask> of", "t5": "Return the"}[family]
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "5",
                "--greedy",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    if family == "gpt":
        assert text.startswith(prompt) and len(text) > len(prompt) + 1
    elif family == "bert":
        assert text.startswith("Return the") and "<mask>" not in text
    else:
        assert text.strip()


def test_generate_errors(corpus, tmp_path, capsys):
    assert cli.main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 1
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err
    out = tmp_path / "bert"
    cli.main(["train", *flags("bert", corpus, out, "--max-steps", "1")])
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "no mask here"]) == 1
    assert "put <mask> in the prompt" in capsys.readouterr().err


def test_train_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default out_dir is relative
    assert cli.main(["train", "--data", str(tmp_path / "missing.txt"), "--no-progress"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt7"]) == 1
    assert "unknown preset 'gpt7'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # rejected before any work
    with pytest.raises(SystemExit):
        cli.main(["train", "--nope"])
    (tmp_path / "small").mkdir()
    for i, text in enumerate(["a long enough document " * 40, "tiny"]):
        (tmp_path / "small" / f"{i}.txt").write_text(text)
    assert (
        cli.main(
            [
                "train",
                "--data",
                str(tmp_path / "small"),
                "--vocab-size",
                "400",
                "--val-fraction",
                "0.5",
                "--no-progress",
                "--no-clean-data",
            ]
        )
        == 1
    )
    assert "the validation split (1 documents)" in capsys.readouterr().err


def _run_cli(args, env_extra=None, kill_at_save=None):
    """``fastlm train`` in a fresh process; with ``kill_at_save=n`` the process SIGKILLs
    itself in the middle of its n-th checkpoint save (weights written, the rest not)."""
    prelude = ""
    if kill_at_save:
        prelude = textwrap.dedent(f"""
            import os, signal, torch
            real_save, saves = torch.save, []
            def save_then_die(*a, **k):
                real_save(*a, **k)
                saves.append(1)
                if len(saves) == {kill_at_save}:
                    os.kill(os.getpid(), signal.SIGKILL)
            torch.save = save_then_die
        """)
    script = prelude + f"from fastlm.cli import main\nraise SystemExit(main({args!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)


def test_killed_during_a_save_then_resumed_matches_the_uninterrupted_run(corpus, tmp_path):
    """The run is SIGKILLed while writing its step-6 checkpoint; ``--resume latest`` picks
    step 3 and the continued run logs the same losses, bit for bit, as an uninterrupted
    one (both in fresh single-threaded processes, as deterministic CPU runs need)."""
    args = flags(
        "gpt",
        corpus,
        tmp_path / "whole",
        "--model-overrides",
        json.dumps({**TINY["gpt"], "dropout": 0.1}),
    )
    whole = _run_cli(["train", *args])
    assert whole.returncode == 0, whole.stderr
    killed_args = flags(
        "gpt",
        corpus,
        tmp_path / "killed",
        "--model-overrides",
        json.dumps({**TINY["gpt"], "dropout": 0.1}),
    )
    killed = _run_cli(["train", *killed_args], kill_at_save=2)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step-00000003"
    resumed = _run_cli(["train", *killed_args, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]

    assert losses("killed") == losses("whole")
    assert [s for s, _ in losses("whole")] == [1, 2, 3, 4, 5, 6]


def test_resume_takes_the_runs_own_settings(corpus, tmp_path, capsys):
    """``--resume latest`` with only the run directory continues with the saved settings
    (model, data, tokenizer); flags given on top (a longer run) still apply."""
    out = tmp_path / "run"
    assert cli.main(["train", *flags("gpt", corpus, out)]) == 0
    assert (
        cli.main(
            [
                "train",
                "--out-dir",
                str(out),
                "--resume",
                "latest",
                "--max-steps",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    assert latest_checkpoint(out / "checkpoints").name == "step-00000008"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, lines) if "loss" in r] == list(range(1, 9))
    assert "training loss" in capsys.readouterr().out


def test_a_run_saved_before_data_cleaning_resumes_on_its_own_data(corpus, tmp_path, capsys):
    """A checkpoint whose config has no cleaning keys (written before cleaning existed, when
    the documents went in as read) resumes without cleaning: cleaning would change the
    rows under the saved data position."""
    out = tmp_path / "run"
    assert cli.main(["train", *flags("gpt", corpus, out), "--no-clean-data"]) == 0
    for meta_file in (out / "checkpoints").glob("*/trainer.json"):
        meta = json.loads(meta_file.read_text())
        for key in ("clean_data", "scrub_pii", "near_dedup", "filter_data"):
            del meta["config"][key]
        meta_file.write_text(json.dumps(meta))
    capsys.readouterr()
    assert (
        cli.main(
            [
                "train",
                "--out-dir",
                str(out),
                "--resume",
                "latest",
                "--max-steps",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "cleaned:" not in capsys.readouterr().out
    assert latest_checkpoint(out / "checkpoints").name == "step-00000008"


# -- runs never mix, and every refusal is one line ------------------------------------------


@pytest.fixture(scope="module")
def gpt_run(corpus, tmp_path_factory):
    """A finished ``fastlm train`` GPT run: checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("gpt") / "run"
    assert cli.main(["train", *flags("gpt", corpus, out)]) == 0
    return out


def _steps_logged(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def test_two_runs_into_one_directory_never_mix(gpt_run, corpus, tmp_path, capsys):
    """A BERT run into the GPT's directory is refused in one line naming --resume and
    --overwrite, leaving the GPT run whole (generate still loads it); with --overwrite
    the directory holds the BERT run alone."""
    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    capsys.readouterr()
    assert cli.main(["train", *flags("bert", corpus, run, "--max-steps", "4")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastlm train: --out-dir {run} holds a run already (checkpoints, ")
    assert (
        err.endswith(
            ": continue it with --resume latest, or delete it and start afresh with --overwrite\n"
        )
        and err.count("\n") == 1
    )
    assert [p.name for p in loading.list_checkpoints(run / "checkpoints")] == [
        "step-00000003",
        "step-00000006",
    ]
    assert _steps_logged(run) == [1, 2, 3, 4, 5, 6]
    assert (
        cli.main(
            [
                "generate",
                "--checkpoint",
                str(run),
                "--prompt",
                "Return the",
                "--max-new-tokens",
                "3",
                "--greedy",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Return the")

    assert cli.main(["train", *flags("bert", corpus, run, "--max-steps", "4"), "--overwrite"]) == 0
    assert [p.name for p in loading.list_checkpoints(run / "checkpoints")] == [
        "step-00000003",
        "step-00000004",
    ]
    assert _steps_logged(run) == [1, 2, 3, 4]
    meta = json.loads((run / "checkpoints" / "step-00000004" / "trainer.json").read_text())
    assert meta["model"]["class"] == "BertConfig"
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "Return the <mask>"]) == 0
    assert "<mask>" not in capsys.readouterr().out


def _truncate(run, name="model.safetensors"):
    file = run / "checkpoints" / "step-00000006" / name
    file.write_bytes(file.read_bytes()[:100])


def _trainer_json(text):
    def write(run):
        (run / "checkpoints" / "step-00000006" / "trainer.json").write_text(text)

    return write


def _step(value):
    def write(run):
        file = run / "checkpoints" / "step-00000006" / "trainer.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "step": value}))

    return write


def _swapped_tokenizer(run):
    spec = json.loads((run / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    token = {i: t for t, i in vocab.items()}
    vocab[token[300]], vocab[token[301]] = 301, 300
    (run.parent / "swapped.json").write_text(json.dumps(spec))


RESUME = ["train", "--out-dir", "{run}", "--resume", "latest", "--max-steps", "8", "--no-progress"]
TRUNCATED = (
    "{run}/checkpoints/step-00000006/model.safetensors: truncated or not a "
    "safetensors file (Error while deserializing header: invalid header length); the "
    "previous checkpoint is {run}/checkpoints/step-00000003"
)
HEADS = json.dumps({**TINY["gpt"], "num_heads": 4})

# (damage to the run, command, what its one line says)
ONE_LINERS = [
    (_truncate, RESUME, TRUNCATED),
    (
        None,
        [
            "finetune",
            "--train",
            "{tmp}/pairs.tsv",
            "--validation",
            "{tmp}/pairs.tsv",
            "--model",
            "bert-tiny",
            "--batch-size",
            "4",
            "--out-dir",
            "{run}",
        ],
        "): delete it and start afresh with --overwrite",  # finetune has no --resume
    ),
    (_truncate, ["generate", "--checkpoint", "{run}", "--prompt", "x"], TRUNCATED),
    (
        _truncate,
        ["eval", "--checkpoint", "{run}", "--task", "{tmp}/task.jsonl"],
        "--checkpoint: " + TRUNCATED,
    ),
    (
        _truncate,
        [
            "finetune",
            "--train",
            "{tmp}/pairs.tsv",
            "--validation",
            "{tmp}/pairs.tsv",
            "--init",
            "{run}",
            "--out-dir",
            "{tmp}/ft",
            "--batch-size",
            "4",
        ],
        TRUNCATED,
    ),
    (
        lambda run: _truncate(run, "state.pt"),
        RESUME,
        "{run}/checkpoints/step-00000006/state.pt: truncated or not a torch.save file",
    ),
    (
        lambda run: (run / "checkpoints/step-00000006/state.pt").write_bytes(b""),
        RESUME,
        "{run}/checkpoints/step-00000006/state.pt: empty; the previous checkpoint is ",
    ),
    (_trainer_json("{}"), RESUME, "trainer.json: lacks 'step', 'tokens_seen', "),
    (_trainer_json("[]"), RESUME, "trainer.json: expected a JSON object, got list"),
    (_trainer_json('{"step": '), RESUME, "trainer.json: not valid JSON (Expecting value"),
    (_step(-5), RESUME, "trainer.json: 'step' must be an int >= 0, got -5; the previous "),
    (
        None,
        [*RESUME, "--model-overrides", HEADS],
        "--resume {run}/checkpoints/step-00000006: the checkpoint's model has num_heads=2, "
        "num_kv_heads=2, head_dim=16, this run's config num_heads=4, num_kv_heads=4, head_dim=8",
    ),
    (
        None,
        [*RESUME, "--model", "bert"],
        "the checkpoint's model config is a GPTConfig, this run's a BertConfig",
    ),
    (
        _swapped_tokenizer,
        [*RESUME, "--tokenizer", "{tmp}/swapped.json"],
        "this run's tokenizer is not the checkpoint's (id 300 is ",
    ),
    (
        None,
        ["train", "--tokenizer", "{tmp}/pairs.tsv", "--out-dir", "{tmp}/new"],
        "{tmp}/pairs.tsv is not a tokenizer.json file (",
    ),
    (
        None,
        ["train", "--model-overrides", '{"heads": 2}', "--out-dir", "{tmp}/new"],
        "--model-overrides: GPTConfig has no field 'heads'; its fields: activation, ",
    ),
    (None, ["train", "--device", "tpu"], "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (None, ["train", "--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (
        None,
        ["train", "--config", "{tmp}/bad.yaml"],
        "config file {tmp}/bad.yaml: not valid YAML (line 2, column 1: ",
    ),
    (
        None,
        ["train", "--out-dir", "{tmp}/pairs.tsv"],
        "--out-dir {tmp}/pairs.tsv is a file; expected a directory",
    ),
    (
        None,
        ["generate", "--checkpoint", "{run}", "--prompt", "x", "--max-new-tokens", "300"],
        "exceed the model's 256 positions (max_position_embeddings): at most ",
    ),
    (
        None,
        ["generate", "--checkpoint", "{run}", "--prompt", " ".join(["word"] * 400)],
        "more than the model's 256 positions (max_position_embeddings)",
    ),
    (
        None,
        ["data", "clean", "{tmp}/task.jsonl", "{tmp}/pairs.tsv/out.jsonl"],
        "OUT {tmp}/pairs.tsv/out.jsonl cannot be written (",
    ),
]


@pytest.mark.parametrize("damage, argv, message", ONE_LINERS)
def test_refusals_are_one_line_never_a_traceback(
    gpt_run, tmp_path, capsys, monkeypatch, damage, argv, message
):
    """Damaged checkpoint files (named, with the checkpoint to fall back to), another
    run's model or tokenizer, and bad settings or paths: exit 1 and one line on stderr,
    the same from train, generate, eval and finetune."""
    monkeypatch.chdir(tmp_path)  # the default out_dir is relative
    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    (tmp_path / "pairs.tsv").write_text("sentence\tlabel\n" + "a fine film\t1\n" * 8)
    (tmp_path / "task.jsonl").write_text('{"question": "q?", "choices": ["a", "b"], "answer": 0}\n')
    (tmp_path / "bad.yaml").write_text("lr: [1\n")
    if damage is not None:
        damage(run)
    capsys.readouterr()

    def fill(text):
        return text.replace("{run}", str(run)).replace("{tmp}", str(tmp_path))

    argv = [fill(a) for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fastlm {argv[0]}") and fill(message) in err
    assert err.count("\n") == 1 and "Traceback" not in err and "weights_only" not in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "new").exists()


def test_resume_removes_stale_temporary_directories_at_the_start(gpt_run, tmp_path):
    """A save killed half-way leaves .tmp-*; the next start of the run removes it, even
    when it saves nothing (here: already at max_steps)."""
    run = tmp_path / "run"
    shutil.copytree(gpt_run, run)
    (run / "checkpoints" / ".tmp-step-00000009-x").mkdir()
    assert cli.main(["train", "--out-dir", str(run), "--resume", "latest", "--no-progress"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]
