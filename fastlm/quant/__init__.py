"""Weight quantization: formats (``quantize_weight`` / ``dequantize_weight``) and
``quantize_(model)``; the layer is :class:`fastlm.nn.QuantLinear`, the kernels
:func:`fastlm.ops.quant_matmul` / :func:`fastlm.ops.w8a8_matmul`."""

from fastlm.quant.formats import (
    NF4_CODE,
    QuantizedWeight,
    dequantize_weight,
    quantize_weight,
)


def __getattr__(name: str):
    # quantize_ needs fastlm.nn, whose ops import this package's formats: loaded on use.
    if name == "quantize_":
        from fastlm.quant.model import quantize_

        return quantize_
    raise AttributeError(f"module 'fastlm.quant' has no attribute {name!r}")


__all__ = ["NF4_CODE", "QuantizedWeight", "dequantize_weight", "quantize_", "quantize_weight"]
