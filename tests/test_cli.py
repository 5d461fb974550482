"""The ``fastlm`` console command."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import subprocess
import sys

import pytest

from fastlm import backend, cli
from fastlm.train import TrainConfig


def test_info_lists_versions_device_and_every_backend_of_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("fastlm", "torch", "triton", "device", "_C"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    ops = backend.registered_ops()
    assert {"layer_norm", "rms_norm"} <= set(ops)
    for op, names in ops.items():
        for name in names:
            assert any(line.split()[:2] == [op, name] for line in out.splitlines()), (op, name)


def test_info_in_a_fresh_interpreter_lists_the_ops():
    """``import fastlm`` loads no op: ``fastlm info`` must load them itself, all of them
    (this process has imported every test module, and with them every op module)."""
    done = subprocess.run(
        [sys.executable, "-m", "fastlm.cli", "info"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}
    assert set(backend.registered_ops()) <= listed, done.stdout


def test_info_rejects_extra_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--bogus"])
    assert "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["data", "clean"], ["eval"], ["finetune"]])
def test_subcommands_reach_their_own_parsers(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert f"fastlm {' '.join(command)}" in capsys.readouterr().out  # the command's own usage


def test_data_needs_a_known_action(capsys):
    assert cli.main(["data", "shuffle"]) == 2
    assert "fastlm data clean" in capsys.readouterr().err


def test_one_error_path_for_every_subcommand(monkeypatch, capsys):
    """The project's refusals (bad input, file system, a diverged run) become one line and
    exit 1 whichever subcommand raised them; any other exception is a bug and keeps its
    traceback."""
    from fastlm.train import TrainingDiverged

    errors = [
        ValueError("--x: expected y"),
        OSError(13, "Permission denied", "out"),
        TrainingDiverged("step 3: non-finite loss"),
    ]
    for error in errors:
        for command in ("train", "generate", "data"):

            def fail(argv, error=error):
                raise error

            monkeypatch.setattr(cli, command, fail)
            assert cli.main([command]) == 1
            assert capsys.readouterr().err == f"fastlm {command}: {error}\n"
    monkeypatch.setattr(cli, "generate", lambda argv: {}["no such key"])
    with pytest.raises(KeyError, match="no such key"):
        cli.main(["generate"])


def _run_without_torch(code: str) -> str:
    """Run ``code`` in a fresh interpreter; fail if it imported torch."""
    probe = f"import sys\n{code}\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["info", "--help"],
        ["train", "--help"],
        ["train", "--max-steps", "x"],
        ["generate", "--help"],
        ["finetune", "--help"],
        ["finetune", "--epochs", "x"],
        ["eval", "--help"],
        ["data", "clean", "--help"],
        ["bench", "--help"],
    ],
    ids=" ".join,
)
def test_help_version_and_flag_errors_answer_before_torch_loads(argv):
    code = f"from fastlm import cli\ntry:\n    cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
    _run_without_torch(code)


def test_version_is_the_installed_one(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastlm {importlib.metadata.version('fastlm')}"


@pytest.mark.parametrize(
    "command", [[], ["info"], ["train"], ["generate"], ["finetune"], ["eval"], ["data", "clean"]]
)
def test_help_is_plain_text(command, capsys):
    """No reStructuredText markup (docstrings written for Sphinx) in what a user reads."""
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert out and not any(mark in out for mark in ("``", ":func:", ":class:", ":mod:")), out


def test_every_train_flag_says_its_meaning_default_and_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        doc = " ".join(field.metadata["doc"].split())
        assert doc and f"{doc} (default: " in text, (flag, doc)
        for choice in field.metadata["choices"] or ():
            assert choice in text, (flag, choice)
    assert "{cosine,linear,constant}" in text and "{auto,fp32,bf16,fp16}" in text


def test_subpackages_load_on_first_use_and_import_fastlm_loads_nothing():
    out = _run_without_torch(
        "import fastlm\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastlm.')))\n"
        "print(fastlm.__version__)\n"
    )
    assert out.splitlines()[0] == "[]", out
    code = (
        "import fastlm\n"
        "for name in fastlm.SUBPACKAGES:\n"
        "    assert getattr(fastlm, name).__name__ == f'fastlm.{name}', name\n"
        "assert fastlm.models.create('llama-tiny') is not None\n"
        "assert callable(fastlm.peft.apply_lora) and callable(fastlm.quant.quantize_)\n"
        "assert fastlm.use_backend is fastlm.backend.use_backend\n"
        "try:\n"
        "    fastlm.no_such_thing\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_thing' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
