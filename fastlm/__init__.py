"""fastlm: fused Triton and CUDA C++ transformer kernels under drop-in PyTorch modules."""

from importlib.metadata import PackageNotFoundError, version

import torch

from fastlm import backend, nn, ops
from fastlm.backend import use_backend

try:
    __version__ = version("fastlm")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def patch(
    model: torch.nn.Module, verbose: bool = False, lora: dict | None = None
) -> torch.nn.Module:
    """:func:`fastlm.nn.patch` (swap in fastlm's drop-in layers), then, with ``lora``, LoRA
    on the layers it names: ``lora`` holds keyword arguments of
    :func:`fastlm.peft.apply_lora` (``r``, ``alpha``, ``target_modules``, ...), and the
    wrapped layers run fastlm's fused LoRA kernels. Both appear in the patch report."""
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


__all__ = ["backend", "nn", "ops", "patch", "use_backend", "__version__"]
