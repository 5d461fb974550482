"""fastlm: fused Triton and CUDA C++ transformer kernels under drop-in PyTorch modules."""

from importlib.metadata import PackageNotFoundError, version

from fastlm import backend, nn, ops
from fastlm.backend import use_backend
from fastlm.nn import patch

try:
    __version__ = version("fastlm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["backend", "nn", "ops", "patch", "use_backend", "__version__"]
