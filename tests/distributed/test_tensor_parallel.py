"""Tensor-parallel layers on CPU with gloo, 2 ranks launched by torchrun: outputs and
gradients equal the single-process layers they were sliced from (tp_checks.py)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = ["mlp", "embedding_and_loss", "models"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel_matches_single_process(check):
    script = Path(__file__).with_name("tp_checks.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(script), check]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
