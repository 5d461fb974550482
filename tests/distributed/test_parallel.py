"""Tensor, sequence and data parallelism on CPU with gloo, launched by torchrun: every
check in tp_checks.py compares the parallel model with the single-process one it was cut
from (outputs, losses over training steps, updated parameters, collectives per step)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# One launch per group of checks (a launch costs a few seconds of start-up per rank).
LAUNCHES = {
    "layers": (2, ["layers", "lora_and_quant", "desync"]),
    "tensor_parallel": (2, ["models"]),
    "data_parallel": (2, ["data_parallel"]),
    "mesh_2x2": (4, ["mesh_2x2"]),
}


def torchrun(ranks: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # --standalone: a local rendezvous on a port the launcher picks itself.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(ranks), *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("launch", LAUNCHES)
def test_parallel_matches_single_process(launch):
    ranks, checks = LAUNCHES[launch]
    proc = torchrun(ranks, str(Path(__file__).with_name("tp_checks.py")), *checks)
    assert proc.returncode == 0, proc.stderr[-4000:]
