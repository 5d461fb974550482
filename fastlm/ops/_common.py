"""What the op modules share around their backend choice and custom ops (the argument
checks they share are in :mod:`fastlm.ops.contract`)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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


# Looked up once: each attribute walk through torch._C costs on every call.
_is_compiling = torch.compiler.is_compiling
# Dynamo answers True while it traces; an eager call costs a tenth of is_compiling's.
is_dynamo_compiling = torch.compiler.is_dynamo_compiling
any_autocast = torch._C._is_any_autocast_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_any_requires_grad = torch._C._any_requires_grad
_grad_enabled = torch.is_grad_enabled
_Parameter = torch.nn.Parameter


def _dispatcher_needed(args: tuple) -> bool:
    """Whether PyTorch ops on ``args`` may need the dispatcher's extras: while compiling,
    under a dispatch mode or functorch transform, or for a tensor subclass (DTensor, a fake
    or functional tensor)."""
    if _is_compiling() or _dispatch_modes() or _functorch_active():
        return True
    for a in args:
        kind = type(a)
        if kind is not Tensor and kind is not _Parameter and isinstance(a, Tensor):
            return True
    return False


class EagerOp:
    """A ``torch.library`` custom op, and a cheaper way to run it in plain eager mode.

    Through the dispatcher a Python custom op costs tens of microseconds per call (about 12
    µs on a 2-core EPYC; 30 with autograd), as much as a small kernel. Graphs need it:
    ``torch.compile`` sees one opaque node traced through the fake impl, and tensor
    subclasses, dispatch modes and functorch transforms see a real op. Plain eager calls do
    not, so they run the same function directly, or, when autograd must record it, through
    an ``autograd.Function`` made of the same ``setup_context`` and ``backward`` that are
    registered with the custom op: one implementation, one backward, two entrances.
    """

    def __init__(
        self,
        op: torch._library.custom_ops.CustomOpDef,
        impl: Callable,
        setup_context: Callable | None = None,
        backward: Callable | None = None,
    ) -> None:
        self.op = op
        self._impl = impl
        # Positions of the op's Tensor and Tensor? arguments (from its schema), and of its
        # Tensor[] ones: what a call checks for subclasses.
        types = [str(a.type) for a in op._opoverload._schema.arguments]
        self._tensors = tuple(i for i, t in enumerate(types) if t in ("Tensor", "Optional[Tensor]"))
        self._tensor_lists = tuple(
            i
            for i, t in enumerate(types)
            if "Tensor" in t and t not in ("Tensor", "Optional[Tensor]")
        )
        self._function = None
        if backward is not None:
            torch.library.register_autograd(op, backward, setup_context=setup_context)
            self._function = type(
                f"{op._name.replace('::', '_')}_eager",
                (torch.autograd.Function,),
                {
                    "forward": staticmethod(impl),
                    "setup_context": staticmethod(setup_context),
                    # As through the custom op, whose backward has no autograd of its own:
                    # a second derivative raises instead of silently coming out zero.
                    "backward": staticmethod(once_differentiable(backward)),
                },
            )

    def _dispatcher_needed(self, args: tuple) -> bool:
        """Whether this call must go through the dispatcher: while compiling, under a
        dispatch mode or functorch transform, or with a tensor subclass (DTensor, a fake or
        functional tensor) among the arguments, which may need what it adds there."""
        if _is_compiling() or _dispatch_modes() or _functorch_active():
            return True
        for i in self._tensors:
            kind = type(args[i])
            if kind is not Tensor and kind is not _Parameter and args[i] is not None:
                return True
        for i in self._tensor_lists:
            for t in args[i] or ():
                if type(t) is not Tensor and type(t) is not _Parameter and t is not None:
                    return True
        return False

    def __call__(self, *args):
        if self._dispatcher_needed(args):
            return self.op(*args)
        if self._function is not None and _any_requires_grad(*args) and _grad_enabled():
            return self._function.apply(*args)
        return self._impl(*args)


# Signatures that passed an op's metadata checks. A call builds its signature from what the
# checks read (each tensor's type, the shapes they compare, dtype, device; ``is_cpu`` stands
# for the CPU, the cheap read; the flags), so a known signature passes the same checks again
# and only the per-call value checks run: on a small tensor the metadata checks cost as much
# as the op. Only passes are kept, never a failure (a failing signature raises, with the
# same message, every time); each memo is emptied when full, so its memory stays bounded
# whatever shapes come. While Dynamo traces nothing is looked up or kept (the graph would be
# guarded on the memo's contents, and its guards fix the metadata anyway).
SIGNATURES_KEPT = 256
_SIGNATURE_MEMOS: list[dict] = []


def signature_memo() -> dict[tuple, object]:
    """A new, empty memo of passing signatures for one op's contract (known to
    :func:`forget_signatures`)."""
    memo: dict[tuple, object] = {}
    _SIGNATURE_MEMOS.append(memo)
    return memo


def forget_signatures() -> None:
    """Empty every op's memo: each op's next call of any signature runs its metadata checks
    in full (what the first call in a process does)."""
    for memo in _SIGNATURE_MEMOS:
        memo.clear()


def remember(passed: dict[tuple, object], key: tuple, value: object = True) -> None:
    """Keep ``key`` in the memo ``passed`` with ``value`` (what the op derives from the
    signature alone, when it has something to keep; the memo is emptied first when it holds
    :data:`SIGNATURES_KEPT`)."""
    if len(passed) >= SIGNATURES_KEPT:
        passed.clear()
    passed[key] = value


# The (min, max) of integer tensors read recently: every layer of a model passes the same
# position ids (rotary) and cache lengths (decode attention), and reading them back costs a
# device sync (on a CPU, the read) per call. Keyed on the tensor's id, with a weak reference
# (a new tensor that reuses a freed one's id is not mistaken for it) and the version counter
# (an in-place change, such as a decode loop's ``lengths += 1``, is seen).
_ranges: dict[int, tuple] = {}
RANGES_KEPT = 8
_INT_DTYPES = (torch.int32, torch.int64)


def value_range(t: Tensor) -> tuple[int, int]:
    """``(t.min(), t.max())`` of a non-empty tensor as Python numbers; for an int32/int64
    tensor remembered until it changes in place (see :func:`remembered_range`)."""
    if type(t) is not Tensor or t.dtype not in _INT_DTYPES or t.is_inference() or _is_compiling():
        return t.min().item(), t.max().item()
    return remembered_range(t)


def remembered_range(t: Tensor) -> tuple[int, int]:
    """:func:`value_range` of a plain non-empty int32/int64 tensor, outside a traced call
    (the caller has checked that): read once, then answered from the memo until ``t``
    changes in place. An inference tensor (no version counter) is read every call."""
    hit = _ranges.get(id(t))
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        version = None
    if hit is not None and hit[1] == version and hit[0]() is t:
        return hit[2], hit[3]
    if t.is_cpu and t.dim() == 1:
        values = t.tolist()  # cheaper than a reduction and two .item() calls
        lo, hi = min(values), max(values)
    else:
        lo, hi = torch.aminmax(t)
        lo, hi = lo.item(), hi.item()
    if version is not None:
        if len(_ranges) >= RANGES_KEPT:
            _ranges.clear()
        _ranges[id(t)] = (weakref.ref(t), version, lo, hi)
    return lo, hi
