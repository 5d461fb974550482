"""Tensor-parallel layers on CPU with gloo, 2 ranks launched by torchrun: outputs and
gradients equal the single-process layers they were sliced from (tp_checks.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHECKS = {"mlp": 2, "embedding_and_loss": 2, "models": 2, "mesh_2x2": 4}  # name: ranks


@pytest.mark.parametrize("check", CHECKS)
def test_tensor_parallel_matches_single_process(check):
    script = Path(__file__).with_name("tp_checks.py")
    # --standalone: a local rendezvous on a port the launcher picks itself.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(CHECKS[check]), str(script), check]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
