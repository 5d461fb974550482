"""LoRA / QLoRA on a model's linear layers: :func:`apply_lora` wraps them in
:class:`~fastlm.nn.LoRALinear` (fused kernels underneath), :func:`attach_lora` gives them a
given adapter's tensors (a :class:`LoRAState`, what :func:`adapter_state` reads back), and
:func:`merge_lora` folds the adapter into the base layer again."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from torch import Tensor, nn

from fastlm.nn.lora import LoRALinear
from fastlm.nn.quant import QuantLinear


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the linear layers ``target_modules`` selects, as PEFT selects them: a str is
    a regex that must match the whole name; a list matches names equal to an entry or
    ending in ``"." + entry``."""
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, QuantLinear))
        and not any(n.startswith(f"{w}.") for w in lora_layer_names(model))
    ]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith(f".{t}") for t in target_modules)]


def lora_layer_names(model: nn.Module) -> list[str]:
    """Names of the model's layers wrapped in :class:`LoRALinear`."""
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    dropout: float = 0.0,
    use_rslora: bool = False,
    adapter_name: str = "default",
) -> nn.Module:
    """Wrap the linear layers ``target_modules`` selects (see :func:`_targets`) in
    :class:`LoRALinear` (an adapter called ``adapter_name``; layers already wrapped get it
    added), freeze every other parameter, and return ``model``."""
    if isinstance(target_modules, str):
        re.compile(target_modules)
    names = _targets(model, target_modules)
    existing = [
        n
        for n in lora_layer_names(model)
        if isinstance(target_modules, str)
        and re.fullmatch(target_modules, n)
        or not isinstance(target_modules, str)
        and any(n == t or n.endswith(f".{t}") for t in target_modules)
    ]
    if not names and not existing:
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]
        raise ValueError(
            f"target_modules {target_modules!r} matches no linear layer of "
            f"{type(model).__name__}; its linear layers: "
            f"{', '.join(linears[:12])}{' ...' if len(linears) > 12 else ''}"
        )
    model.requires_grad_(False)
    for name in names:
        parent, _, attr = name.rpartition(".")
        layer = model.get_submodule(name)
        setattr(
            model.get_submodule(parent),
            attr,
            LoRALinear(layer, r, alpha, dropout, use_rslora, adapter_name),
        )
    for name in existing:
        model.get_submodule(name).add_adapter(adapter_name, r, alpha, dropout, use_rslora)
    for layer in model.modules():
        if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].requires_grad_(True)
            layer.lora_B[adapter_name].requires_grad_(True)
    return model


@dataclasses.dataclass
class LoRAState:
    """A LoRA adapter as a PEFT adapter file holds it: per target layer (by name),
    ``(A (r, in), B (out, r))`` and alpha; the dropout and rsLoRA settings shared by all;
    PEFT's ``fan_in_fan_out`` flag (set for transformers' ``Conv1D`` layers, whose A and B
    are laid out as a linear layer's all the same)."""

    weights: dict[str, tuple[Tensor, Tensor]]
    alphas: dict[str, float]
    dropout: float = 0.0
    use_rslora: bool = False
    fan_in_fan_out: bool = False


def adapter_state(model: nn.Module, adapter_name: str = "default") -> LoRAState:
    """Adapter ``adapter_name`` of ``model`` (the tensors themselves, not copies)."""
    layers = {n: model.get_submodule(n) for n in lora_layer_names(model)}
    layers = {n: m for n, m in layers.items() if adapter_name in m.lora_A}
    if not layers:
        raise ValueError(f"model has no LoRA adapter {adapter_name!r}")
    dropouts = {m.lora_dropout[adapter_name] for m in layers.values()}
    dropouts = {d.p if isinstance(d, nn.Dropout) else 0.0 for d in dropouts}
    rslora = {m.use_rslora[adapter_name] for m in layers.values()}
    if len(dropouts) > 1 or len(rslora) > 1:
        raise ValueError(
            f"adapter {adapter_name!r} mixes dropouts or rsLoRA settings across "
            "layers: a PEFT adapter file has one of each"
        )
    weights = {}
    for n, m in layers.items():
        weights[n] = (m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight)
    alphas = {n: m.lora_alpha[adapter_name] for n, m in layers.items()}
    return LoRAState(weights, alphas, dropouts.pop(), rslora.pop())


def attach_lora(
    model: nn.Module, adapter: LoRAState, adapter_name: str = "default", source: str = "adapter"
) -> nn.Module:
    """Wrap each layer named in ``adapter`` in :class:`LoRALinear` with adapter
    ``adapter_name`` holding its ``(A, B)`` (rank ``A.shape[0]``) and alpha, freeze
    everything else (as :func:`apply_lora`) and return ``model``. Every name and shape is
    checked first (ValueError naming ``source``), so a refused adapter changes nothing."""
    for name, (a, b) in adapter.weights.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if not isinstance(layer, (nn.Linear, QuantLinear, LoRALinear)):
            raise ValueError(f"{source}: {type(model).__name__} has no linear layer {name}")
        r = a.shape[0]
        for part, t, need in (("A", a, (r, layer.in_features)), ("B", b, (layer.out_features, r))):
            if tuple(t.shape) != need:
                raise ValueError(
                    f"{source}: lora_{part} of {name} is {tuple(t.shape)}, the model needs {need}"
                )
    groups: dict[tuple[int, float], list[str]] = {}
    for name, (a, _) in adapter.weights.items():
        groups.setdefault((a.shape[0], adapter.alphas[name]), []).append(name)
    for (r, alpha), names in groups.items():
        apply_lora(model, r, alpha, names, adapter.dropout, adapter.use_rslora, adapter_name)
    for name, ab in adapter.weights.items():
        layer = model.get_submodule(name)
        for part, t in zip("AB", ab, strict=True):
            getattr(layer, f"lora_{part}")[adapter_name].weight.data.copy_(t)
    return model


def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Merge each layer's active adapter into its base and put the base back in place of
    the :class:`LoRALinear` (PEFT's ``merge_and_unload``)."""
    for name in lora_layer_names(model):
        layer = model.get_submodule(name)
        if layer.active_adapter is not None:
            layer.merge(requantize=requantize)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.base_layer)
    return model
