"""What one :func:`fastlm.patch` call did: :class:`PatchReport`, its :class:`Swap` and
:class:`Skip` entries. Its own module, so that :mod:`fastlm.nn.patch` and
:mod:`fastlm.nn.patch_hf` (which fill one) both import it and not each other."""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Swap:
    """``path`` (a module path in the model, ``""`` for the model itself, or a feature such
    as ``"loss_function"``) was ``before`` and is now ``after``."""

    path: str
    before: str
    after: str


@dataclasses.dataclass(frozen=True)
class Skip:
    """``path`` (a ``what``) was left as it was, because of ``reason``."""

    path: str
    what: str
    reason: str


@dataclasses.dataclass
class PatchReport:
    """What one :func:`patch` call did to a model.

    Attributes:
        model: the patched model's class name.
        swaps: every swap, one per module (shared modules once).
        skipped: what fastlm has a drop-in for but left alone, with the reason.
        attn_implementation: the transformers attention implementation the model uses after
            patching (``"fastlm"`` once switched); ``None`` for a plain torch model.
    """

    model: str
    swaps: list[Swap] = dataclasses.field(default_factory=list)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    attn_implementation: str | None = None

    def __str__(self) -> str:
        lines = [f"fastlm.patch({self.model}):"]
        if self.attn_implementation is not None:
            lines.append(f"  attention implementation: {self.attn_implementation!r}")
        for path, before, after in _grouped((s.path, s.before, s.after) for s in self.swaps):
            lines.append(f"  {path}: {before} -> {after}")
        if not self.swaps:
            lines.append("  nothing swapped")
        for path, what, reason in _grouped((s.path, s.what, s.reason) for s in self.skipped):
            lines.append(f"  skipped {path} ({what}): {reason}")
        return "\n".join(lines)


_LAYER_INDEX = re.compile(r"(?<![^.])\d+(?![^.])")  # a whole path component of digits


def _grouped(entries) -> list[tuple[str, str, str]]:
    """Entries whose paths differ only in layer indices, folded into one line (``*`` for the
    indices, and the count): a 48-layer model reports one line per kind of swap, not 48."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for path, *rest in entries:
        groups.setdefault((_LAYER_INDEX.sub("*", path), *rest), []).append(path)
    lines = []
    for (folded, *rest), paths in groups.items():
        path = paths[0] if len(paths) == 1 else f"{folded} (x{len(paths)})"
        lines.append((path or "<model>", *rest))
    return lines
