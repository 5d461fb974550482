"""TrainConfig: validation, files, flags."""

from __future__ import annotations

import json
import math

import pytest

from fastlm.train import TrainConfig
from fastlm.train.config import argument_parser
from fastlm.train.runs import from_arguments


def parse(argv: list[str]) -> TrainConfig:
    return from_arguments(argument_parser().parse_args(argv))


def test_defaults_are_valid_and_roundtrip():
    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_keys_are_rejected_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key\(s\) 'lr_max'.*valid keys: model,"):
        TrainConfig.from_dict({"lr_max": 1.0})


@pytest.mark.parametrize(
    "key, value",
    [
        ("max_steps", "10"),
        ("lr", "fast"),
        ("progress", 1),
        ("data", "a.txt"),
        ("betas", [0.9]),
        ("model_overrides", [1]),
    ],
)
def test_wrong_types_name_the_key(key, value):
    with pytest.raises(ValueError, match=f"config key '{key}' must be"):
        TrainConfig.from_dict({key: value})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch_size", 0, "batch_size must be a positive int"),
        ("precision", "fp8", "precision must be one of auto, fp32, bf16, fp16"),
        ("schedule", "step", "schedule must be one of"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("val_fraction", 1.0, "val_fraction must be in"),
        ("checkpointing", -1, "checkpointing must be a non-negative int"),
        ("betas", (0.9, 1.0), "betas must be two numbers"),
        ("dp_replicate", 0, "dp_replicate must be a positive int"),
        ("dp_replicate", 2, "dp_replicate shapes fully sharded data parallelism: add --fsdp"),
        ("cpu_offload", True, "cpu_offload shapes fully sharded data parallelism: add --fsdp"),
        ("reshard_after_forward", False, "reshard_after_forward shapes fully sharded"),
        ("fsdp", 1, "fsdp must be a bool"),
    ],
)
def test_bad_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{key: value})


def test_fsdp_refuses_fp16_naming_bf16():
    with pytest.raises(ValueError, match="precision 'fp16' with fsdp.*use bf16"):
        TrainConfig(fsdp=True, precision="fp16")


NON_FINITE = [
    ("lr", math.inf, "lr must be a finite number > 0, got inf"),
    ("lr", math.nan, "lr must be a finite number > 0, got nan"),
    ("adam_eps", math.inf, "adam_eps must be a finite number > 0"),
    ("weight_decay", math.inf, "weight_decay must be a finite number >= 0"),
    ("grad_clip", math.nan, "grad_clip must be a finite number >= 0"),
    ("val_fraction", math.nan, "val_fraction must be in"),
    ("min_lr_ratio", math.nan, "min_lr_ratio must be in"),
    ("betas", (0.9, math.nan), "betas must be two numbers"),
    ("model_overrides", {"dropout": math.nan}, r"model_overrides\['dropout'\] must be finite"),
    ("model_overrides", {"norm_eps": -math.inf}, r"model_overrides\['norm_eps'\] must be finite"),
]


@pytest.mark.parametrize("key, value, match", NON_FINITE)
def test_every_float_setting_must_be_finite(key, value, match, tmp_path):
    """As a keyword, from plain values, from a JSON file (NaN, Infinity)."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{key: value})
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict({key: value})
    (tmp_path / "c.json").write_text(json.dumps({key: value}))  # writes NaN / Infinity
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_file(tmp_path / "c.json")


FLAGS = [["--lr", "inf"], ["--grad-clip", "nan"], ["--model-overrides", '{"dropout": NaN}']]


@pytest.mark.parametrize("flags", FLAGS)
def test_non_finite_flags_are_refused(flags):
    with pytest.raises(ValueError, match="must be (a )?finite"):
        parse(flags)


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta", ""])
def test_device_must_be_one_the_trainer_runs_on(device):
    with pytest.raises(
        ValueError, match=f"device must be auto, cpu, cuda or cuda:N, got {device!r}"
    ):
        TrainConfig(device=device)


def test_unreadable_config_files_are_one_line_naming_the_file(tmp_path):
    for name, text, problem in (
        ("a.yaml", "lr: [1\n", r"not valid YAML \(line 2, column 1: expected ',' or ']'"),
        ("b.yaml", "lr: 1\n  x: [\n", r"not valid YAML \(line 2, column 4"),
        ("c.json", '{"lr": ', r"Expecting value: line 1 column 8"),
        ("d.yaml", "- lr\n- 1\n", r"a training config must be a mapping, got list"),
        ("e.yaml", "lr: .inf\n", r"lr must be a finite number > 0, got inf"),
    ):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=f"config file {tmp_path / name}: {problem}") as error:
            TrainConfig.from_file(tmp_path / name)
        assert "\n" not in str(error.value)


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "lr: 1.0e-3\nbetas: [0.8, 0.9]\ndata: [a.txt]\nmodel_overrides: {num_layers: 2}\n"
    )
    cfg = TrainConfig.from_file(tmp_path / "c.yaml")
    assert (cfg.lr, cfg.betas, cfg.data, cfg.model_overrides) == (
        1e-3,
        (0.8, 0.9),
        ["a.txt"],
        {"num_layers": 2},
    )
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7, "tokenizer": None}))
    assert TrainConfig.from_file(tmp_path / "c.json").max_steps == 7
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match="must end in .yaml"):
        TrainConfig.from_file(tmp_path / "c.toml")
    (tmp_path / "bad.yaml").write_text("warmup: 3\n")
    with pytest.raises(ValueError, match="unknown config key.*'warmup'"):
        TrainConfig.from_file(tmp_path / "bad.yaml")


def test_flags_override_the_file(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.5\nmax_steps: 9\nprogress: true\n")
    cfg = parse(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--lr",
            "0.25",
            "--no-progress",
            "--betas",
            "0.8",
            "0.99",
            "--model-overrides",
            '{"dropout": 0.1}',
            "--data",
            "x.txt",
            "y.jsonl",
            "--tokenizer",
            "t.json",
        ]
    )
    assert (cfg.lr, cfg.max_steps, cfg.progress, cfg.betas) == (0.25, 9, False, (0.8, 0.99))
    assert (cfg.model_overrides, cfg.data, cfg.tokenizer) == (
        {"dropout": 0.1},
        ["x.txt", "y.jsonl"],
        "t.json",
    )


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit):
        parse(["--learning-rate", "1"])
    assert "unrecognized arguments: --learning-rate" in capsys.readouterr().err
