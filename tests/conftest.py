"""Shared test set-up: fresh seeds, the gpu mark, and the device/backend matrix.

Every test gets a fresh random seed (shown in the report of a failing test; set
FASTLM_TEST_SEED to replay it). A test that takes ``device_backend`` runs on the CPU under
Triton's interpreter everywhere, and on CUDA with the Triton and the C++ kernels (``gpu``
mark) where a GPU is present: the interpreter case is each GPU test's CPU twin.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (its CPU twin runs under the interpreter)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "device_backend" in metafunc.fixturenames:
        metafunc.parametrize(
            "device_backend",
            [
                pytest.param(("cpu", "triton"), id="interpreter"),
                pytest.param(("cuda", "triton"), id="cuda-triton", marks=pytest.mark.gpu),
                pytest.param(("cuda", "cuda"), id="cuda-cpp", marks=pytest.mark.gpu),
            ],
        )


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("FASTLM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed and "fresh_seed" in item.funcargs:
        report.sections.append(("fastlm seed", f"FASTLM_TEST_SEED={item.funcargs['fresh_seed']}"))
    return report
