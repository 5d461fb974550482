"""Rotary position embeddings as a module: cached cos/sin tables plus
:func:`fastlm.ops.apply_rotary`.

The tables are non-persistent buffers (not in ``state_dict``, as in Hugging Face models),
rebuilt longer when a call reaches past them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.ops.rotary import apply_rotary, value_range


class RotaryEmbedding(torch.nn.Module):
    """Rotary embeddings of the first ``dim`` features of each head (``dim`` <= head dim;
    the rest pass through), with frequencies ``base ** (-2i / dim)``.

    Args:
        dim: rotary dimension (even).
        max_position_embeddings: initial length of the cos/sin cache; longer calls extend it.
        base: frequency base (10000 for Llama 2 / GPT-NeoX, 500000 for Llama 3).
        interleaved: pairs ``(2i, 2i + 1)`` (GPT-J) instead of ``(i, i + dim/2)`` (Llama).
        device, dtype: of the cos/sin cache (float32 by default; the rotation is computed in
            float32 whatever the cache dtype).
    """

    cos_cached: Tensor
    sin_cached: Tensor

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        interleaved: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if not isinstance(max_position_embeddings, int) or max_position_embeddings < 1:
            raise ValueError(
                f"max_position_embeddings must be a positive int, got {max_position_embeddings!r}"
            )
        if not base > 0:
            raise ValueError(f"base must be positive, got {base!r}")
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dim = dim
        self.max_position_embeddings = max_position_embeddings
        self.base = float(base)
        self.interleaved = interleaved
        cos, sin = self._tables(max_position_embeddings, device, dtype)
        self.register_buffer("cos_cached", cos, persistent=False)
        self.register_buffer("sin_cached", sin, persistent=False)

    def _tables(self, length: int, device, dtype) -> tuple[Tensor, Tensor]:
        # Angles in float32 (as Hugging Face computes them), then rounded to the cache dtype.
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        inv_freq = 1.0 / (self.base**exponents)
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (length, dim / 2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def reset_cache(self) -> None:
        """Recompute the cos/sin tables in place of whatever they hold (after ``to_empty()``,
        e.g. for a model built on the meta device)."""
        length = max(self.cos_cached.shape[0], self.max_position_embeddings)
        self.cos_cached, self.sin_cached = self._tables(
            length, self.cos_cached.device, self.cos_cached.dtype
        )

    def _extend(self, length: int) -> None:
        if length <= self.cos_cached.shape[0]:
            return
        new_len = max(length, 2 * self.cos_cached.shape[0])
        cos, sin = self._tables(new_len, self.cos_cached.device, self.cos_cached.dtype)
        self.cos_cached, self.sin_cached = cos, sin

    def forward(
        self, q: Tensor, k: Tensor, position_ids: Tensor | None = None, offset: int | Tensor = 0
    ) -> tuple[Tensor, Tensor]:
        """Rotate ``q`` (B, S, Hq, D) and ``k`` (B, S, Hk, D); see
        :func:`fastlm.ops.apply_rotary` for ``position_ids`` and ``offset``."""
        # The buffers are read from _buffers directly: nn.Module's attribute lookup of a
        # buffer costs about as much as the rest of this method.
        buffers = self._buffers
        if isinstance(q, Tensor) and q.dim() == 4:
            seqlen = q.shape[1]
            if type(offset) is int and position_ids is None:  # the common case first
                needed = offset + seqlen
            elif position_ids is not None:
                needed = int(value_range(position_ids)[1]) + 1 if position_ids.numel() else 0
            elif isinstance(offset, Tensor):
                needed = int(value_range(offset)[1]) + seqlen if offset.numel() else 0
            else:
                needed = int(offset) + seqlen
            if needed > buffers["cos_cached"].shape[0]:
                self._extend(needed)
        return apply_rotary(
            q,
            k,
            buffers["cos_cached"],
            buffers["sin_cached"],
            self.interleaved,
            position_ids,
            offset,
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, "
            f"base={self.base}, interleaved={self.interleaved}"
        )
