"""Tensor, sequence and data parallelism on CPU with gloo, launched by torchrun: every
check in tp_checks.py compares the parallel model with the single-process one it was cut
from (outputs, losses over training steps, updated parameters, collectives per step)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fastlm import cli
from fastlm.data import default_corpus
from fastlm.models.loading import model_of
from fastlm.parallel.checkpoint import export
from fastlm.testing import assert_policy
from fastlm.train import latest_checkpoint
from fastlm.train.run import load_model

TINY_GPT = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 400}

# One launch per group of checks (a launch costs a few seconds of start-up per rank).
LAUNCHES = {
    "layers": (2, ["layers", "lora_and_quant", "desync"]),
    "tensor_parallel": (2, ["models"]),
    "data_parallel": (2, ["data_parallel"]),
    "mesh_2x2": (4, ["mesh_2x2"]),
    "fsdp_2": (2, ["fsdp_2"]),
    "fsdp_4": (4, ["fsdp_4"]),
    "reshard_matrix": (4, ["reshard_matrix"]),
}


def torchrun(ranks: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a port the launcher picks itself. Every collective
    # inside times out after at most 60 s (tp_checks.py, --dist-timeout); the launch too.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(ranks),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_parallel_matches_single_process(launch):
    ranks, checks = LAUNCHES[launch]
    proc = torchrun(ranks, str(Path(__file__).with_name("tp_checks.py")), *checks)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    with (root / "docs.jsonl").open("w") as f:
        for doc in default_corpus()[:240]:
            f.write(json.dumps({"text": doc}) + "\n")
    return root


# Two micro-batches per step: DDP averages once, in the second one's backward; FSDP
# reduce-scatters each.
FLAGS = [
    "--model",
    "gpt",
    "--model-overrides",
    json.dumps(TINY_GPT),
    "--vocab-size",
    "400",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--grad-accum",
    "2",
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
    "--dist-timeout",
    "60",
]


def test_trainer_under_torchrun(corpus, tmp_path):
    """``torchrun -m fastlm.train`` at tp=2 and at dp=2 trains as one process does; a tp=2
    run resumes exactly, and on one process; its checkpoint loads on one device (and a
    one-device checkpoint at tp=2) with the same outputs, and exports to a single file."""
    flags = [*FLAGS, "--data", str(corpus)]
    one, tp2, dp2 = tmp_path / "one", tmp_path / "tp2", tmp_path / "dp2"
    assert cli.main(["train", *flags, "--out-dir", str(one)]) == 0
    for out, layout in ((tp2, ["--tp", "2"]), (dp2, ["--dp", "2"])):
        proc = torchrun(2, "-m", "fastlm.train", *flags, "--out-dir", str(out), *layout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.count("validation loss") == 3  # rank 0 alone logs (2 + final)
        # fp32 sums in another order, 6 AdamW steps: the losses agree to ~1e-6.
        assert _losses(out) == pytest.approx(_losses(one), rel=2e-6)
    third = tp2 / "checkpoints" / "step-00000003"
    assert (third / "dcp" / ".metadata").is_file() and not list(third.glob("model*"))

    resumed = tmp_path / "resumed"
    shutil.copytree(tp2, resumed)
    proc = torchrun(
        2,
        "-m",
        "fastlm.train",
        *flags,
        "--out-dir",
        str(resumed),
        "--tp",
        "2",
        "--resume",
        str(resumed / "checkpoints" / "step-00000003"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(resumed) == _losses(tp2)  # bit for bit

    # On one process, from the tp=2 run's step 3: the same losses as the tp=2 run's last 3.
    on_one = tmp_path / "on_one"
    shutil.copytree(tp2, on_one)
    shutil.rmtree(on_one / "checkpoints" / "step-00000006")
    assert cli.main(["train", "--out-dir", str(on_one), "--resume", "latest"]) == 0
    assert _losses(on_one) == pytest.approx(_losses(tp2), rel=2e-6)

    last = {run: latest_checkpoint(run / "checkpoints") for run in (one, tp2)}
    env = {**os.environ, "FASTLM_CHECKPOINTS": os.pathsep.join(map(str, last.values()))}
    proc = torchrun(2, str(Path(__file__).with_name("tp_checks.py")), "reshard", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ids = torch.arange(24).reshape(2, 12) % 400
    for run, path in last.items():
        model, _ = load_model(run)  # one device: a tp=2 checkpoint reassembled
        with torch.no_grad():
            logits, logits64 = (m(ids).logits for m in (model, copy.deepcopy(model).double()))
        # Within the numerical policy of the float64 twin, given the one-device float32 run.
        assert_policy(torch.load(path / "tp2_logits.pt"), logits64, logits, f"{run.name} logits")
    exported = export(last[tp2], tmp_path / "model.safetensors")
    model = model_of(last[tp2])
    safetensors.torch.load_model(model, str(exported))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, load_model(tp2)[0](ids).logits)


def test_fsdp_trainer_resumes_at_any_layout(corpus, tmp_path):
    """``--fsdp`` under torchrun (checkpoints saved in the background) trains as one
    process does; it resumes exactly at its own layout, on one process with ``--resume
    latest``, and a one-process run resumes at tp=2 x fsdp=2 on 4 ranks; ``generate``
    reads the sharded checkpoint; two torchrun "nodes" on the loopback interface run the
    same job."""
    flags = [*FLAGS, "--data", str(corpus)]
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert cli.main(["train", *flags, "--out-dir", str(one)]) == 0
    proc = torchrun(
        2, "-m", "fastlm.train", *flags, "--out-dir", str(fsdp), "--fsdp", "--async-save"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "fully sharded data parallel (FSDP2) 2" in proc.stdout
    assert _losses(fsdp) == pytest.approx(_losses(one), rel=2e-6)
    third = fsdp / "checkpoints" / "step-00000003"
    assert (third / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in third.glob("rng-*.pt")) == ["rng-000.pt", "rng-001.pt"]

    def resumed_copy(run: Path, name: str) -> Path:  # the run as it was after step 3
        copy = tmp_path / name
        shutil.copytree(run, copy)
        shutil.rmtree(copy / "checkpoints" / "step-00000006")
        return copy

    again = resumed_copy(fsdp, "again")
    proc = torchrun(
        2, "-m", "fastlm.train", *flags, "--out-dir", str(again), "--fsdp", "--resume", "latest"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(again) == _losses(fsdp)  # bit for bit

    alone = resumed_copy(fsdp, "alone")  # torchrun's run continues as one process
    assert cli.main(["train", "--out-dir", str(alone), "--resume", "latest"]) == 0
    assert _losses(alone) == pytest.approx(_losses(fsdp), rel=2e-6)

    grown = resumed_copy(one, "grown")  # and a one-process run on 4 ranks, 2D
    proc = torchrun(
        4,
        "-m",
        "fastlm.train",
        "--out-dir",
        str(grown),
        "--resume",
        "latest",
        "--tp",
        "2",
        "--fsdp",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tensor parallel 2, fully sharded data parallel (FSDP2) 2" in proc.stdout
    assert _losses(grown) == pytest.approx(_losses(one), rel=2e-6)

    model, _ = load_model(fsdp)
    reference, _ = load_model(alone)  # the same weights, from one process's checkpoint
    ids = torch.arange(24).reshape(2, 12) % 400
    with torch.no_grad():
        assert_policy(
            model(ids).logits,
            copy.deepcopy(reference).double()(ids).logits,
            reference(ids).logits,
            "logits of the fsdp run's checkpoint",
        )

    nodes = tmp_path / "nodes"
    port = str(_free_port())
    launches = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--rdzv-backend",
                "static",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
                "-m",
                "fastlm.train",
                *flags,
                "--out-dir",
                str(nodes),
                "--fsdp",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for launch in launches:
        out, err = launch.communicate(timeout=300)
        assert launch.returncode == 0, err[-4000:]
    assert _losses(nodes) == _losses(fsdp)  # the same job, bit for bit


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
