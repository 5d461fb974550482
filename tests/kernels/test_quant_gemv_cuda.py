"""fastlm_C::quant_gemv, the CUDA C++ weight-only quantized GEMV, against a float64 reference.

The weights are quantized and packed here, independently of fastlm's own quantization code:
int8 symmetric per output channel, and int4 groups along K (symmetric with z = 8, or
asymmetric with stored zeros), two nibbles a byte, low nibble first. The kernel passes when
its error against ``x @ dequantized(W)^T`` in float64 is within the numerical policy of
PyTorch's own matmul of the dequantized weight in x's dtype.
"""

from __future__ import annotations

import pytest
import torch

from fastlm import backend
from fastlm.testing import assert_policy

_EXTENSION_ERROR = backend.cuda_extension_error()
pytestmark = pytest.mark.skipif(_EXTENSION_ERROR is not None, reason=str(_EXTENSION_ERROR))

DTYPES = [torch.float16, torch.bfloat16]
ROWS = list(range(1, 9))
COLUMNS = [1, 7, 4099]
SCHEMA = (
    "fastlm_C::quant_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int bits, "
    "int group_size) -> Tensor"
)


def _op():
    return torch.ops.fastlm_C.quant_gemv


# --- quantization and packing (the layout of the op's contract) ------------------------------


def quantize_int8(w: torch.Tensor):
    """(qweight int8 (N, K), scales float32 (N,), dequantized float64 (N, K))."""
    scales = (w.abs().amax(dim=1).float() / 127).clamp_min(1e-8)
    q = torch.round(w.float() / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales, q.double() * scales.double()[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K / 2) uint8, q[:, 2j] in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_int4(w: torch.Tensor, group: int, asymmetric: bool):
    """(qweight uint8 (N, K/2), scales float16 (N, K/G), zeros uint8 (N, K/G) or None,
    dequantized float64 (N, K))."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    if asymmetric:
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        scales = ((hi - lo) / 15).clamp_min(1e-3).half()
        z = torch.round(-lo / scales.float()).clamp(0, 15)
    else:
        scales = (g.abs().amax(dim=2) / 7).clamp_min(1e-3).half()
        z = torch.full_like(scales, 8, dtype=torch.float32)
    q = torch.round(g / scales.float()[..., None] + z[..., None]).clamp(0, 15)
    deq = (q.double() - z.double()[..., None]) * scales.double()[..., None]
    zeros = z.to(torch.uint8) if asymmetric else None
    return pack_int4(q.reshape(n, k)), scales, zeros, deq.reshape(n, k)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (5, 64))
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 32)
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))


# --- registration (no GPU needed) -------------------------------------------------------------


def test_quant_gemv_is_registered_for_cuda_only():
    assert str(_op().default._schema) == SCHEMA
    x = torch.randn(1, 32, dtype=torch.float16)
    q, s, _ = quantize_int8(torch.randn(4, 32))
    with pytest.raises(NotImplementedError, match="CPU"):
        _op()(x, q, s, None, 8, 0)


# --- numerics ---------------------------------------------------------------------------------


def _fresh_output_memory(m: int, n: int, dtype: torch.dtype, device: str) -> None:
    """Leave a NaN-filled block of y's size in the caching allocator, so that y (allocated in
    C++, out of reach of fastlm.testing.poisoned_outputs) most likely starts as NaN and an
    unwritten element shows."""
    torch.full((m, n), float("nan"), dtype=dtype, device=device)


def _check(x, qweight, scales, zeros, bits, group, deq, label):
    m, n = x.shape[0], deq.shape[0]
    _fresh_output_memory(m, n, x.dtype, x.device)
    y = _op()(x, qweight, scales, zeros, bits, group)
    assert y.dtype == x.dtype and y.shape == (m, n), label
    reference = x.double() @ deq.t()
    baseline = x @ deq.to(x.dtype).t()
    assert_policy(y, reference, baseline, name=label)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", ROWS)
def test_int8_matches_reference(m, dtype):
    # K odd or not a multiple of 16 takes the scalar path; 4112 is split across blocks when
    # N is small and tiled through shared memory when M is large.
    for k in (1, 33, 96, 4112, 4097):
        for n in COLUMNS:
            q, s, deq = quantize_int8(torch.randn(n, k, device="cuda"))
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            _check(x, q, s, None, 8, 0, deq, f"int8 M={m} N={n} K={k}")


@pytest.mark.gpu
@pytest.mark.parametrize("asymmetric", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", ROWS)
def test_int4_matches_reference(m, dtype, group, asymmetric):
    for k in (group, 3 * group, 4096 + group):
        for n in COLUMNS:
            qw, s, z, deq = quantize_int4(torch.randn(n, k, device="cuda"), group, asymmetric)
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            label = f"int4 G={group} {'asym' if asymmetric else 'sym'} M={m} N={n} K={k}"
            _check(x, qw, s, z, 4, group, deq, label)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_size_is_ignored_for_int8(dtype):
    q, s, deq = quantize_int8(torch.randn(9, 64, device="cuda"))
    x = torch.randn(2, 64, dtype=dtype, device="cuda")
    _check(x, q, s, None, 8, 0, deq, "group_size 0")
    _check(x, q, s, None, 8, 64, deq, "group_size K")


@pytest.mark.gpu
def test_misaligned_views():
    # Contiguous views that start 2 bytes (x) or 1 byte (qweight) into their storage: x is
    # staged element by element, an int4 qweight is copied, int8 takes the scalar path.
    m, n, k = 3, 40, 256
    x = torch.randn(m * k + 1, dtype=torch.float16, device="cuda")[1:].view(m, k)
    qw, s, z, deq = quantize_int4(torch.randn(n, k, device="cuda"), 64, True)
    qw_view = torch.empty(n * k // 2 + 1, dtype=torch.uint8, device="cuda")[1:].view(n, k // 2)
    qw_view.copy_(qw)
    _check(x, qw_view, s, z, 4, 64, deq, "int4 misaligned")
    q8, s8, deq8 = quantize_int8(torch.randn(n, k, device="cuda"))
    q8_view = torch.empty(n * k + 1, dtype=torch.int8, device="cuda")[1:].view(n, k)
    q8_view.copy_(q8)
    _check(x, q8_view, s8, None, 8, 0, deq8, "int8 misaligned")


@pytest.mark.gpu
def test_no_columns_gives_empty_output():
    x = torch.randn(2, 64, dtype=torch.bfloat16, device="cuda")
    q = torch.empty(0, 64, dtype=torch.int8, device="cuda")
    y = _op()(x, q, torch.empty(0, device="cuda"), None, 8, 0)
    assert y.shape == (2, 0) and y.dtype == torch.bfloat16


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    qw, s, z, deq = quantize_int4(torch.randn(300, 512, device="cuda"), 128, False)
    x = torch.randn(4, 512, dtype=torch.float16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = _op()(x, qw, s, z, 4, 128)
    torch.cuda.current_stream().wait_stream(stream)
    assert_policy(y, x.double() @ deq.t(), x @ deq.half().t())


# --- bad input --------------------------------------------------------------------------------


def _int4_args(m=2, n=5, k=128, group=64, dtype=torch.float16, device="cuda"):
    qw, s, z, _ = quantize_int4(torch.randn(n, k, device=device), group, True)
    x = torch.randn(m, k, dtype=dtype, device=device)
    return [x, qw, s, z, 4, group]


def _int8_args(m=2, n=5, k=128, dtype=torch.float16, device="cuda"):
    q, s, _ = quantize_int8(torch.randn(n, k, device=device))
    x = torch.randn(m, k, dtype=dtype, device=device)
    return [x, q, s, None, 8, 0]


def _half(*shape):
    return torch.randn(*shape, dtype=torch.float16, device="cuda")


def _with(args, **changes):
    names = ["x", "qweight", "scales", "zeros", "bits", "group_size"]
    out = list(args)
    for name, value in changes.items():
        out[names.index(name)] = value
    return out


@pytest.mark.gpu
def test_bad_input_names_the_argument():
    i4, i8 = _int4_args(), _int8_args()
    qw, s, z = i4[1:4]
    cases = [
        (_with(i8, x=_half(0, 128)), "x must have 1 to 8"),
        (_with(i8, x=_half(9, 128)), "x must have 1 to 8"),
        (_with(i8, x=i8[0].float()), "x must be float16 or bfloat16"),
        (_with(i8, x=i8[0].cpu()), "x must be a CUDA tensor"),
        (_with(i8, x=i8[0][0]), "x must be 2-D"),
        (_with(i8, x=_half(128, 2).t()), "x must be contiguous"),
        (_with(i8, bits=3), "bits must be 4 or 8"),
        (_with(i8, qweight=i8[1].view(torch.uint8)), "qweight must be int8"),
        (_with(i8, qweight=i8[1][:, :64]), "qweight must have shape"),
        (_with(i8, qweight=i8[1].cpu()), "qweight must be on"),
        (_with(i8, scales=i8[2].half()), "scales must be float32"),
        (_with(i8, scales=i8[2][:4]), "scales must have shape"),
        (_with(i8, zeros=torch.zeros_like(qw[:, :2])), "zeros must be None"),
        (_with(i4, group_size=16), "group_size must be 32, 64 or 128"),
        (_with(i4, x=_half(2, 96)), "multiple of group_size"),
        (_with(i4, qweight=qw.view(torch.int8)), "qweight must be uint8"),
        (_with(i4, qweight=qw[:, :32]), "qweight must have shape"),
        (_with(i4, qweight=qw.t().contiguous().t()), "qweight must be contiguous"),
        (_with(i4, scales=s.float()), "scales must be float16"),
        (_with(i4, scales=s[:, :1]), "scales must have shape"),
        (_with(i4, zeros=z.to(torch.int32)), "zeros must be uint8"),
        (_with(i4, zeros=z[:3]), "zeros must have shape"),
        (_with(i4, zeros=z.cpu()), "zeros must be on"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            _op()(*args)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_another_device_are_rejected():
    args = _int4_args()
    with pytest.raises(RuntimeError, match="scales must be on"):
        _op()(*_with(args, scales=args[2].to("cuda:1")))
