"""The functional API: one module per op with its reference, custom op and backend choice."""

# Not an op (__all__ lists the ops, each with conformance rows): the mask helpers.
from fastlm.ops import masks as masks
from fastlm.ops.activation import bias_act, bias_act_ref
from fastlm.ops.attention import (
    attention_probs,
    attention_ref,
    flash_attention,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from fastlm.ops.attention_kvcache import attention_with_kvcache
from fastlm.ops.cross_entropy import cross_entropy, cross_entropy_ref, linear_cross_entropy
from fastlm.ops.lora import lora_linear, lora_linear_ref
from fastlm.ops.mlp import (
    fused_mlp,
    gated_linear,
    gated_linear_ref,
    gated_mlp,
    linear_act,
    linear_act_ref,
)
from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from fastlm.ops.quant import quant_matmul, quant_matmul_ref, w8a8_matmul
from fastlm.ops.rotary import apply_rotary, apply_rotary_ref

__all__ = [
    "apply_rotary",
    "apply_rotary_ref",
    "attention_probs",
    "attention_ref",
    "attention_with_kvcache",
    "bias_act",
    "bias_act_ref",
    "cross_entropy",
    "cross_entropy_ref",
    "flash_attention",
    "flash_attention_varlen",
    "fused_mlp",
    "gated_linear",
    "gated_linear_ref",
    "gated_mlp",
    "layer_norm",
    "layer_norm_ref",
    "linear_act",
    "linear_act_ref",
    "linear_cross_entropy",
    "lora_linear",
    "lora_linear_ref",
    "quant_matmul",
    "quant_matmul_ref",
    "rms_norm",
    "rms_norm_ref",
    "scaled_dot_product_attention",
    "w8a8_matmul",
]
