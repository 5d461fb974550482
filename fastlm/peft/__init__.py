"""Parameter-efficient fine-tuning, one API for the field's methods:

- LoRA / QLoRA on any model's linear layers (:func:`apply_lora`, fused kernels underneath),
  saved and loaded in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
  ``adapter_model.safetensors``, PEFT's key names), so adapters move between fastlm and PEFT
  both ways; :func:`merge_lora`, :func:`lora_state_dict`;
- bottleneck adapters after attention and/or MLP outputs (:func:`apply_adapters`);
- prompt tuning (:class:`PromptTuning`);
- feature-based fine-tuning (:func:`freeze`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
from torch import Tensor, nn

from fastlm.nn.lora import LoRALinear
from fastlm.nn.quant import QuantLinear
from fastlm.peft.adapters import Adapted, Adapter, apply_adapters
from fastlm.peft.prompt import PromptTuning

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def _targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the linear layers ``target_modules`` selects, as PEFT selects them: a str is
    a regex that must match the whole name; a list matches names equal to an entry or
    ending in ``"." + entry``."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))
             and not any(n.startswith(f"{w}.") for w in _wrapped(model))]  # fmt: skip
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    return [n for n in names if any(n == t or n.endswith(f".{t}") for t in target_modules)]


def _wrapped(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16,
               target_modules: str | Sequence[str] = ("q_proj", "v_proj"), dropout: float = 0.0,
               use_rslora: bool = False, adapter_name: str = "default") -> nn.Module:  # fmt: skip
    """Wrap the linear layers ``target_modules`` selects (see :func:`_targets`) in
    :class:`LoRALinear` (an adapter called ``adapter_name``; layers already wrapped get it
    added), freeze every other parameter, and return ``model``."""
    if isinstance(target_modules, str):
        re.compile(target_modules)
    names = _targets(model, target_modules)
    existing = [n for n in _wrapped(model)
                if isinstance(target_modules, str) and re.fullmatch(target_modules, n)
                or not isinstance(target_modules, str)
                and any(n == t or n.endswith(f".{t}") for t in target_modules)]  # fmt: skip
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
        setattr(model.get_submodule(parent), attr,
                LoRALinear(layer, r, alpha, dropout, use_rslora, adapter_name))  # fmt: skip
    for name in existing:
        model.get_submodule(name).add_adapter(adapter_name, r, alpha, dropout, use_rslora)
    for layer in model.modules():
        if isinstance(layer, LoRALinear) and adapter_name in layer.lora_A:
            layer.lora_A[adapter_name].requires_grad_(True)
            layer.lora_B[adapter_name].requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors in PEFT's file keys
    (``base_model.model.<layer>.lora_A.weight``)."""
    out = {}
    for name in _wrapped(model):
        layer = model.get_submodule(name)
        if adapter_name in layer.lora_A:
            out[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
    if not out:
        raise ValueError(f"model has no LoRA adapter {adapter_name!r}")
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` as PEFT does (a directory with
    ``adapter_config.json`` and ``adapter_model.safetensors``)."""
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    layers = [n for n in _wrapped(model) if adapter_name in model.get_submodule(n).lora_A]
    first = model.get_submodule(layers[0])
    ranks = {model.get_submodule(n).lora_A[adapter_name].out_features for n in layers}
    if len(ranks) > 1:
        raise ValueError(f"adapter {adapter_name!r} has ranks {sorted(ranks)}: one rank per "
                         f"adapter file")  # fmt: skip
    dropout = first.lora_dropout[adapter_name]
    config = {
        "peft_type": "LORA",
        "r": ranks.pop(),
        "lora_alpha": first.lora_alpha[adapter_name],
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": layers,
        "use_rslora": first.use_rslora[adapter_name],
        "bias": "none",
        "fan_in_fan_out": False,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.torch.save_file(tensors, str(path / ADAPTER_WEIGHTS))


def load_adapter(model: nn.Module, path: str | os.PathLike,
                 adapter_name: str = "default") -> nn.Module:  # fmt: skip
    """Load a PEFT LoRA adapter directory (written by PEFT or :func:`save_adapter`) into
    ``model`` as adapter ``adapter_name``, wrapping the layers it targets."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{path} is not a PEFT adapter directory ({ADAPTER_CONFIG} and "
                         f"{ADAPTER_WEIGHTS} expected)")  # fmt: skip
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for unsupported in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(unsupported):
            raise ValueError(f"{path}: {unsupported} is not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{path}: fan_in_fan_out (Conv1D layers) is not supported")
    tensors = safetensors.torch.load_file(str(path / ADAPTER_WEIGHTS))
    layers = sorted({k[len(_PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in tensors})
    apply_lora(model, config["r"], config["lora_alpha"], layers, config.get("lora_dropout", 0.0),
               config.get("use_rslora", False), adapter_name)  # fmt: skip
    for name in layers:
        layer = model.get_submodule(name)
        for part in ("A", "B"):
            key = f"{_PEFT_PREFIX}{name}.lora_{part}.weight"
            if key not in tensors:
                raise ValueError(f"{path}: no lora_{part} weight for {name}")
            target = getattr(layer, f"lora_{part}")[adapter_name].weight
            if tuple(tensors[key].shape) != tuple(target.shape):
                raise ValueError(f"{path}: lora_{part} of {name} is {tuple(tensors[key].shape)}, "
                                 f"the model needs {tuple(target.shape)}")  # fmt: skip
            target.data.copy_(tensors[key])
    return model


def merge_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Merge each layer's active adapter into its base and put the base back in place of
    the :class:`LoRALinear` (PEFT's ``merge_and_unload``)."""
    for name in _wrapped(model):
        layer = model.get_submodule(name)
        if layer.active_adapter is not None:
            layer.merge(requantize=requantize)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer.base_layer)
    return model


# Heads of fastlm's and Hugging Face's models: what train_head unfreezes.
HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "head_dense", "head_norm", "head_bias",
              "pooler")  # fmt: skip


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer blocks: its longest ``nn.ModuleList``."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to unfreeze")
    return max(lists, key=len)


def freeze(model: nn.Module, train_last_n_blocks: int = 0, train_head: bool = True) -> nn.Module:
    """Feature-based fine-tuning: freeze everything, then unfreeze the last
    ``train_last_n_blocks`` blocks (of the longest block list) and, with ``train_head``, the
    output head (parameters whose name has a component in :data:`HEAD_NAMES`; a head tied
    to the input embedding unfreezes that embedding too, being the same tensor)."""
    if isinstance(train_last_n_blocks, bool) or not isinstance(train_last_n_blocks, int) \
            or train_last_n_blocks < 0:  # fmt: skip
        raise ValueError(f"train_last_n_blocks must be a non-negative int, got "
                         f"{train_last_n_blocks!r}")  # fmt: skip
    model.requires_grad_(False)
    if train_last_n_blocks:
        blocks = _blocks(model)
        if train_last_n_blocks > len(blocks):
            raise ValueError(f"train_last_n_blocks {train_last_n_blocks} > the model's "
                             f"{len(blocks)} blocks")  # fmt: skip
        for block in blocks[len(blocks) - train_last_n_blocks :]:
            block.requires_grad_(True)
    if train_head:
        found = [p for n, p in model.named_parameters(remove_duplicate=False)
                 if set(n.split(".")) & set(HEAD_NAMES)]  # fmt: skip
        if not found:
            raise ValueError(f"train_head: no head ({', '.join(HEAD_NAMES)}) in "
                             f"{type(model).__name__}")  # fmt: skip
        for p in found:
            p.requires_grad_(True)
    return model


__all__ = [
    "Adapted",
    "Adapter",
    "PromptTuning",
    "apply_adapters",
    "apply_lora",
    "freeze",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "save_adapter",
]
