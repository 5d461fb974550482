"""The parallelism benchmark on CPU: two torchrun launches (1 and 2 gloo ranks) of a small
GPT; the collectives it counts against a tally of the tensors Megatron's scheme moves."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.models import create

VOCAB, BATCH, SEQLEN, STEPS = 96, 2, 16, 2


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    chosen = [bench.Layout(1), bench.Layout(2), bench.Layout(2, sp=True), bench.Layout(1, 2)]
    results, path = bench.report(
        True,
        torch.device("cpu"),
        out,
        chosen,
        size=("gpt2-tiny", VOCAB, BATCH, SEQLEN),
        steps=(1, STEPS),
    )
    return {r["layout"]: r for r in results}, path.read_text()


def expected(sp: bool) -> tuple[dict[str, int], int]:
    """Collectives and bytes of one training step of gpt2-tiny at tp=2 on one rank, tallied
    tensor by tensor (fp32): the embedding all-reduce, per block two regions (attention,
    MLP) each one collective in and one out both ways, the loss's row max and stacked sums
    and its hidden gradient; with sequence parallelism the stack's gather both ways and
    each block's four norm tensors (LayerNorm weight and bias, twice)."""
    c = create("gpt2-tiny", vocab_size=VOCAB).config
    h, n, t, rows = c.hidden_size, c.num_layers, BATCH * SEQLEN, BATCH * (SEQLEN - 1)
    act = t * h  # one (B, S, hidden) activation
    counts = {"all_reduce": 0, "all_gather_into_tensor": 0, "reduce_scatter_tensor": 0}
    elements = 0

    def add(kind: str, numel: int, times: int = 1) -> None:
        nonlocal elements
        counts[kind] += times
        elements += numel * times

    add("all_reduce", act)  # vocabulary-parallel embedding, forward
    add("all_reduce", rows)  # loss: row max
    add("all_reduce", 2 * rows)  # loss: sum of exponentials and target logit
    add("all_reduce", rows * h)  # loss: gradient of its hidden input, backward
    regions = 2 * n
    if sp:
        add("all_gather_into_tensor", act, 2 * regions)  # region input fwd, output grad bwd
        add("reduce_scatter_tensor", act, 2 * regions)  # region output fwd, input grad bwd
        add("all_gather_into_tensor", act, 2)  # stack output fwd, stack input grad bwd
        add("all_reduce", h, 4 * n)  # norm weight and bias gradients
    else:
        add("all_reduce", act, 2 * regions)  # region output fwd, input grad bwd
    return counts, 4 * elements


@pytest.mark.parametrize("sp", [False, True])
def test_tp2_collectives_and_bytes_match_the_tally(measured, sp):
    results, _ = measured
    r = results["tp=2+sp" if sp else "tp=2"]
    counts, nbytes = expected(sp)
    assert r["collectives"] == counts
    assert sum(r["collectives"].values()) > 0
    assert r["comm_bytes"] == nbytes == sum(r["comm_bytes_by_kind"].values())
    assert r["comm_bytes_formula"] == nbytes  # the docstring's closed form agrees
    assert r["dp_grad_bytes_computed"] == 0


def test_tp1_and_dp_issue_no_python_collectives(measured):
    results, _ = measured
    for name in ("tp=1", "dp=2"):
        assert sum(results[name]["collectives"].values()) == 0, name
        assert results[name]["comm_bytes"] == results[name]["comm_bytes_formula"] == 0
    # DDP's all-reduce (C++) is computed: every gradient of the fp32 model once.
    params = sum(p.numel() for p in create("gpt2-tiny", vocab_size=VOCAB).parameters())
    assert results["dp=2"]["dp_grad_bytes_computed"] == 4 * params
    assert results["dp=2"]["tokens_per_step"] == 2 * results["tp=1"]["tokens_per_step"]


def test_rates_are_positive_and_the_table_is_written(measured):
    results, text = measured
    assert results["tp=1"]["efficiency"] == pytest.approx(1.0)
    for name, r in results.items():
        assert len(r["step_ms_all"]) == STEPS and r["backend"] == "gloo", name
        for key in ("step_ms", "tokens_per_s", "efficiency"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key)
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_ms"] * 1e3)
        assert f"| {name} " in text
    assert "dp grad all-reduce MB (computed)" in text
