"""``fastlm.patch(model)``: swap torch layers for fastlm drop-ins, in place, and report what
was swapped.

Hugging Face ``transformers`` models get more (their attention, norms, MLPs and loss; see
:mod:`fastlm.nn.patch_hf`); transformers is only touched when the model is one of its models,
so fastlm imports and patches plain torch models without it installed.
"""

from __future__ import annotations

import sys
import weakref

import torch

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.norm import LayerNorm, RMSNorm
from fastlm.nn.patch_report import PatchReport, Swap

# Exact torch classes only: a subclass may have its own forward, and fastlm's drop-ins are
# subclasses themselves.
_REPLACEMENTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.LayerNorm: LayerNorm,
    torch.nn.RMSNorm: RMSNorm,
    torch.nn.MultiheadAttention: MultiheadAttention,
}


def class_name(cls: type) -> str:
    """``fastlm.nn.LayerNorm``, ``torch.nn.LayerNorm``: the name users write for a class."""
    module = cls.__module__
    for public in ("fastlm.nn", "torch.nn"):
        if (
            module.startswith(public + ".")
            and getattr(sys.modules[public], cls.__name__, None) is cls
        ):
            return f"{public}.{cls.__name__}"
    return cls.__qualname__


# Keyed weakly, so a report never keeps a model alive.
_REPORTS: weakref.WeakKeyDictionary[torch.nn.Module, PatchReport] = weakref.WeakKeyDictionary()


def patch(model: torch.nn.Module, verbose: bool = False) -> torch.nn.Module:
    """Swap the layers of ``model`` that fastlm has exact drop-ins for, in place, and return
    ``model``.

    Every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` / ``torch.nn.MultiheadAttention``
    (``model`` itself included; exact classes, not subclasses) becomes fastlm's. Each drop-in
    subclasses the torch class and adds no state, so the swap re-classes the existing module:
    its Parameter objects (values, device, dtype, ``requires_grad``, and any optimizer holding
    them), hooks and training flag all stay as they were.

    A Hugging Face ``transformers`` model (a ``PreTrainedModel``) also gets fastlm's attention
    (registered as ``"fastlm"`` in transformers' attention registry and selected with
    ``set_attn_implementation``), and its norms, MLPs and loss swapped where the swap is exact:
    see :func:`fastlm.nn.patch_hf.patch_hf`. Those swaps keep the Parameter objects and
    ``state_dict`` keys too.

    Args:
        model: the ``torch.nn.Module`` to patch.
        verbose: print what was swapped, the attention implementation set, and what was left
            alone and why. :func:`patch_report` returns the same as a :class:`PatchReport`.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport(type(model).__name__)
    if _is_transformers_model(model):
        from fastlm.nn.patch_hf import patch_hf

        patch_hf(model, report)
    for path, module in model.named_modules():
        replacement = _REPLACEMENTS.get(type(module))
        if replacement is not None:
            report.swaps.append(Swap(path, class_name(type(module)), class_name(replacement)))
            module.__class__ = replacement
    _REPORTS[model] = report
    if verbose:
        print(report)
    return model


def patch_report(model: torch.nn.Module) -> PatchReport | None:
    """The :class:`PatchReport` of the last :func:`patch` of ``model`` (``None`` if it was
    never patched)."""
    return _REPORTS.get(model)


def _is_transformers_model(model: torch.nn.Module) -> bool:
    # A model of transformers means its modeling_utils is already imported: looking there
    # never imports transformers for a plain torch model.
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    return modeling_utils is not None and isinstance(model, modeling_utils.PreTrainedModel)
