"""The functional API: one module per op with its reference, custom op and backend choice."""

from fastlm.ops.attention import (
    attention_ref,
    attention_with_kvcache,
    flash_attention,
    flash_attention_varlen,
    scaled_dot_product_attention,
)
from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = [
    "attention_ref",
    "attention_with_kvcache",
    "flash_attention",
    "flash_attention_varlen",
    "layer_norm",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_ref",
    "scaled_dot_product_attention",
]
