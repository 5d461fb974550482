"""``QuantLinear``: a linear layer with an int8 / int4 / NF4 weight (optionally W8A8)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlm.ops.quant import quant_matmul, w8a8_matmul
from fastlm.ops.quant_formats import (
    DQ_BLOCK,
    QuantizedWeight,
    check_format,
    dequantize_weight,
    quantize_weight,
)


class QuantLinear(nn.Module):
    """``y = x @ W.T + bias`` with W stored quantized (see :mod:`fastlm.ops.quant_formats`).

    Built from a float layer with :meth:`from_linear`; ``dequantize()`` gives an
    ``nn.Linear`` back. The state dict holds the stored tensors (``qweight``, ``scales``,
    ``zeros`` / ``scales2`` / ``scales_mean`` when the format has them) and ``bias``, so a
    quantized model saves and loads (safetensors included) without a float weight ever
    being formed; the constructor allocates those tensors empty for exactly that.

    ``act_bits=8`` (with ``bits=8``) quantizes activations per token too and multiplies on
    int8 tensor cores (W8A8, inference only).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        group_size: int | None = None,
        scheme: str = "int",
        symmetric: bool = False,
        double_quant: bool = False,
        act_bits: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        group = check_format(bits, group_size, scheme, in_features)
        if bits == 4 and in_features % 2:
            raise ValueError(f"4-bit weights need an even in_features, got {in_features}")
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits!r}")
        if act_bits == 8 and bits != 8:
            raise ValueError("act_bits=8 (W8A8) needs bits=8")
        if double_quant and scheme != "nf4":
            raise ValueError("double_quant applies to scheme 'nf4' only")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.scheme = bits, group, scheme
        self.symmetric = bits == 8 or scheme == "nf4" or symmetric
        self.act_bits = act_bits
        self._forward_weight: QuantizedWeight | None = None  # see forward_weight
        n, k = out_features, in_features
        if bits == 8:
            self.register_buffer("qweight", torch.empty(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(n, dtype=torch.float32, device=device))
        else:
            g = k // group
            self.register_buffer(
                "qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device)
            )
            scale_dtype = torch.int8 if double_quant else torch.float16
            self.register_buffer("scales", torch.empty(n, g, dtype=scale_dtype, device=device))
            if not self.symmetric:
                self.register_buffer("zeros", torch.empty(n, g, dtype=torch.uint8, device=device))
            if double_quant:
                blocks = -(-n * g // DQ_BLOCK)
                self.register_buffer("scales2", torch.empty(blocks, device=device))
                self.register_buffer("scales_mean", torch.empty(1, device=device))
        self.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = None,
        scheme: str = "int",
        act_bits: int | None = None,
        symmetric: bool = False,
        double_quant: bool = False,
    ) -> QuantLinear:
        """Quantize ``linear``'s weight; the bias is kept in its dtype. A ``linear`` on the
        meta device gives an empty layer of the right shapes: the skeleton a quantized
        checkpoint loads into (``load_state_dict(..., assign=True)``) without any float
        weight being formed."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            bits,
            group_size,
            scheme,
            symmetric,
            double_quant,
            act_bits,
            device=w.device,
            dtype=w.dtype,
        )
        if w.is_meta:
            return layer
        qw = quantize_weight(w, bits, group_size, scheme, symmetric, double_quant)
        for name, tensor in qw.tensors().items():
            getattr(layer, name).copy_(tensor)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight (views of this layer's buffers)."""
        # Read from the buffer table: nn.Module's attribute lookup costs a few hundred ns a
        # name (more for an absent one), on every forward.
        buffers = self._buffers
        return QuantizedWeight(
            self.scheme,
            self.bits,
            (self.out_features, self.in_features),
            self.group_size,
            self.symmetric,
            buffers["qweight"],
            buffers["scales"],
            buffers.get("zeros"),
            buffers.get("scales2"),
            buffers.get("scales_mean"),
        )

    def forward_weight(self) -> QuantizedWeight:
        """:attr:`quantized_weight`, built once and kept while this layer's buffers stay the
        same tensors (``.to()``, ``load_state_dict(assign=True)`` or an assignment replace
        them, and the next call builds it again): building it costs about a microsecond,
        as much as a small layer's matmul. Not for callers that modify what they get."""
        if torch.compiler.is_dynamo_compiling():  # a traced graph neither reads nor keeps it
            return self.quantized_weight
        buffers = self._buffers
        qw = self._forward_weight
        if (
            qw is None
            or qw.qweight is not buffers["qweight"]
            or qw.scales is not buffers["scales"]
            or qw.zeros is not buffers.get("zeros")
            or qw.scales2 is not buffers.get("scales2")
            or qw.scales_mean is not buffers.get("scales_mean")
        ):
            qw = self._forward_weight = self.quantized_weight
        return qw

    def forward(self, x: Tensor) -> Tensor:
        # The bias from the parameter table (a None one is a plain attribute): nn.Module's
        # attribute lookup costs a few hundred ns a name.
        try:
            bias = self._parameters["bias"]
        except KeyError:
            bias = self.bias
        if self.act_bits == 8:
            return w8a8_matmul(x, self.forward_weight(), bias)
        return quant_matmul(x, self.forward_weight(), bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ``nn.Linear`` with the weight this layer stands for."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.qweight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(dequantize_weight(self.quantized_weight, dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        fmt = f"int{self.bits}" if self.scheme == "int" else self.scheme
        group = "" if self.bits == 8 else f", group_size={self.group_size}"
        extra = (
            ", symmetric" if self.symmetric and self.bits == 4 and self.scheme == "int" else ""
        ) + (", double_quant" if hasattr(self, "scales2") else "")
        act = ", act_bits=8" if self.act_bits else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {fmt}{group}{extra}{act}"
        )
