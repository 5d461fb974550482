"""The ``fastlm`` console command."""

from __future__ import annotations

import pytest

from fastlm import backend, cli


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
