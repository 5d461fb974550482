"""The ``bench`` fixture: the benchmark module a ``test_bench_<name>.py`` file covers."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench(request):
    """``bench/bench_<name>.py`` for ``tests/bench/test_bench_<name>.py``, imported as
    ``fastlm bench`` does: with the repo root on ``sys.path`` (``bench`` is not installed)."""
    name = Path(request.module.__file__).stem.removeprefix("test_")
    sys.path.insert(0, str(REPO))
    try:
        yield importlib.import_module(f"bench.{name}")
    finally:
        sys.path.remove(str(REPO))
