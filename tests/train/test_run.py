"""``fastlm train`` / ``fastlm generate`` end to end, on tiny settings."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fastlm import cli
from fastlm.data import default_corpus
from fastlm.train import latest_checkpoint

TINY = {
    "gpt": {"hidden_size": 32, "num_layers": 1, "num_heads": 2},
    "bert": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
    "t5": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "head_dim": 16,
           "intermediate_size": 64},
}  # fmt: skip


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
    return ["--model", family, "--model-overrides", json.dumps(TINY[family]), "--data",
            str(corpus), "--text-field", "body", "--vocab-size", "400", "--seq-len", "32",
            "--batch-size", "4", "--max-steps", "6", "--save-every", "3", "--eval-every", "3",
            "--eval-batches", "2", "--log-every", "1", "--warmup-steps", "2",
            "--keep-last", "5", "--no-progress", "--out-dir", str(out), *extra]  # fmt: skip


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
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", prompt,
                     "--max-new-tokens", "5", "--greedy"]) == 0  # fmt: skip
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
    assert cli.main(["train", "--data", str(tmp_path / "small"), "--vocab-size", "400",
                     "--val-fraction", "0.5", "--no-progress", "--no-clean-data"]) == 1  # fmt: skip
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
    args = flags("gpt", corpus, tmp_path / "whole", "--model-overrides",
                 json.dumps({**TINY["gpt"], "dropout": 0.1}))  # fmt: skip
    whole = _run_cli(["train", *args])
    assert whole.returncode == 0, whole.stderr
    killed_args = flags("gpt", corpus, tmp_path / "killed", "--model-overrides",
                        json.dumps({**TINY["gpt"], "dropout": 0.1}))  # fmt: skip
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
    assert cli.main(["train", "--out-dir", str(out), "--resume", "latest", "--max-steps", "8",
                     "--no-progress"]) == 0  # fmt: skip
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
    assert cli.main(["train", "--out-dir", str(out), "--resume", "latest", "--max-steps", "8",
                     "--no-progress"]) == 0  # fmt: skip
    assert "cleaned:" not in capsys.readouterr().out
    assert latest_checkpoint(out / "checkpoints").name == "step-00000008"
