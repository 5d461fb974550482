"""Drop-in ``nn.Module``s: same constructor, parameters, state_dict keys and forward as the
torch modules they replace."""

from fastlm.nn.attention import MultiheadAttention
from fastlm.nn.cross_entropy import CrossEntropyLoss, LinearCrossEntropyLoss
from fastlm.nn.lora import LoRALinear
from fastlm.nn.mlp import FusedMLP, GatedMLP
from fastlm.nn.norm import GemmaRMSNorm, LayerNorm, RMSNorm
from fastlm.nn.patch import patch, patch_report
from fastlm.nn.patch_report import PatchReport
from fastlm.nn.quant import QuantLinear
from fastlm.nn.rotary import RotaryEmbedding

__all__ = [
    "CrossEntropyLoss",
    "FusedMLP",
    "GatedMLP",
    "GemmaRMSNorm",
    "LayerNorm",
    "LinearCrossEntropyLoss",
    "LoRALinear",
    "MultiheadAttention",
    "PatchReport",
    "QuantLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "patch",
    "patch_report",
]
