"""Distributed checks run under ``torchrun`` by tests/distributed/test_parallel.py (one
process per rank, gloo on CPU): ``python -m torch.distributed.run --standalone
--nproc_per_node N tests/distributed/tp_checks.py <check>``. Every rank builds the same
full model as a single-process reference and compares: outputs, losses over training
steps, updated parameters (each rank's shard against the same slice of the reference) and
the number of collectives per step. A failure raises, and the rank exits non-zero."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastlm.models import create
from fastlm.parallel import (
    check_consistent,
    clip_grad_norm_,
    parallelize,
    tensor_parallel,
    unwrap,
)
from fastlm.parallel.comm import CollectiveCounter
from fastlm.parallel.layers import Owned, Shard

VOCAB = 96
# Dropout off (replicas cannot share masks with the single process), fp32.
MODELS = {
    "gpt": ("gpt2-tiny", {}),
    "llama": ("llama-tiny", {}),  # GQA: 4 query heads, 2 key/value heads; untied head
    "llama-kv1": ("llama-tiny", {"num_kv_heads": 1}),  # 1 kv head shared by the ranks
    "bert": ("bert-tiny", {"attention_dropout": 0.0}),
    "t5": ("t5-tiny", {}),
}
TOL = dict(rtol=2e-5, atol=2e-6)
STEPS, LR = 5, 1e-3
# AdamW's normalized update turns last-bit differences in near-zero gradients into steps of
# up to LR: updated parameters agree within 1% of one step.
PARAM_TOL = dict(rtol=2e-5, atol=LR * 1e-2)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)  # the same full weights on every rank
    name, extra = MODELS[kind]
    return create(name, vocab_size=VOCAB, dropout=0.0, **extra)


def batch(kind: str, rows: int = 4, seqlen: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (rows, seqlen), generator=g)
    if kind == "bert":
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        masked = ids.clone()
        masked[:, ::3] = 2
        padded = torch.ones_like(ids).index_fill_(1, torch.tensor([7]), 0)
        return {"input_ids": masked, "labels": labels, "attention_mask": padded}
    if kind == "t5":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (rows, 4), generator=g)}
    return {"input_ids": ids, "labels": ids}


def expect_local(local: torch.Tensor, full: torch.Tensor, spec, rank: int, name: str,
                 tol: dict = TOL) -> float:  # fmt: skip
    """``local`` (this rank's tensor) against the reference's ``full`` one; returns the
    largest absolute difference."""
    if isinstance(spec, Shard):
        full = full.index_select(spec.dim, spec.index)
    elif isinstance(spec, Owned) and rank != 0:
        full = torch.zeros_like(full)
    torch.testing.assert_close(local, full, **tol, msg=lambda m: f"{name}: {m}")
    return float((local - full).abs().max()) if local.numel() else 0.0


def compare_params(par: nn.Module, ref: nn.Module) -> float:
    inner = unwrap(par)
    layout = getattr(inner, "tp_layout", None)
    specs = layout.specs if layout else {}
    rank = layout.rank if layout else 0
    local = dict(inner.named_parameters())
    return max(expect_local(local[name].detach(), p.detach(), specs.get(name), rank, name,
                            PARAM_TOL) for name, p in ref.named_parameters())  # fmt: skip


def train_both(ref: nn.Module, par: nn.Module, data: dict, mine: slice) -> dict[str, float]:
    """STEPS AdamW steps with gradient clipping: the reference on the whole batch, the
    parallel model on its data-parallel share ``mine`` of it; losses and parameters
    equal. Returns the largest differences (losses, parameters after the last step)."""
    loss_error = 0.0
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=LR, eps=1e-6)
    opt_par = torch.optim.AdamW([p for p in par.parameters() if p.requires_grad], lr=LR,
                                eps=1e-6)  # fmt: skip
    ref.train()
    par.train()
    for step in range(STEPS):
        loss_ref = ref(**data).loss
        loss_ref.backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_ref.step()
        opt_ref.zero_grad()
        loss = par(**{k: v[mine] for k, v in data.items()}).loss
        loss.backward()
        norm = clip_grad_norm_(par, 0.5)
        opt_par.step()
        opt_par.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()  # over tp ranks (equal) and dp replicas (shares)
        where = f"step {step}"
        torch.testing.assert_close(mean, loss_ref.detach(), **TOL,
                                   msg=lambda m, w=where: f"loss, {w}: {m}")  # fmt: skip
        torch.testing.assert_close(norm, norm_ref, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, w=where: f"gradient norm, {w}: {m}")  # fmt: skip
        loss_error = max(loss_error, float((mean - loss_ref).abs()))
    return {"train_loss": loss_error, "params": compare_params(par, ref)}


def outputs_match(ref: nn.Module, par: nn.Module, data: dict) -> dict[str, float]:
    ref.eval()
    par.eval()
    with torch.no_grad():
        out_ref, out_par = ref(**data, return_logits=True), par(**data, return_logits=True)
    torch.testing.assert_close(out_par.logits, out_ref.logits, **TOL, msg="logits")
    torch.testing.assert_close(out_par.loss, out_ref.loss, **TOL, msg="loss")
    return {"logits": float((out_par.logits - out_ref.logits).abs().max())}


def report(kind: str, layout: str, errors: dict[str, float]) -> None:
    """One line of the parity table (largest absolute differences), from global rank 0."""
    if dist.get_rank() == 0:
        print("PARITY", json.dumps({"model": kind, "layout": layout, **errors}), flush=True)


def expected_collectives(kind: str, model: nn.Module, sp: bool, tp: int) -> dict[str, int]:
    """Collectives of one forward + backward in training, from Megatron's accounting:
    each attention or MLP region costs one all-reduce forward and one backward (or, with
    sequence parallelism, an all-gather and a reduce-scatter each way); each embedding
    lookup one all-reduce forward; the vocabulary-parallel loss two forward and one
    backward; cross-attention one more backward (its encoder input); key/value heads
    shared by ranks one more backward per attention; under sequence parallelism each
    stack one all-gather each way and one all-reduce per norm parameter backward."""
    c = model.config
    if kind == "t5":
        attn = mlp = c.num_layers + c.num_decoder_layers
        cross = c.num_decoder_layers
        lookups, stacks = 2, 2
        norms = c.num_layers * 2 + c.num_decoder_layers * 3  # RMSNorm: one weight each
    else:
        attn = mlp = c.num_layers
        cross, lookups, stacks = 0, 1, 1
        norms = c.num_layers * (2 if kind.startswith("llama") else 4)  # RMSNorm: no bias
    regions = attn + cross + mlp
    shared_kv = attn if getattr(c, "num_kv_heads", tp) < tp else 0
    all_reduce = lookups + 2 + 1 + cross + shared_kv
    if not sp:
        return {"all_reduce": all_reduce + 2 * regions}
    return {"all_reduce": all_reduce + norms,
            "all_gather_into_tensor": 2 * regions + 2 * stacks,
            "reduce_scatter_tensor": 2 * regions}  # fmt: skip


# -- checks -----------------------------------------------------------------------------------


def layers(rank: int) -> None:
    """The standalone layers: column then row-parallel MLP, vocabulary-parallel embedding
    and cross-entropy (bf16 logits too), against their full twins."""
    from fastlm.parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        vocab_parallel_cross_entropy,
    )

    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(12, 16), nn.Linear(16, 12)
    x = torch.randn(5, 12, requires_grad=True)
    ref = fc2(F.gelu(fc1(x)))
    ref.sum().backward()
    grads = {"w1": fc1.weight.grad, "w2": fc2.weight.grad, "b2": fc2.bias.grad}
    x_tp = x.detach().clone().requires_grad_()
    col, row = ColumnParallelLinear(_copy(fc1)), RowParallelLinear(_copy(fc2))  # cut in place
    y = row(F.gelu(col(x_tp)))
    y.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x_tp.grad, x.grad)
    half = slice(8 * rank, 8 * rank + 8)
    torch.testing.assert_close(col.weight.grad, grads["w1"][half])
    torch.testing.assert_close(row.weight.grad, grads["w2"][:, half])
    if rank == 0:  # the bias is added once, by rank 0
        torch.testing.assert_close(row.bias.grad, grads["b2"])
    else:
        assert row.bias.grad is None and not row.bias.any()

    emb = nn.Embedding(10, 6, padding_idx=7)
    ids = torch.randint(0, 10, (3, 4))
    ids[0, 0] = 7
    ref = emb(ids)
    ref.square().sum().backward()
    par = VocabParallelEmbedding(_copy(emb))
    out = par(ids)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(par.weight.grad, emb.weight.grad[5 * rank : 5 * rank + 5])

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(7, 10, dtype=dtype, requires_grad=True)
        target = torch.randint(0, 10, (7,))
        target[2] = -100
        ref = F.cross_entropy(logits.float(), target)
        ref.backward()
        local = logits.detach()[:, 5 * rank : 5 * rank + 5].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, 5 * rank)
        loss.backward()
        torch.testing.assert_close(loss, ref)
        assert local.grad.dtype == dtype
        torch.testing.assert_close(local.grad, logits.grad[:, 5 * rank : 5 * rank + 5])


def lora_and_quant(rank: int) -> None:
    """LoRA adapters (on float and quantized bases) and quantized linears keep working
    under tensor parallelism: outputs and adapter gradients equal the full model's."""
    from fastlm.peft import apply_lora
    from fastlm.quant import quantize_

    for quantized in (False, True):
        for kind in ("gpt", "llama"):
            ref = build(kind)
            if quantized:
                quantize_(ref, bits=4, group_size=32, include=["*mlp*"])
            apply_lora(ref, r=4, target_modules=["qkv", "o", "fc1", "fc2", "up_proj",
                                                 "down_proj"])  # fmt: skip
            for p in ref.parameters():  # B is zero at first: give it values to test
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.05)
            par = tensor_parallel(_copy(ref))
            data = batch(kind)
            outputs_match(ref, par, data)
            for m in (ref, par):
                m.train()
                m(**data).loss.backward()
            local = dict(par.named_parameters())
            for name, p in ref.named_parameters():
                if p.grad is not None:
                    expect_local(local[name].grad, p.grad, par.tp_layout.specs.get(name), rank,
                                 f"{kind} quantized={quantized} grad {name}")  # fmt: skip


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def models(rank: int) -> None:
    """tp=2 on 2 ranks, with and without sequence parallelism: eval logits, greedy
    generation with the KV cache, 5 AdamW steps (losses, gradient norms, parameters) and
    the collectives of one step."""
    for kind in ("gpt", "llama", "llama-kv1", "bert", "t5"):
        for sp in (False, True):
            ref, par = build(kind), tensor_parallel(build(kind), sequence_parallel=sp)
            data = batch(kind)
            errors = outputs_match(ref, par, data)
            if kind != "bert":
                prompt = data["input_ids"][:2, :5]
                assert torch.equal(par.generate(prompt, 6), ref.generate(prompt, 6)), kind
            par.train()
            with CollectiveCounter() as counter:
                par(**data).loss.backward()
            par.zero_grad()
            expected = expected_collectives(kind, ref, sp, 2)
            assert dict(counter.calls) == expected, (kind, sp, dict(counter.calls), expected)
            errors.update(train_both(ref, par, data, slice(None)))
            report(kind, "tp=2 + sequence parallel" if sp else "tp=2", errors)


def data_parallel(rank: int) -> None:
    """dp=2 on 2 ranks: each replica trains on its half of the batch."""
    for kind in ("gpt", "bert", "t5"):
        ref = build(kind)
        par, mesh = parallelize(build(kind), tp_size=1)
        dp = mesh.get_local_rank("dp")
        report(kind, "dp=2", train_both(ref, par, batch(kind), slice(2 * dp, 2 * dp + 2)))


def mesh_2x2(rank: int) -> None:
    """4 ranks: tp=2 x dp=2 (GPT, BERT, T5; T5 with sequence parallelism), then tp=4 with
    2 key/value heads each shared by 2 ranks."""
    for kind, sp in (("gpt", False), ("bert", False), ("t5", True)):
        ref = build(kind)
        par, mesh = parallelize(build(kind), tp_size=2, sequence_parallel=sp)
        dp = mesh.get_local_rank("dp")
        errors = train_both(ref, par, batch(kind), slice(2 * dp, 2 * dp + 2))
        report(kind, f"tp=2 x dp=2{' + sequence parallel' if sp else ''}", errors)
    ref, par = build("llama"), tensor_parallel(build("llama"))
    errors = outputs_match(ref, par, batch("llama"))
    errors.update(train_both(ref, par, batch("llama"), slice(None)))
    report("llama", "tp=4 (2 kv heads, each on 2 ranks)", errors)


def desync(rank: int) -> None:
    """Ranks holding different models fail at start-up with the difference named."""
    model = create("gpt2-tiny", vocab_size=VOCAB, num_layers=2 + rank)
    try:
        tensor_parallel(model)
    except ValueError as e:
        assert "ranks hold different models (config)" in str(e), e
    else:
        raise AssertionError("ranks with different models were not detected")
    same = create("gpt2-tiny", vocab_size=VOCAB)
    try:  # the same model, different training configs
        check_consistent(same, extra={"lr": 1e-3 * (rank + 1)})
    except ValueError as e:
        assert "(extra)" in str(e) and "0.002" in str(e), e
    else:
        raise AssertionError("ranks with different configs were not detected")


def reshard(rank: int) -> None:
    """Checkpoints load at another tensor-parallel size: each checkpoint directory in
    $FASTLM_CHECKPOINTS (one written at tp=2, one on one device) is loaded into a tp=2
    model; rank 0 saves the logits of fixed ids beside it for the test to compare with
    the single-device load."""
    from fastlm.parallel.checkpoint import load_sharded
    from fastlm.train.run import model_of

    for path in os.environ["FASTLM_CHECKPOINTS"].split(os.pathsep):
        model = tensor_parallel(model_of(path))
        load_sharded(model, path)
        ids = torch.arange(24).reshape(2, 12) % model.config.vocab_size
        with torch.no_grad():
            logits = model.eval()(ids).logits
        if rank == 0:
            torch.save(logits, os.path.join(path, "tp2_logits.pt"))


CHECKS = {
    "layers": layers,
    "lora_and_quant": lora_and_quant,
    "models": models,
    "data_parallel": data_parallel,
    "mesh_2x2": mesh_2x2,
    "desync": desync,
    "reshard": reshard,
}

if __name__ == "__main__":
    # Every collective times out (a hung rank fails the check instead of the test run).
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        for name in sys.argv[1:]:
            CHECKS[name](dist.get_rank())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold work objects with
    # Python references then, and tearing those down aborts the process ("terminate called
    # without an active exception", about 1 run in 6 here; pytorch/pytorch#190489, #179291).
    sys.stdout.flush()
    os._exit(0)
