"""fastlm: fused Triton and CUDA C++ transformer kernels under drop-in PyTorch modules.

``import fastlm`` loads nothing else: each subpackage (``fastlm.ops``, ``fastlm.nn``,
``fastlm.models``, ``fastlm.train``, ...) is imported on first use (PEP 562), so the
``fastlm`` command answers ``--help`` without waiting for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SUBPACKAGES = (
    "backend",
    "data",
    "errors",
    "eval",
    "models",
    "nn",
    "ops",
    "parallel",
    "peft",
    "quant",
    "testing",
    "train",
)


def __getattr__(name: str) -> Any:
    if name in SUBPACKAGES:
        return importlib.import_module(f"fastlm.{name}")  # also binds it on this module
    if name == "use_backend":
        from fastlm.backend import use_backend

        return use_backend
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("fastlm")
        except PackageNotFoundError:  # a source tree that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found
    raise AttributeError(f"module 'fastlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def patch(
    model: torch.nn.Module, verbose: bool = False, lora: dict | None = None
) -> torch.nn.Module:
    """:func:`fastlm.nn.patch` (swap in fastlm's drop-in layers), then, with ``lora``, LoRA
    on the layers it names: ``lora`` holds keyword arguments of
    :func:`fastlm.peft.apply_lora` (``r``, ``alpha``, ``target_modules``, ...), and the
    wrapped layers run fastlm's fused LoRA kernels. Both appear in the patch report."""
    from fastlm import nn

    nn.patch(model, verbose=verbose and lora is None)
    if lora is None:
        return model
    from fastlm.nn.patch_report import Swap
    from fastlm.peft import apply_lora

    before = {name for name, m in model.named_modules() if isinstance(m, nn.LoRALinear)}
    apply_lora(model, **lora)
    report = nn.patch_report(model)
    report.swaps += [
        Swap(name, "Linear", "LoRALinear")
        for name, m in model.named_modules()
        if isinstance(m, nn.LoRALinear) and name not in before
    ]
    if verbose:
        print(report)
    return model


__all__ = [*SUBPACKAGES, "patch", "use_backend", "__version__"]
