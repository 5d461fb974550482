"""The numerical policy (DESIGN.md) as test helpers, shared by every op's tests.

A result passes when its max error against a float64 reference is at most twice the error
of PyTorch's own implementation at the same dtype, plus a floor of one unit in the last
place of the result's dtype at the reference's scale (two correct roundings of the same
value may differ by that much). For a sum over many terms (dweight, dbias), the scale is
the sum of the terms' magnitudes (:func:`summand_scale`): a correctly accumulated fp32 sum
carries rounding error of that order whatever order it adds in, and PyTorch's CPU kernels
(cascade summation) happen to be more exact than GPU-style tree reductions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor


def max_error(actual: Tensor, reference: Tensor) -> float:
    diff = (actual.double() - reference.double()).abs()
    return 0.0 if diff.numel() == 0 else diff.max().item()


def summand_scale(terms: Tensor, dims: int | tuple[int, ...]) -> float:
    """Largest sum of ``|terms|`` over ``dims``: the floor's scale for a reduction."""
    return terms.double().abs().sum(dim=dims).max().item()


def assert_policy(
    actual: Tensor,
    reference: Tensor,
    baseline: Tensor,
    name: str = "output",
    factor: float = 2.0,
    scale: float | None = None,
) -> None:
    """Assert ``actual`` is within the numerical policy of ``reference`` (float64 oracle),
    given ``baseline`` (PyTorch's own result at ``actual``'s dtype). ``scale`` sets the
    floor's magnitude (default: the reference's largest element).

    Fails with a report naming the worst element, its values and the allowed error. NaN or
    inf in ``actual`` where the reference is finite always fails (unwritten outputs are
    NaN-poisoned by :func:`poisoned_outputs`).
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(reference.shape)}")
    ref = reference.double()
    bad = ~torch.isfinite(actual.double()) & torch.isfinite(ref)
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {actual.numel()} elements are NaN/inf where the "
            f"reference is finite; first at {idx}: got {actual[idx].item()}, "
            f"expected {ref[idx].item()}"
        )
    if actual.numel() == 0:
        return
    scale = ref.abs().max().item() if scale is None else scale
    floor = torch.finfo(actual.dtype).eps * max(scale, 1e-30)
    err = (actual.double() - ref).abs()
    worst = err.max().item()
    base_err = max_error(baseline, ref)
    allowed = factor * base_err + floor
    if not worst <= allowed:
        idx = tuple(i.item() for i in (err == worst).nonzero()[0])
        over = int((err > allowed).sum())
        raise AssertionError(
            f"{name} ({actual.dtype}): max error {worst:.3e} > allowed {allowed:.3e} "
            f"(= {factor} x PyTorch's {base_err:.3e} + floor {floor:.3e}); {over} of "
            f"{actual.numel()} elements over. Worst at {idx}: got {actual[idx].item():.6g}, "
            f"reference {ref[idx].item():.6g}, PyTorch {baseline[idx].item():.6g}"
        )


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Make ``torch.empty``/``torch.empty_like`` return NaN-filled floating tensors, so an
    output element a kernel forgets to write shows up as NaN instead of stale memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: Tensor) -> Tensor:
        return t.fill_(math.nan) if t.is_floating_point() and t.numel() else t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
