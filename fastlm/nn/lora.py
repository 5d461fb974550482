"""``LoRALinear``: a frozen linear layer (float or quantized) plus low-rank adapters.

``y = base(x) + scale * B(A(dropout(x)))`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
with rsLoRA). The module layout is PEFT's (``base_layer``, ``lora_A.<name>``,
``lora_B.<name>``, ``lora_dropout.<name>``), so state dicts and adapter files map onto
PEFT's key for key. A is initialized as PEFT (and ``nn.Linear``) do, B to zero: a freshly
wrapped layer computes exactly what its base does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastlm.nn.quant import QuantLinear
from fastlm.ops.lora import lora_linear
from fastlm.ops.quant_formats import dequantize_weight


def _check_rank(r: object) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return r


class LoRALinear(nn.Module):
    """Wrap ``base`` (an ``nn.Linear`` in any float dtype, or a :class:`QuantLinear`:
    QLoRA) with a LoRA adapter called ``adapter_name``; the base is frozen.

    Several adapters may be added (:meth:`add_adapter`); one is active at a time
    (:meth:`set_adapter`, or ``None`` for the base alone).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(
                f"base must be an nn.Linear or a QuantLinear, got {type(base).__name__}"
            )
        self.base_layer = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.merged: list[str] = []
        self.add_adapter(adapter_name, r, alpha, dropout, use_rslora)

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        """Add adapter ``name`` (and make it active)."""
        _check_rank(r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} exists already")
        like = (
            self.base_layer.bias
            if isinstance(self.base_layer, QuantLinear)
            else (self.base_layer.weight)
        )
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.float32
        device = self.base_layer.qweight.device if like is None else like.device
        a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default
        nn.init.zeros_(b.weight)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_alpha[name], self.use_rslora[name] = alpha, use_rslora
        self.active_adapter = name

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.lora_A:
            raise ValueError(f"no adapter {name!r}; adapters: {', '.join(self.lora_A)}")
        self.active_adapter = name

    def delta_weight(self, name: str) -> Tensor:
        """``scale * B @ A``, the (out, in) weight update of adapter ``name``."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.float() @ a.float()) * self.scaling[name]

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if name is None or name in self.merged:
            return self.base_layer(x)
        # Children read from the module table: nn.Module's attribute lookup costs a few hundred
        # ns a name, on every forward.
        modules = self._modules
        base = modules["base_layer"]
        a, b = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
        # Parameters too, from their tables where the layer is a plain nn.Linear.
        a_weight = a._parameters["weight"] if type(a) is nn.Linear else a.weight
        if type(base) is nn.Linear:
            params = base._parameters
            weight, bias = params["weight"], params["bias"]
            fusable = weight.dtype is a_weight.dtype
        else:
            fusable = isinstance(base, QuantLinear) and base.act_bits is None
            weight = base.forward_weight() if fusable else None
            bias = base.bias
        if fusable and a_weight.dtype is x.dtype:
            # Base GEMM (float or dequantized in registers) and low-rank update in one kernel.
            dropout = modules["lora_dropout"]._modules[name]
            p = dropout.p if self.training and isinstance(dropout, nn.Dropout) else 0.0
            b_weight = b._parameters["weight"] if type(b) is nn.Linear else b.weight
            return lora_linear(x, weight, bias, a_weight, b_weight, self.scaling[name], p)
        y = base(x)
        update = b(a(modules["lora_dropout"]._modules[name](x.to(a_weight.dtype))))
        return y + (update * self.scaling[name]).to(y.dtype)

    @torch.no_grad()
    def merge(self, name: str | None = None, requantize: bool = False) -> None:
        """Add adapter ``name`` (default: the active one) into the base weight. A quantized
        base cannot hold the sum exactly: merging raises unless ``requantize``, which
        replaces the base by a re-quantized one of the same format (lossy; no unmerge)."""
        name = name or self.active_adapter
        if name is None or name not in self.lora_A:
            raise ValueError(f"no adapter {name!r} to merge")
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged already")
        base = self.base_layer
        if isinstance(base, QuantLinear):
            if not requantize:
                raise ValueError(
                    "the base layer is quantized: merging would re-quantize it "
                    "(lossy, no unmerge); pass requantize=True to do so"
                )
            w = dequantize_weight(base.quantized_weight) + self.delta_weight(name)
            dense = base.dequantize(torch.float32)
            dense.weight.copy_(w)
            self.base_layer = QuantLinear.from_linear(
                dense,
                base.bits,
                base.group_size if base.bits == 4 else None,
                base.scheme,
                base.act_bits,
                base.symmetric,
                hasattr(base, "scales2"),
            ).requires_grad_(False)
            if base.bias is not None:
                self.base_layer.bias.data = base.bias.data.clone()
            del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            del self.scaling[name], self.lora_alpha[name], self.use_rslora[name]
            self.active_adapter = next(iter(self.lora_A), None)
            return
        if not self.merged:  # kept so that unmerge restores the weight bit for bit
            self._unmerged_weight = base.weight.detach().clone()
        base.weight += self.delta_weight(name).to(base.weight.dtype)
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out of the float base weight: the weight from before
        the first merge comes back exactly (a subtraction would leave rounding behind)."""
        if self.merged:
            self.base_layer.weight.copy_(self._unmerged_weight)
            del self._unmerged_weight
            self.merged.clear()

    def extra_repr(self) -> str:
        ranks = {n: a.out_features for n, a in self.lora_A.items()}
        return f"adapters={ranks}, active={self.active_adapter!r}, merged={self.merged}"
