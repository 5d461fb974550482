"""fastlm.ops.masks: the one visibility rule and mask convention, checked against masks
written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.ops import masks


def _bool(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in rows])


@pytest.mark.parametrize(
    "seqlen_q, seqlen_k, causal, window, expected",
    [
        (3, 3, False, (None, None), ["111", "111", "111"]),
        (3, 3, True, (None, None), ["100", "110", "111"]),
        # Sq < Sk: bottom-right aligned, the last query sees every key.
        (2, 4, True, (None, None), ["1110", "1111"]),
        # Sq > Sk: the first Sq - Sk queries see nothing.
        (4, 2, True, (None, None), ["00", "00", "10", "11"]),
        (4, 5, False, (1, 0), ["11000", "01100", "00110", "00011"]),
        (3, 3, False, (0, 1), ["110", "011", "001"]),
        # causal caps a wider right bound at the diagonal, keeps a narrower one.
        (3, 3, True, (None, 2), ["100", "110", "111"]),
        (3, 3, True, (None, -1), ["000", "100", "110"]),
        # SDPA's top-left causal is a right bound of Sq - Sk.
        (2, 4, False, (None, 2 - 4), ["1000", "1100"]),
    ],
)
def test_visible(seqlen_q, seqlen_k, causal, window, expected):
    seen = masks.visible(seqlen_q, seqlen_k, causal, window)
    assert seen.dtype == torch.bool
    assert torch.equal(seen, _bool(expected))


def test_diagonal_offset_is_distance_left_of_the_diagonal():
    expected = torch.tensor([[2, 1, 0, -1], [3, 2, 1, 0]])
    assert torch.equal(masks.diagonal_offset(2, 4), expected)


@pytest.mark.parametrize(
    "window, bounds",
    [((-1, -1), (None, None)), ((3, -1), (3, None)), ([0, 2], (0, 2)), ((-5, 0), (None, 0))],
)
def test_window_bounds_converts_flash_attn_convention(window, bounds):
    assert masks.window_bounds(window) == bounds


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), (1.0, 2), (True, 1), "ab", None, (1, None)])
def test_window_bounds_refuses_bad_windows(window):
    with pytest.raises(ValueError, match="window"):
        masks.window_bounds(window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_additive_mask(dtype):
    mask = _bool(["10", "01"])
    out = masks.additive_mask(mask, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]], dtype=dtype))


def test_additive_mask_keeps_the_bias_where_visible_and_broadcasts():
    mask = _bool(["10", "11"])[None, None]  # (1, 1, 2, 2)
    bias = torch.arange(8.0).reshape(2, 1, 2, 2)
    out = masks.additive_mask(mask, torch.float32, bias)
    expected = bias.masked_fill(~mask, -math.inf)
    assert out.shape == (2, 1, 2, 2)
    assert torch.equal(out, expected)
