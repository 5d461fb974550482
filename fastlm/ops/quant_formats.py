"""Weight quantization formats: quantize, dequantize, and their exact storage layouts.

A weight ``W`` is ``(N, K)`` as ``nn.Linear`` stores it (N outputs, K inputs); groups run
along K. Every format keeps integers in ``qweight`` and the float metadata beside it
(layouts in ``docs/quantization.md``):

========  ====================================================================  ============
scheme    layout                                                                bits/weight
========  ====================================================================  ============
int8      ``qweight`` int8 (N, K); ``scales`` fp32 (N,); ``W = q * s``           8 + 32/K
int4      ``qweight`` uint8 (N, K/2), two 4-bit codes per byte (even k in the     4 + 24/G
          low nibble); ``scales`` fp16 (N, K/G), ``zeros`` uint8 (N, K/G) in      (sym: 4 + 16/G)
          [0, 15]; ``W = (q - z) * s``; symmetric: no ``zeros``, z = 8
nf4       the int4 nibble layout, codes index :data:`NF4_CODE` (QLoRA's 16          4 + 16/G
          normal-float values); ``scales`` fp16 (N, K/G) absmax per block;        (double:
          ``W = NF4_CODE[q] * absmax``. Double quantization stores the absmax     4 + 8/G + ...)
          as int8 ``scales`` around a fp32 ``scales_mean`` with fp32 ``scales2``
          per 256 blocks: ``absmax = s * scales2[b // 256] + scales_mean``
========  ====================================================================  ============

Rounding is to nearest (ties to even); every scale is computed in fp32 before it is stored.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

SCHEMES = ("int", "nf4")
GROUP_SIZES = (32, 64, 128)
DQ_BLOCK = 256  # absmax values per second-level scale (QLoRA's choice)

# QLoRA's NF4 code (Dettmers et al. 2023, appendix E): the 16 quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclasses.dataclass
class QuantizedWeight:
    """A quantized (N, K) weight: its format and tensors (see the module docstring)."""

    scheme: str  # "int" or "nf4"
    bits: int  # 8 or 4
    shape: tuple[int, int]  # (N, K)
    group_size: int  # K for per-channel int8
    symmetric: bool
    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None = None
    scales2: Tensor | None = None  # double quantization (nf4)
    scales_mean: Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.scales2 is not None

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors by name (what a state dict holds)."""
        names = ("qweight", "scales", "zeros", "scales2", "scales_mean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def storage_bits(self) -> float:
        """Bits per weight, metadata included."""
        total = sum(t.numel() * t.element_size() for t in self.tensors().values())
        return 8 * total / (self.shape[0] * self.shape[1])

    def block_scales(self) -> Tensor:
        """The per-group scales (absmax for nf4) as fp32, double quantization undone."""
        if not self.double_quant:
            return self.scales.float()
        flat = self.scales.flatten().float()
        blocks = torch.arange(flat.numel(), device=flat.device) // DQ_BLOCK
        return (flat * self.scales2[blocks] + self.scales_mean).view(self.scales.shape)


DEFAULT_GROUP = {"int": 128, "nf4": 64}  # QLoRA's NF4 block; the usual int4 group


def check_format(bits: int, group_size: int | None, scheme: str, k: int | None = None) -> int:
    """Validate a format; returns the group size: ``group_size`` or the scheme's default
    (:data:`DEFAULT_GROUP`) for 4-bit, K for int8 (scaled per output channel)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if scheme == "nf4" and bits != 4:
        raise ValueError(f"scheme 'nf4' is 4-bit, got bits={bits}")
    if bits == 8:
        if group_size is not None:
            raise ValueError(
                "8-bit weights are scaled per output channel: group_size must be "
                f"None, got {group_size}"
            )
        return k if k is not None else 0
    if group_size is None:
        group_size = DEFAULT_GROUP[scheme]
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if k is not None and k % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {k}")
    return group_size


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, even k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int codes in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def quantize_weight(
    weight: Tensor,
    bits: int = 4,
    group_size: int | None = None,
    scheme: str = "int",
    symmetric: bool = False,
    double_quant: bool = False,
) -> QuantizedWeight:
    """Quantize an (N, K) float weight.

    ``bits=8``: int8 symmetric per output channel (``group_size`` None). ``bits=4``:
    ``scheme="int"`` asymmetric (zero points) or ``symmetric`` int4 per ``group_size``
    (default 128) along K, or ``scheme="nf4"`` (absmax per block of ``group_size``,
    default 64 as in QLoRA) with
    optional ``double_quant`` of the absmax values. Returns a :class:`QuantizedWeight` on
    the weight's device.
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        raise TypeError("weight must be a 2-D floating-point tensor (N, K)")
    n, k = weight.shape
    if k == 0:
        raise ValueError("weight must have at least one input feature (K >= 1), got K = 0")
    # One NaN or inf would spread through its group's (or channel's) scale, and with double
    # quantization through every block's: refuse it rather than quantize it.
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        row, col = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"weight must be finite: weight[{row}, {col}] = {weight[row, col].item()}")
    g = check_format(bits, group_size, scheme, k)
    if double_quant and scheme != "nf4":
        raise ValueError("double_quant applies to scheme 'nf4' only")
    if bits == 4 and k % 2:
        raise ValueError(f"4-bit weights need an even K, got {k}")
    w = weight.detach().float()
    if bits == 8:
        scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int", 8, (n, k), k, True, q, scales)
    groups = w.view(n, k // g, g)
    if scheme == "nf4":
        absmax = _fp16_scale(groups.abs().amax(dim=2))  # quantize against what is stored
        code = torch.tensor(NF4_CODE, device=w.device)
        q = (groups / absmax[..., None]).unsqueeze(-1).sub(code).abs().argmin(dim=-1)
        qw = QuantizedWeight("nf4", 4, (n, k), g, True, pack_int4(q.view(n, k)), absmax.half())
        if double_quant:
            qw.scales, qw.scales2, qw.scales_mean = _double_quantize(absmax)
        return qw
    if symmetric:
        scales = _fp16_scale(groups.abs().amax(dim=2) / 7)
        q = torch.round(groups / scales[..., None]).clamp(-8, 7) + 8
        return QuantizedWeight("int", 4, (n, k), g, True, pack_int4(q.view(n, k)), scales.half())
    # Asymmetric over [min(w, 0), max(w, 0)], so that 0 stays exactly representable.
    lo, hi = groups.amin(dim=2).clamp_max(0), groups.amax(dim=2).clamp_min(0)
    scales = _fp16_scale((hi - lo) / 15)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(groups / scales[..., None]) + zeros[..., None]).clamp(0, 15)
    return QuantizedWeight(
        "int", 4, (n, k), g, False, pack_int4(q.view(n, k)), scales.half(), zeros.to(torch.uint8)
    )


def _fp16_scale(scale: Tensor) -> Tensor:
    """Scales as stored (fp16), so codes are chosen against the scale dequantization uses;
    kept within fp16's range (an all-zero group gets the smallest subnormal)."""
    if bool((scale > torch.finfo(torch.float16).max).any()):
        raise ValueError("weight magnitudes exceed what fp16 group scales can hold")
    return scale.clamp_min(2**-24).half().float()


def _double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    flat = absmax.flatten()
    mean = flat.mean()
    centered = flat - mean
    pad = (-flat.numel()) % DQ_BLOCK
    blocks = torch.nn.functional.pad(centered, (0, pad)).view(-1, DQ_BLOCK)
    scales2 = blocks.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(blocks / scales2[:, None]).clamp(-127, 127).to(torch.int8)
    return q.flatten()[: flat.numel()].view(absmax.shape), scales2, mean.reshape(1)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (N, K) weight a :class:`QuantizedWeight` stands for, in ``dtype`` (computed in
    fp32, or fp64 for fp64)."""
    n, k = qw.shape
    compute = torch.float64 if dtype is torch.float64 else torch.float32
    # The arithmetic runs in place on the fresh (N, K) float tensor the codes convert to: the
    # same operations in the same order as out of place (the same bits), without a new
    # weight-sized allocation per step. Metadata that autograd follows keeps it out of place.
    # (Multiplying the integer codes by the float scales directly would write one tensor,
    # but PyTorch runs mixed-dtype elementwise ops element by element: 5-20x slower.)
    inplace = not (torch.is_grad_enabled() and qw.scales.requires_grad)
    if qw.bits == 8:
        w = qw.qweight.to(compute)
        scales = qw.scales.to(compute)[:, None]
        w = w.mul_(scales) if inplace else w * scales
        return w if dtype is compute else w.to(dtype)
    scales = qw.block_scales().to(compute)[..., None]
    q = unpack_int4(qw.qweight).view(n, k // qw.group_size, qw.group_size)
    if qw.scheme == "nf4":
        code = _code(compute, q.device)
        # A gather by int32 indices: a fresh tensor, as code[q.long()] gives, at half the
        # index bytes.
        w = code.index_select(0, q.view(-1).int()).view(q.shape)
        w = w.mul_(scales) if inplace else w * scales
    else:
        zeros = 8 if qw.zeros is None else qw.zeros.to(compute)[..., None]
        w = q.to(compute)
        w = w.sub_(zeros).mul_(scales) if inplace else (w - zeros) * scales
    w = w.view(n, k)
    return w if dtype is compute else w.to(dtype)


# The NF4 code as a tensor, per dtype and device (building it from the tuple is a host
# copy each time).
_CODES: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _code(dtype: torch.dtype, device: torch.device) -> Tensor:
    code = _CODES.get((dtype, device))
    if code is None:
        code = _CODES[(dtype, device)] = torch.tensor(NF4_CODE, dtype=dtype, device=device)
    return code


def nf4_code(device: torch.device) -> Tensor:
    """:data:`NF4_CODE` as a float32 tensor on ``device`` (built once per device)."""
    return _code(torch.float32, device)
