"""Which keys each query sees, and masks as additive score biases: one convention for every
op, module and model.

A boolean mask is True where a query may attend a key, as the boolean ``attn_mask`` of
``torch.nn.functional.scaled_dot_product_attention``. A window is ``(left, right)`` with
``None`` for an unbounded side; the public functions take flash-attn's ``-1`` for that and
convert once, with :func:`window_bounds`. Query i of Sq and key j of Sk are aligned
bottom-right, as FlashAttention >= 2.1 aligns them: i's diagonal is key ``i + Sk - Sq``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# (left, right) keys a query sees on either side of its diagonal; None: unbounded.
Window = tuple[int | None, int | None]

UNBOUNDED: Window = (None, None)


# The default ``window`` of the public functions: recognized by identity, for free.
NO_WINDOW = (-1, -1)


def window_bounds(window: object) -> Window:
    """flash-attn's ``window`` (two ints, a negative one leaving its side unbounded) as a
    :data:`Window`; anything else is refused, naming ``window``."""
    if window is NO_WINDOW:  # the default: nothing to check (it is on every call's path)
        return UNBOUNDED
    if type(window) is tuple and len(window) == 2:  # exact types: no isinstance walk
        left, right = window
        if type(left) is int and type(right) is int:
            return (None if left < 0 else left, None if right < 0 else right)
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)
    ):
        raise ValueError(f"window must be (left, right) ints, -1 for unbounded, got {window!r}")
    left, right = window
    return (None if left < 0 else left, None if right < 0 else right)


def causal_window(window: Window, causal: bool) -> Window:
    """``window`` with causal masking folded in: no key right of the diagonal."""
    left, right = window
    if causal:
        right = 0 if right is None else min(right, 0)
    return (left, right)


def diagonal_offset(seqlen_q: int, seqlen_k: int, device: torch.device | None = None) -> Tensor:
    """(Sq, Sk) int64: ``i + Sk - Sq - j``, how far key j lies left of query i's diagonal
    (negative right of it); ALiBi's distance is its absolute value."""
    i = torch.arange(seqlen_q, device=device)[:, None]
    j = torch.arange(seqlen_k, device=device)[None, :]
    return i + seqlen_k - seqlen_q - j


def visible(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window: Window = UNBOUNDED,
    device: torch.device | None = None,
) -> Tensor:
    """(Sq, Sk) bool, True where query i sees key j: ``-right <= i + Sk - Sq - j <= left``
    for the window ``(left, right)``, ``causal`` setting right to at most 0."""
    left, right = causal_window(window, causal)
    offset = diagonal_offset(seqlen_q, seqlen_k, device)
    seen = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left is not None:
        seen &= offset <= left
    if right is not None:
        seen &= offset >= -right
    return seen


def additive_mask(mask: Tensor, dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """The boolean ``mask`` (True: may attend) as scores to add: ``bias`` (0 without one)
    where True, ``-inf`` where False, broadcast to the shape of both."""
    fill = torch.tensor(float("-inf"), dtype=dtype, device=mask.device)
    keep = torch.zeros((), dtype=dtype, device=mask.device) if bias is None else bias
    return torch.where(mask, keep, fill)
