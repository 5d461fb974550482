"""The parallelism benchmark on CPU: three torchrun launches (1, 2 and 4 gloo ranks) of a
small GPT; the collectives it counts against a tally of the tensors Megatron's scheme moves,
the memory per rank against a tally of the tensors each layout holds; and the predicted
FSDP fit against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from fastlm.models import create

VOCAB, BATCH, SEQLEN, STEPS = 96, 2, 16, 2
TINY = create("gpt2-tiny", vocab_size=VOCAB)
PARAMS = sum(p.numel() for p in TINY.parameters())
TENSORS = len(list(TINY.parameters()))
BLOCK = sum(p.numel() for p in TINY.blocks[0].parameters())


@pytest.fixture(scope="module")
def measured(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    chosen = [
        bench.Layout(1),
        bench.Layout(2),
        bench.Layout(2, sp=True),
        bench.Layout(1, 2),
        bench.Layout(1, 2, fsdp=True),
        bench.Layout(1, 4),
        bench.Layout(1, 4, fsdp=True, dp_replicate=2),
        bench.Layout(2, 2, fsdp=True),
    ]
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


@pytest.mark.parametrize("name", ["tp=2", "tp=2+sp", "tp=2 x fsdp=2"])
def test_tp2_collectives_and_bytes_match_the_tally(measured, name):
    results, _ = measured
    r = results[name]
    counts, nbytes = expected(name.endswith("+sp"))
    # FSDP's own collectives are PyTorch's, not counted (in any torch version).
    assert r["collectives"] == counts
    assert sum(r["collectives"].values()) > 0
    assert r["comm_bytes"] == nbytes == sum(r["comm_bytes_by_kind"].values())
    assert r["comm_bytes_formula"] == nbytes  # the docstring's closed form agrees
    assert r["dp_grad_bytes_computed"] == (None if r["fsdp"] else 0)


def test_hsdp_replica_all_reduce_is_computed_from_the_shards(measured):
    results, _ = measured
    r = results["HSDP 2x2"]
    # FSDP's collectives are not counted; across the replicas it all-reduces, in fp32, the
    # half of every gradient its shard group of two holds (every dimension 0 of gpt2-tiny
    # is even): computed.
    assert sum(r["collectives"].values()) == 0
    assert r["comm_bytes"] == r["comm_bytes_formula"] == 0
    assert r["dp_grad_bytes_computed"] == 4 * PARAMS // 2


def test_tp1_and_dp_issue_no_python_collectives(measured):
    results, _ = measured
    for name in ("tp=1", "dp=2"):
        assert sum(results[name]["collectives"].values()) == 0, name
        assert results[name]["comm_bytes"] == results[name]["comm_bytes_formula"] == 0
    # DDP's all-reduce (C++) is computed: every gradient of the fp32 model once.
    assert results["dp=2"]["dp_grad_bytes_computed"] == 4 * PARAMS
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


def test_memory_per_rank_matches_the_tally_of_tensors(measured):
    results, text = measured
    # One process, fp32: parameters, gradients, AdamW's two moments, and a 4-byte step
    # per parameter tensor.
    single = {
        "params": 4 * PARAMS,
        "grads": 4 * PARAMS,
        "optimizer": 8 * PARAMS + 4 * TENSORS,
        "total": 16 * PARAMS + 4 * TENSORS,
    }
    assert results["tp=1"]["memory"] == single
    for name in ("dp=2", "dp=4"):  # DDP: a whole copy on every rank
        assert results[name]["memory"] == single, name
    # fsdp=2 and HSDP 2x2 shard over two ranks: half of every tensor but the steps.
    half = {
        "params": 2 * PARAMS,
        "grads": 2 * PARAMS,
        "optimizer": 4 * PARAMS + 4 * TENSORS,
        "total": 8 * PARAMS + 4 * TENSORS,
    }
    for name in ("fsdp=2", "HSDP 2x2"):
        assert results[name]["memory"] == half, name
    assert results["tp=2 x fsdp=2"]["memory"]["total"] < half["total"]
    working_set = 2 * 4 * BLOCK  # one block's fp32 parameters and gradients
    for name, r in results.items():
        assert r["block_working_set_bytes"] == working_set, name
        goal = single["total"] / r["world"] + working_set
        assert r["memory_goal"] == pytest.approx(goal), name
        assert r["memory_vs_goal"] == pytest.approx(r["memory"]["total"] / goal), name
    assert results["fsdp=2"]["memory_vs_goal"] < 1 < results["dp=2"]["memory_vs_goal"]
    assert "| total MB (max rank) |" in text and "| goal MB (1/N + block) |" in text


def test_fully_sharded_step_time_is_put_against_ddp_at_its_world_size(measured):
    results, text = measured
    for name, ddp in (("fsdp=2", "dp=2"), ("HSDP 2x2", "dp=4"), ("tp=2 x fsdp=2", "dp=4")):
        ratio = results[name]["step_ms"] / results[ddp]["step_ms"]
        assert results[name]["step_vs_ddp"] == pytest.approx(ratio), name
        assert f"| {name} " in text
    for name in ("tp=1", "tp=2", "dp=2", "dp=4"):
        assert results[name]["step_vs_ddp"] is None, name
    assert "| step / DDP step |" in text


def test_fsdp_fit_of_llama_7b_matches_a_hand_computation(bench):
    llama_7b = next(shape for shape, _ in bench.FIT_MODELS if shape.name == "llama-7B")
    # Parameters: per block q, k, v, o (4 x 4096^2), gate, up, down (3 x 4096 x 11008)
    # and two norms; the embedding and the untied head (2 x 32000 x 4096) and the final norm.
    block = 4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096
    root = 2 * 32000 * 4096 + 4096
    assert (block, root) == (202_383_360, 262_148_096)
    assert llama_7b.params == 32 * block + root == 6_738_415_616  # Llama-2-7B's count
    # 8 GPUs, activation checkpointing, no offload, 4096 tokens per sequence.
    state = 16 * 6_738_415_616 // 8  # fp32 master, gradient and AdamW, sharded
    working_set = 4 * root + 2 * 8 * block  # root in bf16 with its grads; two blocks
    layer = 12 * 4096 + 4 * 4096 + 6 * 11008 + 4 * 32  # 131_712 bytes per token
    per_token = 32 * 2 * 4096 + layer + 4 * 32000  # block inputs, one block, fp32 logits
    assert bench.fsdp_memory(llama_7b, 8, 4096, True, False) == (
        state + working_set,
        4096 * per_token,
    )
    # (72e9 - 17_763_557_376) / 2_137_522_176 = 25.4 sequences
    assert bench.fsdp_fit(llama_7b, 8, 4096, True, False) == 25
    llama_70b = next(shape for shape, _ in bench.FIT_MODELS if shape.name == "llama-70B")
    # 16 bytes x 70.6e9 parameters / 8 GPUs = 141 GB of state alone
    assert bench.fsdp_fit(llama_70b, 8, 2048, True, False) == 0
    table = bench.fit_markdown()
    assert "predicted" in table.splitlines()[0]
    assert "| llama-7B | 6.74 B | 8 | yes | no | 17.8 | 50 | 25 | - |" in table
    assert "| llama-70B | 70.55 B | 8 | yes | no | 163.2 | does not fit |" in table


def test_fit_flag_prints_the_predicted_table_without_torchrun(bench, capsys):
    assert bench.main(["--fit"]) == 0
    assert capsys.readouterr().out == bench.fit_markdown()
