"""The LoRA benchmark: its cases on CPU, fastlm against PEFT on shared weights, QLoRA against
LoRA on the dequantized base, and the FLOPs and bytes formulas."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

CPU = torch.device("cpu")
# On a CPU: fastlm's torch backend and the same layers in plain PyTorch, per base format.
FASTLM = {"frozen base"} | {
    f"{who} {what}"
    for who in ("fastlm-torch", "torch")
    for what in ("LoRA", "QLoRA int4-g128", "QLoRA nf4")
}
HAS_PEFT = importlib.util.find_spec("peft") is not None


def _weights(hidden: int, depth: int) -> list[torch.Tensor]:
    return [torch.randn(hidden, hidden) / hidden**0.5 for _ in range(depth)]


def _adapters(model: torch.nn.Module) -> list[tuple[torch.nn.Linear, torch.nn.Linear]]:
    """(A, B) of every adapted layer, in layer order."""
    return [
        (m.lora_A["default"], m.lora_B["default"])
        for m in model.modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    ]


def _share_adapters(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """Give ``src`` a nonzero B (fresh adapters compute nothing) and copy A and B to ``dst``."""
    pairs_src, pairs_dst = _adapters(src), _adapters(dst)
    assert len(pairs_src) == len(pairs_dst) > 0
    with torch.no_grad():
        for (a, b), (a2, b2) in zip(pairs_src, pairs_dst, strict=True):
            b.weight.copy_(torch.randn(b.weight.shape) * 0.1)
            a2.weight.copy_(a.weight)
            b2.weight.copy_(b.weight)


def _grads(model: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """y, dx and every adapter's (dA, dB), from a fresh leaf copy of x."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = [(a.weight.grad.clone(), b.weight.grad.clone()) for a, b in _adapters(model)]
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _close(got, want, tol: float = 1e-5) -> None:
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < tol, err


def test_quick_cpu_cases_run(bench, monkeypatch):
    hidden, r, ms = 128, 4, (5, 9)
    monkeypatch.setitem(bench.SIZES, ("cpu", True), (hidden, (r,), ms))
    cases = list(bench.cases(True, CPU))
    providers = FASTLM | ({"PEFT LoRA"} if HAS_PEFT else set())
    ops = {f"lora fwd+bwd layer h={hidden} r={r}", f"lora fwd+bwd stack4 h={hidden} r={r}"}
    assert sorted((c.op, c.provider, c.shape) for c in cases) == sorted(
        (op, p, (hidden, r, m)) for op in ops for p in providers for m in ms
    )
    for case in cases:
        _, _, m = case.shape
        y = case.fn()
        assert y.shape == (m, hidden) and y.dtype == case.dtype == torch.float32, case.provider
        assert torch.isfinite(y).all(), case.provider
        assert case.fn().equal(y), case.provider  # gradients dropped: each step is the same
        assert case.flops > 0 and case.bytes_moved > 0


def test_full_cpu_sizes_sweep_rank_and_tokens(bench, monkeypatch):
    monkeypatch.setitem(bench.SIZES, ("cpu", False), (128, (2, 4), (3, 7)))
    cases = list(bench.cases(False, CPU))
    assert {c.shape for c in cases} == {(128, r, m) for r in (2, 4) for m in (3, 7)}
    assert {c.provider for c in cases} >= FASTLM


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
@pytest.mark.parametrize("depth", [1, 3])
def test_fastlm_lora_matches_peft_on_shared_weights(bench, depth):
    hidden, r, m = 128, 8, 11
    found = bench.providers(_weights(hidden, depth), r, torch.float32)
    fastlm, peft = found["fastlm-torch LoRA"].model, found["PEFT LoRA"].model
    _share_adapters(fastlm, peft)
    x, dy = torch.randn(m, hidden), torch.randn(m, hidden)
    y, dx, grads = _grads(fastlm, x, dy)
    y2, dx2, grads2 = _grads(peft, x, dy)
    base = found["frozen base"].model(x)
    assert (y - base).norm() > 1e-2 * base.norm()  # the adapters do contribute
    _close(y, y2)
    _close(dx, dx2)
    for (da, db), (da2, db2) in zip(grads, grads2, strict=True):
        _close(da, da2)
        _close(db, db2)


@pytest.mark.parametrize("what", ["LoRA", "QLoRA int4-g128", "QLoRA nf4"])
def test_cpu_pairs_compute_the_same_step(bench, what):
    # fastlm's torch path and the plain PyTorch layers it is timed against share weights
    # and run the same operations: the same output and gradients, bit for bit.
    hidden, r, m = 128, 4, 6
    found = bench.providers(_weights(hidden, 2), r, torch.float32)
    fastlm, plain = found[f"fastlm-torch {what}"].model, found[f"torch {what}"].model
    with torch.no_grad():
        for _, b in _adapters(fastlm):
            b.weight.copy_(torch.randn(b.weight.shape) * 0.1)
    x, dy = torch.randn(m, hidden), torch.randn(m, hidden)
    got = _grads(fastlm, x, dy)
    want = _grads(plain, x, dy)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", ["fastlm-torch QLoRA int4-g128", "fastlm-torch QLoRA nf4"])
def test_qlora_matches_lora_on_the_dequantized_base(bench, name):
    hidden, r, m, depth = 128, 4, 6, 2
    qlora = bench.providers(_weights(hidden, depth), r, torch.float32)[name].model
    dense = [layer.proj.base_layer.dequantize(torch.float32).weight for layer in qlora.layers]
    lora = bench.providers(dense, r, torch.float32)["fastlm-torch LoRA"].model
    _share_adapters(qlora, lora)
    x, dy = torch.randn(m, hidden), torch.randn(m, hidden)
    for got, want in zip(_grads(qlora, x, dy)[:2], _grads(lora, x, dy)[:2], strict=True):
        _close(got, want)


@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize(
    "provider", ["frozen base", "fastlm-torch LoRA", "torch LoRA", "PEFT LoRA"]
)
def test_flops_formula_counts_the_matmuls(bench, provider, depth):
    """The formula against the matmuls autograd actually runs on CPU (torch's counter)."""
    if provider == "PEFT LoRA" and not HAS_PEFT:
        pytest.skip("peft is not installed")
    hidden, r, m = 128, 4, 10
    p = bench.providers(_weights(hidden, depth), r, torch.float32)[provider]
    x = torch.randn(m, hidden, requires_grad=True)
    step = bench.train_step(p.model, x, torch.randn(m, hidden))
    with FlopCounterMode(display=False) as counter:
        step()
    assert p.r == (0 if provider == "frozen base" else r)
    assert counter.get_total_flops() == bench.lora_flops(m, hidden, hidden, p.r, depth)
    # Independently: a base GEMM forward and its dX, plus six rank-r GEMMs per layer.
    per_layer = 2 * (2 * m * hidden * hidden) + (6 * m * r * 2 * hidden if p.r else 0)
    assert bench.lora_flops(m, hidden, hidden, p.r, depth) == depth * per_layer


def test_bytes_formula(bench, monkeypatch):
    h, r, m, depth = 128, 4, 9, bench.DEPTH
    found = bench.providers(_weights(h, depth), r, torch.float32)
    assert (
        found["frozen base"].weight_bytes
        == found["fastlm-torch LoRA"].weight_bytes
        == depth * h * h * 4
    )
    # Packed nibbles and per group an fp16 scale (int4 also a uint8 zero point).
    assert found["fastlm-torch QLoRA int4-g128"].weight_bytes == depth * (
        h * h // 2 + h * h // 128 * 3
    )
    assert found["fastlm-torch QLoRA nf4"].weight_bytes == depth * (h * h // 2 + h * h // 64 * 2)

    monkeypatch.setitem(bench.SIZES, ("cpu", True), (h, (r,), (m,)))
    by_key = {(c.op.split()[2], c.provider): c for c in bench.cases(True, CPU)}
    base, lora = by_key[("layer", "frozen base")], by_key[("layer", "fastlm-torch LoRA")]
    # Weight read forward and backward; x, y, dy, dx.
    assert base.bytes_moved == 2 * h * h * 4 + 4 * m * h * 4
    # Plus A and B read twice and their gradients written; x re-read; t written and read.
    assert lora.bytes_moved == base.bytes_moved + (3 * r * 2 * h + m * h + 2 * m * r) * 4
    stack = by_key[("stack4", "fastlm-torch QLoRA int4-g128")]
    assert (
        stack.bytes_moved
        == 2 * depth * (h * h // 2 + h * h // 128 * 3)
        + depth * (4 * m * h + 3 * r * 2 * h + m * h + 2 * m * r) * 4
    )
