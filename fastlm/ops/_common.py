"""What the op modules share around their backend choice and custom ops (the argument
checks they share are in :mod:`fastlm.ops.contract`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# The dtypes each family of Triton kernels takes: those built on tensor-core GEMMs (tl.dot)
# half precision only, the elementwise and row-reduction ones float32 too.
HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT32_AND_HALF_DTYPES = (torch.float32, *HALF_DTYPES)

# Why a backend cannot serve a call, or None when it can (see fastlm.backend.select).
SupportCheck = Callable[[], str | None]


def _served() -> None:
    return None


def supports(triton: SupportCheck, cuda: SupportCheck | None = None) -> dict[str, SupportCheck]:
    """The ``supports`` mapping of :func:`fastlm.backend.select` for an op with a Triton
    implementation (and a CUDA C++ one where ``cuda`` is given): the torch backend serves
    every call that passed the op's contract."""
    checks = {"triton": triton, "torch": _served}
    return checks if cuda is None else {"cuda": cuda, **checks}


def dtype_error(name: str, t: Tensor | None, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """Why a kernel cannot take argument ``name`` of this dtype, or None (also for None)."""
    if t is not None and t.dtype not in dtypes:
        return f"{name} dtype {t.dtype} is not one of {dtypes}"
    return None


def last_dim_contiguous(t: Tensor) -> Tensor:
    """``t``, copied only when its last dim is strided (the kernels take any other strides)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def as_rows(t: Tensor, features: int | None = None) -> Tensor:
    """``t`` as a (rows, features) matrix with a unit stride along each row. ``features``
    defaults to the last dim; a norm passes the size of all its normalized dims."""
    # With an empty last dim, -1 could not infer the number of rows.
    shape = (math.prod(t.shape[:-1]), t.shape[-1]) if features is None else (-1, features)
    return last_dim_contiguous(t.reshape(shape))


def absent(like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A 0-element tensor standing for an output a custom op did not compute: a custom op's
    outputs cannot be None."""
    return like.new_empty(0, dtype=like.dtype if dtype is None else dtype)
