"""The functional API: one module per op with its reference, custom op and backend choice."""

from fastlm.ops.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

__all__ = ["layer_norm", "layer_norm_ref", "rms_norm", "rms_norm_ref"]
