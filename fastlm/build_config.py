"""Where the CUDA toolkit is and how ``csrc/*.cu`` is compiled.

One source of truth for ``setup.py`` (which loads this file by path, before torch is
imported) and for the static GPU check (which imports it as ``fastlm.build_config``).
Standard library only: it must run before anything else is importable.

Environment:

* ``FASTLM_BUILD_CUDA``: ``1`` (build the extension or fail), ``0`` (pure Python),
  ``auto`` (default: build when torch has CUDA, a toolkit is found, and a GPU is visible
  or ``FASTLM_CUDA_ARCHS`` names the targets).
* ``FASTLM_CUDA_ARCHS``: GPU architectures to compile for, e.g. ``"80;90a"``,
  ``"sm_80,sm_90a"`` or ``"8.0 9.0a"``. Default ``80`` and ``90a``.
* ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit root, when ``nvcc`` on ``PATH`` is not it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

DEFAULT_ARCHS = ("80", "90a")
BUILD_MODES = ("0", "1", "auto")

# "80", "90a", "100f", "sm_90a", "compute_80", "8.0", "9.0a", "10.0f".
_ARCH_RE = re.compile(r"^(?:sm_|compute_)?(?:(\d{1,2})\.(\d)|(\d{2,3}))([af]?)$")


def _is_toolkit(root: str) -> bool:
    # A bin/nvcc alone is not enough: /usr/local/bin/nvcc is often a wrapper script, and its
    # parent /usr/local has no CUDA headers.
    if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return False
    header = "cuda_runtime_api.h"
    if os.path.isfile(os.path.join(root, "include", header)):
        return True
    targets = os.path.join(root, "targets")
    return os.path.isdir(targets) and any(
        os.path.isfile(os.path.join(targets, t, "include", header)) for t in os.listdir(targets)
    )


def _root_from_dryrun(nvcc: str) -> str | None:
    # nvcc reports its own install directory in a dry run, whatever wrapper script or shim
    # launched it; this costs one short subprocess and compiles nothing.
    try:
        proc = subprocess.run(
            [nvcc, "-dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", proc.stdout + proc.stderr, re.MULTILINE)
    if match is None:
        return None
    root = os.path.dirname(os.path.realpath(match.group(1).strip()))
    return root if _is_toolkit(root) else None


def cuda_home() -> str | None:
    """The CUDA toolkit root, or ``None`` when no toolkit is found.

    ``$CUDA_HOME`` or ``$CUDA_PATH`` when set; else the toolkit of the ``nvcc`` on ``PATH``
    (followed through symlinks and wrapper scripts); else ``/usr/local/cuda``.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
        root = _root_from_dryrun(nvcc)
        if root is not None:
            return root
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def nvcc_path() -> str | None:
    """The toolkit's ``nvcc`` executable, or ``None`` when there is none."""
    home = cuda_home()
    if home is None:
        return None
    nvcc = os.path.join(home, "bin", "nvcc")
    return nvcc if os.path.isfile(nvcc) and os.access(nvcc, os.X_OK) else None


def _arch_key(arch: str) -> tuple[int, str]:
    return int(arch.rstrip("af")), arch[-1] if arch[-1] in "af" else ""


def cuda_archs() -> list[str]:
    """Architectures from ``FASTLM_CUDA_ARCHS`` as ``["80", "90a"]``, sorted, no repeats."""
    raw = os.environ.get("FASTLM_CUDA_ARCHS", "").strip()
    if not raw:
        return list(DEFAULT_ARCHS)
    archs = []
    for token in re.split(r"[;,\s]+", raw):
        if not token:
            continue
        match = _ARCH_RE.match(token.lower())
        if match is None:
            raise ValueError(
                f"FASTLM_CUDA_ARCHS: cannot read {token!r} in {raw!r}; expected architectures "
                "like '80;90a', 'sm_80,sm_90a' or '8.0 9.0a'"
            )
        major, minor, whole, suffix = match.groups()
        arch = (whole if whole is not None else major + minor) + suffix
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"FASTLM_CUDA_ARCHS: no architecture in {raw!r}")
    return sorted(archs, key=_arch_key)


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc ``-gencode`` flags: a cubin per arch, plus PTX of the highest one.

    The PTX lets GPUs newer than every listed arch JIT-compile the kernels at load time.
    PTX built for an arch-specific target (``90a``) or family target (``100f``) only loads
    on that arch or family, so for those the portable base (``compute_90``) is embedded:
    kernels fall back to the code paths that do not need the arch-specific features.
    """
    if not archs:
        raise ValueError("gencode_flags: archs is empty")
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ptx = max(archs, key=_arch_key).rstrip("af")
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def nvcc_flags(archs: list[str]) -> list[str]:
    """Every nvcc flag for ``csrc/*.cu`` (the static check adds ``-Xptxas=-v``)."""
    return [
        "-O3",
        # No --use_fast_math: it flushes denormals and approximates division and sqrt, and
        # the kernels must match PyTorch to within 2x its own error.
        "-std=c++17",
        "-lineinfo",
        # The two arch targets compile in parallel inside one nvcc call.
        "--threads=2",
        *gencode_flags(archs),
    ]


def nvidia_include_dirs() -> list[str]:
    """Header dirs shipped by pip's ``nvidia-*`` wheels (cuBLAS, cuSPARSE, cuDNN...).

    Torch's C++ headers include cuBLAS and cuSPARSE headers that a minimal toolkit may lack.
    CUDA 13 wheels put them in ``nvidia/cu13/include``; CUDA 12 wheels split them into
    ``nvidia/<lib>/include``. Found by walking ``sys.path``, so torch is not imported.
    """
    dirs: list[str] = []
    for entry in sys.path:
        base = os.path.join(entry or os.getcwd(), "nvidia")
        if not os.path.isdir(base):
            continue
        for name in sorted(os.listdir(base)):
            inc = os.path.realpath(os.path.join(base, name, "include"))
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


def build_mode() -> str:
    """``FASTLM_BUILD_CUDA``: ``"0"``, ``"1"`` or ``"auto"`` (the default)."""
    mode = os.environ.get("FASTLM_BUILD_CUDA", "").strip().lower() or "auto"
    if mode not in BUILD_MODES:
        raise ValueError(f"FASTLM_BUILD_CUDA must be one of {', '.join(BUILD_MODES)}; got {mode!r}")
    return mode
