"""The checkout's ``kernels/`` folder is ``fastlm.kernels``; on ``sys.path`` as a top-level
``kernels`` (Python started at the repo root, ``fastlm bench``) it must not hide Hugging
Face's ``kernels`` package, which transformers 5 imports to build its models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="needs transformers"
)

# Builds tiny Llama and GPT-2 models in transformers, then prints where `kernels` comes from.
HF_MODELS = """
import transformers
transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64))
transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
try:
    import kernels
except ModuleNotFoundError:
    print("none")
else:
    print(kernels.__file__)
"""


def python(code: str, *flags: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=240
    )


def hugging_face_kernels() -> Path | None:
    """The installed ``kernels`` distribution's package folder, if there is one."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("kernels")).resolve()


@needs_transformers
def test_transformers_models_build_from_the_repo_root():
    proc = python(HF_MODELS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = proc.stdout.strip().splitlines()[-1]
    installed = hugging_face_kernels()
    # transformers 4 does not need the kernels package; then nothing may answer the name.
    expected = "none" if installed is None else str(installed / "__init__.py")
    assert (found if found == "none" else str(Path(found).resolve())) == expected


def test_without_another_kernels_package_the_import_fails_as_a_missing_module():
    # -S: no site-packages, so no other `kernels` anywhere on sys.path.
    proc = python("import kernels", "-S")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: No module named 'kernels'"), last
    assert "fastlm.kernels" in last, last


def test_fastlm_kernels_still_imports_from_the_repo_root():
    proc = python(
        "import fastlm.kernels.attention as a, fastlm.kernels as k; print(a.__name__, k.__name__)"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["fastlm.kernels.attention", "fastlm.kernels"]


@needs_transformers
def test_quick_model_bench_runs_through_fastlm_bench(tmp_path):
    """``fastlm bench`` puts the repo root first on sys.path, then builds transformers
    models of fastlm's weights; shrunk to one tiny case (the import path is the point)."""
    code = f"""
import importlib, sys
from fastlm import cli

real = importlib.import_module

def shrunk(name, *args, **kwargs):
    module = real(name, *args, **kwargs)
    if name == "bench.bench_models":
        module.SIZES[("cpu", True)] = ([("gpt2-tiny", 1, 8)], ((1,), 4, 2))
    return module

importlib.import_module = shrunk
sys.exit(cli.main(["bench", "--only", "models", "--device", "cpu", "--out", {str(tmp_path)!r}]))
"""
    proc = python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "0 failed" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "results.csv").is_file()
