"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP
``x + up(act(down(x)))`` after a block's attention output projection and/or its MLP, the
rest of the model frozen.

Adapters are inserted by wrapping the submodule whose output they adapt in
:class:`Adapted` (``block.attn.o`` becomes ``Adapted(o, Adapter)``, ``block.mlp`` becomes
``Adapted(mlp, Adapter)``), so no model's code changes. The adapter then sits before the
block's dropout and residual add, where Houlsby places it. The wrapped module moves to
``base_layer`` (as in :class:`~fastlm.nn.lora.LoRALinear`), so its state-dict keys gain
``.base_layer``: load base weights before applying adapters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastlm.nn.mlp import dense_act
from fastlm.ops.activation import check_activation

PLACES = ("attention", "mlp")
# Child names that make a module a transformer block: fastlm's Attention (``attn.o``) and
# Hugging Face's Llama-family attention (``self_attn.o_proj``); the MLP is ``mlp`` in both.
# T5's decoder cross-attention (``cross``) is not matched: as in Houlsby's encoder-only
# setting, only the self-attention and feed-forward sublayers get adapters.
ATTENTION_NAMES = ("attn", "self_attn")
OUTPUT_PROJECTION_NAMES = ("o", "o_proj")
MLP_NAMES = ("mlp",)


def _check(bottleneck: int, activation: str, init_scale: float) -> None:
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
        raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
    check_activation(activation)
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or init_scale < 0:
        raise ValueError(f"init_scale must be a non-negative number, got {init_scale!r}")


class Adapter(nn.Module):
    """``x + up(act(down(x)))`` on x (..., hidden_size), same shape out.

    ``down`` is ``Linear(hidden_size, bottleneck)`` with weights from N(0, init_scale);
    ``up`` is ``Linear(bottleneck, hidden_size)`` with zero weights and biases, so a fresh
    adapter returns its input exactly and training starts from the base model.
    ``activation``: ``identity, relu, gelu`` (erf), ``gelu_tanh``, ``silu`` (the down
    projection and activation run as one fused GEMM, :func:`fastlm.ops.linear_act`).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck: int,
        activation: str = "relu",
        init_scale: float = 1e-3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        _check(bottleneck, activation, init_scale)
        factory = dict(device=device, dtype=dtype)
        self.down = nn.Linear(hidden_size, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, hidden_size, **factory)
        self.activation = activation
        nn.init.normal_(self.down.weight, std=init_scale)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.up(dense_act(self.down, x, self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class Adapted(nn.Module):
    """``adapter(base_layer(*args, **kwargs))``: a module whose output (..., hidden) goes
    through an :class:`Adapter`; arguments pass through unchanged."""

    def __init__(self, base_layer: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, *args, **kwargs) -> Tensor:
        return self.adapter(self.base_layer(*args, **kwargs))


def _child(module: nn.Module, names: Sequence[str]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    """Every transformer block of ``model``: (its name, the block, its attention child's
    name, that child's output projection's name, its MLP child's name)."""
    found = []
    for name, block in model.named_modules():
        attn, mlp = _child(block, ATTENTION_NAMES), _child(block, MLP_NAMES)
        proj = None if attn is None else _child(getattr(block, attn), OUTPUT_PROJECTION_NAMES)
        if mlp is not None and proj is not None:
            found.append((name, block, attn, proj, mlp))
    return found


def _hidden_size(name: str, projection: nn.Module) -> int:
    # Plain, quantized and LoRA-wrapped linears all expose out_features; an adapted
    # projection (an earlier where=("attention",)) keeps it on its base layer.
    base = projection.base_layer if isinstance(projection, Adapted) else projection
    size = getattr(base, "out_features", None)
    if not isinstance(size, int):
        raise ValueError(
            f"{name} ({type(base).__name__}) has no out_features, so the adapter's width is unknown"
        )
    return size


def _factory(module: nn.Module) -> dict:
    """The device and dtype of ``module``'s first floating-point parameter (a quantized
    layer's packed integer weights say nothing about the compute dtype)."""
    for p in module.parameters():
        if p.is_floating_point():
            return dict(device=p.device, dtype=p.dtype)
    return {}


def apply_adapters(
    model: nn.Module,
    bottleneck: int,
    where: str | Sequence[str] = ("attention", "mlp"),
    activation: str = "relu",
    init_scale: float = 1e-3,
) -> nn.Module:
    """Insert an :class:`Adapter` (width ``bottleneck``) after every transformer block's
    attention output projection (``where`` has ``"attention"``) and/or after its MLP
    (``"mlp"``), freeze every other parameter, and return ``model``.

    A block is a module with an attention child (``attn`` / ``self_attn``) that has an
    output projection (``o`` / ``o_proj``), and an ``mlp`` child: fastlm's GPT, BERT and T5
    blocks (T5's self-attention; its decoder cross-attention is not adapted) and Hugging
    Face Llama-style decoder layers. Adapters take the device and dtype of the layer they
    follow. Raises ValueError when ``model`` has no such block or a place already has an
    adapter; the model is unchanged then.
    """
    places = (where,) if isinstance(where, str) else tuple(where)
    if not places or any(p not in PLACES for p in places) or len(set(places)) != len(places):
        raise ValueError(
            f"where must be a non-empty selection of {PLACES} without repeats, got {where!r}"
        )
    _check(bottleneck, activation, init_scale)
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no transformer block to adapt: a block needs an "
            f"attention child ({' / '.join(ATTENTION_NAMES)}) with an output projection "
            f"({' / '.join(OUTPUT_PROJECTION_NAMES)}) and an MLP child ({' / '.join(MLP_NAMES)})"
        )
    targets = []  # (parent, attribute, full name, hidden size) of each module to wrap
    for name, block, attn_name, proj, mlp in blocks:
        prefix = f"{name}." if name else ""
        attn = getattr(block, attn_name)
        hidden = _hidden_size(f"{prefix}{attn_name}.{proj}", getattr(attn, proj))
        if "attention" in places:
            targets.append((attn, proj, f"{prefix}{attn_name}.{proj}", hidden))
        if "mlp" in places:
            targets.append((block, mlp, f"{prefix}{mlp}", hidden))
    for parent, attr, full, _ in targets:
        if isinstance(getattr(parent, attr), Adapted):
            raise ValueError(f"{full} already has an adapter")
    model.requires_grad_(False)
    for parent, attr, _, hidden in targets:
        module = getattr(parent, attr)
        adapter = Adapter(hidden, bottleneck, activation, init_scale, **_factory(module))
        setattr(parent, attr, Adapted(module, adapter))
    return model


__all__ = ["Adapted", "Adapter", "apply_adapters"]
