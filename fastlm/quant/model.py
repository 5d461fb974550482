"""``quantize_(model, ...)``: replace a model's ``nn.Linear`` layers by ``QuantLinear``."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence

from torch import nn

from fastlm.nn.quant import QuantLinear
from fastlm.ops.quant_formats import check_format

log = logging.getLogger("fastlm.quant")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern (a glob) matches a module's qualified name or any dotted tail of it:
    ``"lm_head"`` and ``"blocks.0.*"`` also match ``"model.lm_head"`` and
    ``"bert.blocks.0.attn.qkv"``."""
    parts = name.split(".")
    tails = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(tail, p) for tail in tails for p in patterns)


def quantize_(
    model: nn.Module,
    bits: int = 4,
    group_size: int | None = None,
    scheme: str = "int",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = ("lm_head",),
    symmetric: bool = False,
    double_quant: bool = False,
    act_bits: int | None = None,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` whose name matches ``include``
    (None: all) and not ``exclude`` (globs over qualified names or their dotted tails:
    ``"lm_head"``, ``"blocks.0.*"``, ``"*.o"``) by a :class:`QuantLinear` of the format.

    A layer the format cannot hold (K not divisible by the group size, or odd for 4-bit) is
    left as it is, with the reason logged (logger ``fastlm.quant``). Returns the names of
    the quantized layers.
    """
    group = check_format(bits, group_size, scheme)
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include and exclude must be sequences of names, not a str")
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name:
            continue
        if (include is not None and not _matches(name, include)) or _matches(name, exclude):
            continue
        k = module.in_features
        if bits == 4 and (k % group or k % 2):
            log.warning(
                "fastlm.quant: %s left unquantized: in_features %d is not a multiple "
                "of group_size %d",
                name,
                k,
                group,
            )
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent,
            attr,
            QuantLinear.from_linear(
                module, bits, group_size, scheme, act_bits, symmetric, double_quant
            ),
        )
        done.append(name)
    return done
