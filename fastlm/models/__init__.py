"""Full models from fastlm layers: BERT, GPT (GPT-2 and Llama style) and T5, their configs
and presets, Hugging Face state-dict adapters, and generation with a KV cache."""

from fastlm.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
)
from fastlm.models.gpt import GPT, GPTConfig
from fastlm.models.layers import ModelOutput
from fastlm.models.presets import PRESETS, config, create
from fastlm.models.t5 import T5, T5Config

__all__ = [
    "GPT",
    "PRESETS",
    "T5",
    "BertConfig",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BertModel",
    "GPTConfig",
    "ModelOutput",
    "T5Config",
    "config",
    "create",
]
