"""LoRA adapters in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``, PEFT's key names, ``rank_pattern`` / ``alpha_pattern``),
so adapters move between fastlm and PEFT both ways on the same model."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import safetensors
import safetensors.torch
from torch import Tensor, nn

from fastlm.peft.lora import LoRAState, adapter_state, attach_lora, lora_layer_names

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """Adapter ``adapter_name``'s tensors in PEFT's file keys
    (``base_model.model.<layer>.lora_A.weight``)."""
    out = {}
    for name in lora_layer_names(model):
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
    write_adapter(path, adapter_state(model, adapter_name))


def write_adapter(path: str | os.PathLike, adapter: LoRAState) -> None:
    """Write ``adapter`` as a PEFT LoRA adapter directory. Layers whose rank or alpha differ
    from the most common one are listed in PEFT's ``rank_pattern`` / ``alpha_pattern``."""
    ranks = {n: a.shape[0] for n, (a, _) in adapter.weights.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(adapter.alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: a for n, a in adapter.alphas.items() if a != alpha},
        "lora_dropout": adapter.dropout,
        "target_modules": list(adapter.weights),
        "use_rslora": adapter.use_rslora,
        "bias": "none",
        "fan_in_fan_out": adapter.fan_in_fan_out,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tensors = {}
    for name, (a, b) in adapter.weights.items():
        # Copies: safetensors stores no shared memory (a fused layer's A serves each part).
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().clone().contiguous()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().clone().contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    safetensors.torch.save_file(tensors, str(path / ADAPTER_WEIGHTS))


# PEFT options that change what an adapter computes, which LoRALinear does not implement.
_UNSUPPORTED = (
    "use_dora",
    "lora_bias",
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
)
_KEY = re.compile(re.escape(_PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight")


def _pattern(patterns: dict, name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that matches the
    end of ``name`` at a dot, as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(path: str | os.PathLike) -> LoRAState:
    """Read a PEFT LoRA adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), refusing in ValueErrors naming the file what LoRALinear
    cannot compute (DoRA, LoRA biases, fully saved modules, ...) and tensors it does not
    know."""
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"{path} is not a PEFT adapter directory ({ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} expected)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    for unsupported in _UNSUPPORTED:
        if config.get(unsupported):
            raise ValueError(f"{path}: {unsupported} is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias {config['bias']!r} is not supported (only 'none')")
    try:
        tensors = safetensors.torch.load_file(str(weights_file))
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({exc})") from exc
    unknown = [k for k in tensors if not _KEY.fullmatch(k)]
    if unknown:
        raise ValueError(
            f"{weights_file}: tensors other than LoRA A and B weights: "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, part = _KEY.fullmatch(key).groups()
        parts.setdefault(name, {})[part] = t
    weights = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: no lora_{'B' if 'A' in ab else 'A'} weight for {name}")
        r = _pattern(config.get("rank_pattern") or {}, name, config.get("r"))
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise ValueError(
                f"{path}: {name}'s lora_A {tuple(ab['A'].shape)} and lora_B "
                f"{tuple(ab['B'].shape)} are not a rank-{r} pair"
            )
        weights[name] = (ab["A"], ab["B"])
    alpha_pattern = config.get("alpha_pattern") or {}
    alphas = {n: _pattern(alpha_pattern, n, config.get("lora_alpha")) for n in weights}
    return LoRAState(
        weights,
        alphas,
        config.get("lora_dropout") or 0.0,
        bool(config.get("use_rslora")),
        bool(config.get("fan_in_fan_out")),
    )


def load_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default"
) -> nn.Module:
    """Load a PEFT LoRA adapter directory (written by PEFT or :func:`save_adapter`) into
    ``model`` as adapter ``adapter_name``, wrapping the layers it targets."""
    adapter = read_adapter(path)
    if adapter.fan_in_fan_out:
        raise ValueError(f"{path}: fan_in_fan_out (Conv1D layers) is not supported")
    return attach_lora(model, adapter, adapter_name, str(path))
