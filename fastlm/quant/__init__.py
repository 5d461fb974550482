"""Weight quantization: ``quantize_(model)``, and the formats it stores
(``quantize_weight`` / ``dequantize_weight``, defined in :mod:`fastlm.ops.quant_formats`
beneath the ops that read them); the layer is :class:`fastlm.nn.QuantLinear`, the kernels
:func:`fastlm.ops.quant_matmul` / :func:`fastlm.ops.w8a8_matmul`."""

from fastlm.ops.quant_formats import (
    NF4_CODE,
    QuantizedWeight,
    dequantize_weight,
    quantize_weight,
)
from fastlm.quant.model import quantize_

__all__ = ["NF4_CODE", "QuantizedWeight", "dequantize_weight", "quantize_", "quantize_weight"]
