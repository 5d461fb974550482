"""Packages and the optional CUDA extension; metadata lives in pyproject.toml.

Install with ``pip install --no-build-isolation [-e] .`` so the build uses the torch already
installed. ``FASTLM_BUILD_CUDA`` (``1`` / ``0`` / ``auto``) and ``FASTLM_CUDA_ARCHS`` steer
the extension; see fastlm/build_config.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    # By path: importing the fastlm package would need its dependencies at build time.
    spec = importlib.util.spec_from_file_location(
        "fastlm_build_config", ROOT / "fastlm" / "build_config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolkit_major(nvcc: str) -> str | None:
    try:
        out = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return match.group(1) if match else None


def _why_not_cuda(config) -> str | None:
    """Why the extension cannot be built here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not importable (install it first, then build with --no-build-isolation)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if config.cuda_home() is None:
        return "no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)"
    nvcc = config.nvcc_path()
    if nvcc is None:
        return f"no CUDA toolkit found (no executable bin/nvcc under {config.cuda_home()})"
    major = _toolkit_major(nvcc)
    if major is None:
        return f"cannot read the CUDA version of {nvcc}"
    if major != torch.version.cuda.split(".")[0]:
        return (
            f"the CUDA {major} toolkit at {config.cuda_home()} does not match the CUDA "
            f"{torch.version.cuda} torch was built with"
        )
    return None


def _why_not_auto() -> str | None:
    """Why ``FASTLM_BUILD_CUDA=auto`` skips a build it could do: no GPU here to run it on
    (minutes of nvcc for nothing), and no architecture asked for by name."""
    import torch

    if torch.cuda.is_available() or os.environ.get("FASTLM_CUDA_ARCHS", "").strip():
        return None
    return (
        "no CUDA device here, so FASTLM_BUILD_CUDA=auto skips fastlm._C (set "
        "FASTLM_BUILD_CUDA=1 or FASTLM_CUDA_ARCHS to build it for another machine)"
    )


def _cuda_extension(config):
    """(ext_modules, cmdclass) for fastlm._C, or empty ones when it is not built."""
    mode = config.build_mode()
    reason = "FASTLM_BUILD_CUDA=0" if mode == "0" else _why_not_cuda(config)
    if reason is None and mode == "auto":
        reason = _why_not_auto()
    if reason is not None:
        if mode == "1":
            raise RuntimeError(f"FASTLM_BUILD_CUDA=1, but fastlm._C cannot be built: {reason}")
        print(f"fastlm: {reason}; installing pure Python (triton and torch backends)")
        return [], {}

    # torch.utils.cpp_extension reads CUDA_HOME once, at import, and its own guess from the
    # nvcc on PATH can be a wrapper's directory (/usr/local) rather than the toolkit.
    os.environ["CUDA_HOME"] = config.cuda_home()
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(len(os.sched_getaffinity(0)))
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # Searched after the toolkit's own headers (-idirafter), so pip's copies of the CUDA
    # runtime headers never shadow the toolkit's; they supply what it lacks (cuBLAS, ...).
    extra_includes = [f for d in config.nvidia_include_dirs() for f in ("-idirafter", d)]
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu"))
    extension = CUDAExtension(
        name="fastlm._C",
        sources=[*sources, "csrc/bindings.cpp"],
        extra_compile_args={
            "cxx": ["-O3", *extra_includes],
            "nvcc": config.nvcc_flags(config.cuda_archs()),
        },
    )
    return [extension], {"build_ext": BuildExtension}


config = _load_build_config()
ext_modules, cmdclass = _cuda_extension(config)

# kernels/ sits at the top of the repo but installs as fastlm.kernels.
packages = ["fastlm", *find_packages(include=["fastlm.*"])]
kernel_packages = ["fastlm.kernels", *(f"fastlm.kernels.{p}" for p in find_packages("kernels"))]

setup(
    packages=packages + kernel_packages,
    package_dir={"fastlm.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
