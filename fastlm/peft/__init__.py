"""Parameter-efficient fine-tuning, one API for the field's methods:

- LoRA / QLoRA on any model's linear layers (:func:`apply_lora`, fused kernels underneath),
  saved and loaded in Hugging Face PEFT's on-disk format (``adapter_config.json`` +
  ``adapter_model.safetensors``, PEFT's key names, ``rank_pattern`` / ``alpha_pattern``),
  so adapters move between fastlm and PEFT both ways on the same model;
  :func:`merge_lora`, :func:`lora_state_dict`. (Between a fastlm model and its Hugging Face
  export, whose layers are named and fused differently, ``fastlm.models.hf.to_hf_adapter``
  and ``from_hf_adapter`` convert them.)
- bottleneck adapters after attention and/or MLP outputs (:func:`apply_adapters`);
- prompt tuning (:class:`PromptTuning`);
- feature-based fine-tuning (:func:`freeze`).
"""

from fastlm.peft.adapters import Adapted, Adapter, apply_adapters
from fastlm.peft.freeze import freeze
from fastlm.peft.lora import LoRAState, adapter_state, apply_lora, attach_lora, merge_lora
from fastlm.peft.lora_files import (
    load_adapter,
    lora_state_dict,
    read_adapter,
    save_adapter,
    write_adapter,
)
from fastlm.peft.prompt import PromptTuning

__all__ = [
    "Adapted",
    "Adapter",
    "PromptTuning",
    "apply_adapters",
    "LoRAState",
    "adapter_state",
    "apply_lora",
    "attach_lora",
    "freeze",
    "load_adapter",
    "lora_state_dict",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "write_adapter",
]
