"""Every Python block of README.md runs as written, on a CPU as on a GPU.

The blocks run in order, each in a fresh interpreter, in one scratch directory: a block may
read what an earlier one wrote (the evaluation example reads the training example's run). A
block that names an extra (``pip install "fastlm[eval]"``) is skipped, naming what is
missing, where that extra is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # of the opening fence
    code: str


def python_blocks(text: str) -> list[Block]:
    blocks, lines = [], text.splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append(Block(start, "\n".join(lines[start : number - 1]) + "\n"))
            start = None
    assert start is None, f"README.md:{start}: a ```python block is never closed"
    return blocks


def missing_requirements(code: str) -> list[str]:
    """The requirements of the extras ``code`` names (``fastlm[eval]``) not installed here."""
    extras = set(re.findall(r"fastlm\[(\w+)\]", code))
    missing = []
    for line in importlib.metadata.requires("fastlm") or []:
        requirement = Requirement(line)
        marker = requirement.marker
        if not any(marker and marker.evaluate({"extra": extra}) for extra in extras):
            continue
        try:
            importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(requirement.name)
    return missing


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 4, [b.line for b in BLOCKS]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> dict:
    return {"dir": tmp_path_factory.mktemp("readme"), "ran": set()}


def _run(block: Block, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_python_block_runs_as_written(index, scratch):
    block = BLOCKS[index]
    if missing := missing_requirements(block.code):
        pytest.skip(f"README.md:{block.line} needs {', '.join(missing)} (not installed)")
    # Run alone (-k), a block still finds what the blocks before it wrote.
    for earlier in range(index):
        if earlier not in scratch["ran"] and not missing_requirements(BLOCKS[earlier].code):
            _run(BLOCKS[earlier], scratch["dir"])
            scratch["ran"].add(earlier)
    done = _run(block, scratch["dir"])
    scratch["ran"].add(index)
    assert done.returncode == 0, f"README.md:{block.line} failed:\n{done.stderr[-4000:]}"
