"""TRITON_INTERPRET=1 (Triton's own switch for debugging kernels) changes nothing fastlm computes.

With the variable set before import, ``@triton.jit`` builds interpreted functions, which Triton
would run on its stock interpreter (bf16 ``tl.dot`` on raw bits, truncating bf16 rounding);
``fastlm.kernels.launch`` must run them with the same fixes as its own interpreted twins. Every
kernel family's public op, forward and backward, runs once in a process with the variable and
once without (interpret_env_cases.py), and every output and gradient must match bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

CASES = Path(__file__).with_name("interpret_env_cases.py")


def _run_cases(seed: int, out: Path, interpret: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTLM_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(CASES), str(seed), str(out)],
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"interpret_env_cases.py with TRITON_INTERPRET={'1' if interpret else 'unset'} failed "
        f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )
    return torch.load(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits, so NaN payloads and signed zeros must match too."""
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _difference(name: str, a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    a64, b64 = a.double(), b.double()
    nan_a, nan_b = a64.isnan(), b64.isnan()
    differs = (a64 != b64) & ~(nan_a & nan_b) | (nan_a != nan_b)
    both = ~nan_a & ~nan_b
    max_diff = (a64 - b64)[both].abs().max().item() if both.any() else 0.0
    i = differs.reshape(-1).nonzero()[0].item() if differs.any() else 0
    return (
        f"{name} {a.dtype} {tuple(a.shape)}: {int(differs.sum())}/{a.numel()} elements differ, "
        f"max |diff| {max_diff:.3g} (NaN in {int(nan_a.sum())} vs {int(nan_b.sum())}); "
        f"e.g. flat index {i}: {a.reshape(-1)[i].item()!r} set vs "
        f"{b.reshape(-1)[i].item()!r} unset"
    )


def test_triton_interpret_env_gives_the_same_bits(tmp_path, fresh_seed):
    unset = _run_cases(fresh_seed, tmp_path / "unset.pt", interpret=False)
    set_ = _run_cases(fresh_seed, tmp_path / "set.pt", interpret=True)
    assert (unset["interpreted"], set_["interpreted"]) == (False, True), (
        "the variable did not switch @triton.jit to interpreted functions"
    )
    assert unset["not_run"] == [], (
        f"kernels no case launched: {unset['not_run']} (add a case to interpret_env_cases.py)"
    )
    assert unset["tensors"].keys() == set_["tensors"].keys()
    mismatches = [
        _difference(name, set_["tensors"][name], expected)
        for name, expected in unset["tensors"].items()
        if expected.dtype != set_["tensors"][name].dtype
        or expected.shape != set_["tensors"][name].shape
        or not torch.equal(_bits(set_["tensors"][name]), _bits(expected))
    ]
    assert not mismatches, (
        f"{len(mismatches)} of {len(unset['tensors'])} tensors differ with TRITON_INTERPRET=1:\n"
        + "\n".join(mismatches)
    )
