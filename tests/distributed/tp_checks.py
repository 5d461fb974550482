"""Distributed checks run under ``torchrun`` by tests/distributed/test_parallel.py (one
process per rank, gloo on CPU): ``python -m torch.distributed.run --standalone
--nproc_per_node N tests/distributed/tp_checks.py <check>``. Every rank builds the same
full model as a single-process reference and compares: outputs, losses over training
steps, updated parameters (each rank's shard against the same slice of the reference) and
the number of collectives per step. A failure raises, and the rank exits non-zero.

Tolerances follow from the computation: each reference also runs as its float64 twin, and a
parallel float32 result may be off from the twin by FACTOR x the float32 reference's own
error there (the same precision, summed in another order on each rank), plus one float32
rounding at the result's scale: the numerical policy of fastlm.testing.assert_policy
(DESIGN.md). A failure prints the values, their difference and what was allowed."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from fastlm.models import create
from fastlm.parallel import (
    check_consistent,
    clip_grad_norm_,
    data_parallel_layout,
    fsdp_rows,
    local,
    parallelize,
    tensor_parallel,
    unwrap,
)
from fastlm.parallel.comm import CollectiveCounter
from fastlm.parallel.layers import Owned, Shard
from fastlm.testing import assert_policy, assert_within, max_error

VOCAB = 96
# Dropout off (replicas cannot share masks with the single process), fp32.
MODELS = {
    "gpt": ("gpt2-tiny", {}),
    "llama": ("llama-tiny", {}),  # GQA: 4 query heads, 2 key/value heads; untied head
    "llama-kv1": ("llama-tiny", {"num_kv_heads": 1}),  # 1 kv head shared by the ranks
    # Soft caps, sandwich (1 + weight) norms, a window crossed by the 8-token batches.
    "gemma2": ("gemma2-tiny", {"sliding_window": 4}),
    "bert": ("bert-tiny", {"attention_dropout": 0.0}),
    "t5": ("t5-tiny", {}),
}
STEPS, LR = 5, 1e-3
FACTOR = 2.0
EPS = torch.finfo(torch.float32).eps


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


def float64_twin(model: nn.Module) -> nn.Module:
    return _copy(model).double()


def slice_of(full: torch.Tensor, spec, rank: int, held: torch.Tensor | None = None):
    """What this rank holds of the reference's ``full`` tensor under ``spec`` (and, when
    ``held``, the parallel tensor, is FSDP-sharded, the rows of it FSDP left here)."""
    if isinstance(spec, Shard):
        full = full.index_select(spec.dim, spec.index)
    elif isinstance(spec, Owned) and rank != 0:
        full = torch.zeros_like(full)
    if held is not None and held.dim():
        full = full[slice(*fsdp_rows(held))]
    return full


def scale_of(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def expect_loss(loss: torch.Tensor, out32, out64, name: str) -> None:
    """A mean cross-entropy moves at most twice as far as its worst logit (its gradient in
    the logits, softmax minus one-hot, has absolute values summing to at most 2), so it is
    allowed twice the logits' allowance, plus its own rounding."""
    logits = FACTOR * max_error(out32.logits, out64.logits) + EPS * scale_of(out64.logits)
    assert_within(
        loss,
        out64.loss,
        2 * logits + EPS * abs(float(out64.loss)),
        name,
        f"2 x the logits' {logits:.3e} + one rounding",
    )


def compare_params(par: nn.Module, ref: nn.Module, ref64: nn.Module, label: str) -> float:
    """The parameters this rank holds against the same slices of the float64 twin's, in
    2-norm over all of them: at most FACTOR x the float32 reference's, plus one rounding of
    each. (AdamW's normalized step turns the rounding of a near-zero gradient into an error
    of the order of the step, so single elements are noisy; their sum is the stable
    measure.) Returns the largest difference from the float32 reference."""
    inner = unwrap(par)
    layout = getattr(inner, "tp_layout", None)
    specs = layout.specs if layout else {}
    rank = layout.rank if layout else 0
    held, ref32 = dict(inner.named_parameters()), dict(ref.named_parameters())
    errors, worst = {}, 0.0
    for name, p in ref64.named_parameters():
        mine = local_part(held[name])
        full, p32 = (
            slice_of(t.detach(), specs.get(name), rank, held[name]) for t in (p, ref32[name])
        )
        errors[name] = [float((t.double() - full).norm()) for t in (mine, p32)]
        errors[name].append(float(full.norm()))
        worst = max(worst, max_error(mine, p32))
    got, own, size = (math.hypot(*column) for column in zip(*errors.values(), strict=True))
    allowed = FACTOR * own + EPS * size
    if not got <= allowed:
        top = sorted(errors.items(), key=lambda item: -item[1][0])[:3]
        raise AssertionError(
            f"{label}: parameters after {STEPS} steps are {got:.3e} (2-norm) from the float64 "
            f"reference's, allowed {allowed:.3e} (= {FACTOR:g} x the float32 reference's "
            f"{own:.3e} + one rounding {EPS * size:.3e}); largest: "
            + ", ".join(f"{n} {e[0]:.3e} (float32 reference {e[1]:.3e})" for n, e in top)
        )
    return worst


def local_part(t: torch.Tensor) -> torch.Tensor:
    return local(t).detach()


def gradient_error(ref: nn.Module, ref64: nn.Module) -> float:
    """The 2-norm of the float32 reference's gradients minus its float64 twin's."""
    total = 0.0
    for p, p64 in zip(ref.parameters(), ref64.parameters(), strict=True):
        if p.grad is not None:
            total += float((p.grad.double() - p64.grad).square().sum())
    return math.sqrt(total)


def train_both(
    ref: nn.Module, par: nn.Module, data: dict, mine: slice, label: str
) -> dict[str, float]:
    """STEPS AdamW steps with gradient clipping: the reference and its float64 twin on the
    whole batch, the parallel model on its data-parallel share ``mine`` of it; each step's
    loss and gradient norm, then the updated parameters, against the twin's. Returns the
    largest differences from the float32 reference (losses, parameters after the last
    step), each name prefixed with ``label``."""
    loss_error = 0.0
    refs = (ref, float64_twin(ref))
    opts = [torch.optim.AdamW(m.parameters(), lr=LR, eps=1e-6) for m in refs]
    trained = [p for p in par.parameters() if p.requires_grad]
    opt_par = torch.optim.AdamW(trained, lr=LR, eps=1e-6)
    for m in (*refs, par):
        m.train()
    for step in range(STEPS):
        outs = [m(**data, return_logits=True) for m in refs]
        for out in outs:
            out.loss.backward()
        grad_error = gradient_error(*refs)
        norms = [torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5) for m in refs]
        for opt in opts:
            opt.step()
            opt.zero_grad()
        loss = par(**{k: v[mine] for k, v in data.items()}).loss
        loss.backward()
        norm = clip_grad_norm_(par, 0.5)
        opt_par.step()
        opt_par.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()  # over tp ranks (equal) and dp replicas (shares)
        expect_loss(mean, *outs, f"{label}: loss, step {step}")
        # | |g| - |g64| | <= |g - g64|: the gradients' error, FACTOR x the reference's.
        assert_within(
            norm,
            norms[1],
            FACTOR * grad_error + EPS * float(norms[1]),
            f"{label}: gradient norm, step {step}",
            f"{FACTOR:g} x the float32 reference's "
            f"gradient error {grad_error:.3e} (2-norm) + one rounding",
        )
        loss_error = max(loss_error, float((mean - outs[0].loss).abs()))
    return {"train_loss": loss_error, "params": compare_params(par, *refs, label)}


def outputs_match(ref: nn.Module, par: nn.Module, data: dict, label: str) -> dict[str, float]:
    """Eval logits and loss against the float64 twin's; returns the largest logit difference
    from the float32 reference."""
    outs = []
    for model in (ref, par, float64_twin(ref)):
        model.eval()
        with torch.no_grad():
            outs.append(model(**data, return_logits=True))
    out32, out_par, out64 = outs
    assert_policy(out_par.logits, out64.logits, out32.logits, f"{label}: logits", FACTOR)
    expect_loss(out_par.loss, out32, out64, f"{label}: loss")
    return {"logits": max_error(out_par.logits, out32.logits)}


def expect_like_full(got: dict[str, torch.Tensor], full) -> None:
    """Each result in ``got`` against ``full(torch.float64)``'s (the unsplit computation in
    float64), within the numerical policy given ``full(torch.float32)``'s."""
    ref, ref64 = full(torch.float32), full(torch.float64)
    for key, value in got.items():
        assert_policy(value, ref64[key], ref[key], key, FACTOR)


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
        # LayerNorm: weight and bias; RMSNorm: a weight alone; Gemma 2: four RMSNorms a layer.
        norms = c.num_layers * (2 if kind.startswith("llama") else 4)
    regions = attn + cross + mlp
    shared_kv = attn if getattr(c, "num_kv_heads", tp) < tp else 0
    all_reduce = lookups + 2 + 1 + cross + shared_kv
    if not sp:
        return {"all_reduce": all_reduce + 2 * regions}
    return {
        "all_reduce": all_reduce + norms,
        "all_gather_into_tensor": 2 * regions + 2 * stacks,
        "reduce_scatter_tensor": 2 * regions,
    }


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
    x = torch.randn(5, 12)
    half = slice(8 * rank, 8 * rank + 8)

    def full_mlp(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        f1, f2, xr = (
            _copy(fc1).to(dtype),
            _copy(fc2).to(dtype),
            x.to(dtype, copy=True).requires_grad_(),
        )
        y = f2(F.gelu(f1(xr)))
        y.sum().backward()
        return {
            "mlp output": y.detach(),
            "mlp input grad": xr.grad,
            "fc1 weight grad": f1.weight.grad[half],
            "fc2 weight grad": f2.weight.grad[:, half],
            "fc2 bias grad": f2.bias.grad,
        }

    x_tp = x.clone().requires_grad_()
    col, row = ColumnParallelLinear(_copy(fc1)), RowParallelLinear(_copy(fc2))  # cut in place
    y = row(F.gelu(col(x_tp)))
    y.sum().backward()
    got = {
        "mlp output": y.detach(),
        "mlp input grad": x_tp.grad,
        "fc1 weight grad": col.weight.grad,
        "fc2 weight grad": row.weight.grad,
    }
    if rank == 0:  # the bias is added once, by rank 0
        got["fc2 bias grad"] = row.bias.grad
    else:
        assert row.bias.grad is None and not row.bias.any()
    expect_like_full(got, full_mlp)

    emb = nn.Embedding(10, 6, padding_idx=7)
    ids = torch.randint(0, 10, (3, 4))
    ids[0, 0] = 7
    mine = slice(5 * rank, 5 * rank + 5)

    def full_embedding(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        e = _copy(emb).to(dtype)
        out = e(ids)
        out.square().sum().backward()
        return {"embedding output": out.detach(), "embedding grad": e.weight.grad[mine]}

    par = VocabParallelEmbedding(_copy(emb))
    out = par(ids)
    out.square().sum().backward()
    expect_like_full(
        {"embedding output": out.detach(), "embedding grad": par.weight.grad}, full_embedding
    )

    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(7, 10, dtype=dtype)
        target = torch.randint(0, 10, (7,))
        target[2] = -100

        names = (f"{dtype} loss", f"{dtype} logits grad")

        def full_loss(ref_dtype: torch.dtype, logits=logits, target=target, names=names) -> dict:
            # In float32, PyTorch's own: the loss in float32 of the logits in their dtype.
            twin = torch.float64 if ref_dtype == torch.float64 else logits.dtype
            leaf = logits.to(twin).clone().requires_grad_()
            loss = F.cross_entropy(leaf if twin == torch.float64 else leaf.float(), target)
            loss.backward()
            return dict(zip(names, (loss.detach(), leaf.grad[:, mine]), strict=True))

        local = logits[:, mine].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(local, target, 5 * rank)
        loss.backward()
        assert local.grad.dtype == dtype
        expect_like_full(dict(zip(names, (loss.detach(), local.grad), strict=True)), full_loss)


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
            apply_lora(ref, r=4, target_modules=["qkv", "o", "fc1", "fc2", "up_proj", "down_proj"])
            for p in ref.parameters():  # B is zero at first: give it values to test
                if p.requires_grad:
                    torch.nn.init.normal_(p, std=0.05)
            par = tensor_parallel(_copy(ref))
            data = batch(kind)
            outputs_match(ref, par, data, f"{kind} quantized={quantized}")
            ref64 = float64_twin(ref)
            for m in (ref, ref64, par):
                m.train()
                m(**data).loss.backward()
            held, ref32 = dict(par.named_parameters()), dict(ref.named_parameters())
            for name, p in ref64.named_parameters():
                if p.grad is not None:
                    spec = par.tp_layout.specs.get(name)
                    assert_policy(
                        held[name].grad,
                        slice_of(p.grad, spec, rank),
                        slice_of(ref32[name].grad, spec, rank),
                        f"{kind} quantized={quantized} grad {name}",
                        FACTOR,
                    )


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def models(rank: int) -> None:
    """tp=2 on 2 ranks, with and without sequence parallelism: eval logits, greedy
    generation with the KV cache, 5 AdamW steps (losses, gradient norms, parameters) and
    the collectives of one step."""
    for kind in ("gpt", "llama", "llama-kv1", "gemma2", "bert", "t5"):
        for sp in (False, True):
            ref, par = build(kind), tensor_parallel(build(kind), sequence_parallel=sp)
            data = batch(kind)
            layout = "tp=2 + sequence parallel" if sp else "tp=2"
            errors = outputs_match(ref, par, data, f"{kind} {layout}")
            if kind != "bert":
                prompt = data["input_ids"][:2, :5]
                assert torch.equal(par.generate(prompt, 6), ref.generate(prompt, 6)), kind
            par.train()
            with CollectiveCounter() as counter:
                par(**data).loss.backward()
            par.zero_grad()
            expected = expected_collectives(kind, ref, sp, 2)
            assert dict(counter.calls) == expected, (kind, sp, dict(counter.calls), expected)
            errors.update(train_both(ref, par, data, slice(None), f"{kind} {layout}"))
            report(kind, layout, errors)


def data_parallel(rank: int) -> None:
    """dp=2 on 2 ranks: each replica trains on its half of the batch."""
    for kind in ("gpt", "bert", "t5"):
        ref = build(kind)
        par, mesh = parallelize(build(kind), tp_size=1)
        dp = mesh.get_local_rank("dp")
        errors = train_both(ref, par, batch(kind), slice(2 * dp, 2 * dp + 2), f"{kind} dp=2")
        report(kind, "dp=2", errors)


def mesh_2x2(rank: int) -> None:
    """4 ranks: tp=2 x dp=2 (GPT, BERT, T5; T5 with sequence parallelism), then tp=4 with
    2 key/value heads each shared by 2 ranks."""
    for kind, sp in (("gpt", False), ("bert", False), ("t5", True)):
        ref = build(kind)
        par, mesh = parallelize(build(kind), tp_size=2, sequence_parallel=sp)
        dp = mesh.get_local_rank("dp")
        layout = f"tp=2 x dp=2{' + sequence parallel' if sp else ''}"
        errors = train_both(ref, par, batch(kind), slice(2 * dp, 2 * dp + 2), f"{kind} {layout}")
        report(kind, layout, errors)
    ref, par = build("llama"), tensor_parallel(build("llama"))
    layout = "tp=4 (2 kv heads, each on 2 ranks)"
    errors = outputs_match(ref, par, batch("llama"), f"llama {layout}")
    errors.update(train_both(ref, par, batch("llama"), slice(None), f"llama {layout}"))
    report("llama", layout, errors)


def share(mesh) -> slice:
    """This rank's rows of the 4-row batch: its data-parallel replica's share."""
    dp = data_parallel_layout(mesh)
    rows = 4 // dp.size
    return slice(dp.rank * rows, (dp.rank + 1) * rows)


FSDP_LAYOUTS = {  # name: parallelize's arguments
    "fsdp dp=2": dict(fsdp=True),
    "fsdp dp=4": dict(fsdp=True),
    "tp=2 x fsdp=2": dict(tp_size=2, fsdp=True),
    "tp=2 x fsdp=2 + sequence parallel": dict(tp_size=2, fsdp=True, sequence_parallel=True),
    "HSDP 2x2": dict(fsdp=True, dp_replicate=2),
    "fsdp dp=2, kept gathered after forward": dict(fsdp=True, reshard_after_forward=False),
}


def fsdp_models(
    layouts: list[str], kinds=("gpt", "llama", "bert", "t5"), checkpointing: bool = False
) -> None:
    """FSDP2 at ``layouts`` against the single process: 5 AdamW steps of each model family
    (losses, gradient norms, parameters), each rank on its replica's share of the batch;
    with ``checkpointing``, every block's activations recomputed in the backward (applied
    before FSDP, as the trainer does)."""
    from fastlm.train.activation_checkpointing import apply_activation_checkpointing

    for name in layouts:
        for kind in kinds:
            ref, par = build(kind), build(kind)
            if checkpointing:
                apply_activation_checkpointing(par, 1)
            par, mesh = parallelize(par, **FSDP_LAYOUTS[name])
            label = f"{name}{' + activation checkpointing' if checkpointing else ''}"
            errors = train_both(ref, par, batch(kind), share(mesh), f"{kind} {label}")
            report(kind, label, errors)


def fsdp_2(rank: int) -> None:
    """2 ranks: FSDP dp=2 (every family; blocks resharded after forward, or kept; with
    activation checkpointing), LoRA on
    a sharded frozen base, QLoRA (4-bit base kept whole, adapters sharded), and FSDP's
    bf16 compute with fp32 master weights and reduction."""
    from fastlm.peft import apply_lora
    from fastlm.quant import quantize_

    fsdp_models(["fsdp dp=2"])
    fsdp_models(["fsdp dp=2, kept gathered after forward"], kinds=("llama",))
    fsdp_models(["fsdp dp=2"], kinds=("gpt", "t5"), checkpointing=True)
    for quantized in (False, True):
        ref = build("llama")
        if quantized:
            quantize_(ref, bits=4, group_size=32, include=["*mlp*"])
        apply_lora(ref, r=4, target_modules=["qkv", "o", "up_proj", "down_proj"])
        for p in ref.parameters():  # B is zero at first: give it values to test
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.05)
        par, mesh = parallelize(_copy(ref), fsdp=True)
        label = f"llama {'QLoRA' if quantized else 'LoRA'} fsdp dp=2"
        frozen = {
            n: local_part(p).clone() for n, p in par.named_parameters() if not p.requires_grad
        }
        errors = train_both(ref, par, batch("llama"), share(mesh), label)
        for n, p in par.named_parameters():
            if n in frozen:
                assert torch.equal(local_part(p), frozen[n]), f"{label}: frozen {n} moved"
        _adapters_alone_round_trip(par, quantized, label)
        inner = par.blocks[0].mlp.up_proj.base_layer
        if quantized:  # FSDP shards parameters; packed codes are buffers, kept whole
            assert not isinstance(inner.qweight, DTensor)
        else:
            assert isinstance(inner.weight, DTensor) and not inner.weight.requires_grad
        report("llama", label.removeprefix("llama "), errors)
    ref = build("gpt")
    par, mesh = parallelize(build("gpt"), fsdp=True, param_dtype=torch.bfloat16)
    seen = []
    par.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    data = batch("gpt")
    loss = par(**{k: v[share(mesh)] for k, v in data.items()}).loss
    loss.backward()
    weight = par.blocks[0].attn.qkv.weight
    assert seen == [torch.bfloat16], seen  # computed in bf16
    assert weight.dtype == weight.grad.dtype == torch.float32  # fp32 master and gradient
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] * 2 == weight.shape[0]


def _adapters_alone_round_trip(par, quantized: bool, label: str) -> None:
    """A checkpoint of the trainable tensors alone holds the adapters (and no base); it
    loads into a fresh sharded LoRA model whose base comes from elsewhere (here: the
    same initialization), bit for bit."""
    import tempfile

    from fastlm.parallel import dcp
    from fastlm.peft import apply_lora
    from fastlm.quant import quantize_

    made = [tempfile.mkdtemp(prefix="fastlm-lora-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(made, src=0)
    dcp.save(made[0], par, trainable_only=True)
    names = {k.removeprefix(dcp.MODEL) for k in dcp.stored(made[0])}
    trainable = {n for n, p in par.named_parameters() if p.requires_grad}
    assert names == trainable and all("lora_" in n for n in names), sorted(names)[:5]
    fresh = build("llama")
    if quantized:
        quantize_(fresh, bits=4, group_size=32, include=["*mlp*"])
    apply_lora(fresh, r=4, target_modules=["qkv", "o", "up_proj", "down_proj"])
    fresh, _ = parallelize(fresh, fsdp=True)
    dcp.load(made[0], fresh, frozen_from_elsewhere=True)
    for (name, a), b in zip(par.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(local_part(a), local_part(b)), f"{label}: {name} after the round trip"


def fsdp_4(rank: int) -> None:
    """4 ranks: FSDP dp=4, tp=2 x fsdp=2 (and with sequence parallelism, also with
    activation checkpointing), HSDP 2x2."""
    fsdp_models(["fsdp dp=4", "tp=2 x fsdp=2", "HSDP 2x2"])
    fsdp_models(["tp=2 x fsdp=2 + sequence parallel"], kinds=("llama", "t5"))
    fsdp_models(["tp=2 x fsdp=2 + sequence parallel"], kinds=("t5",), checkpointing=True)


RESHARD_LAYOUTS = {  # name: parallelize's arguments, None for the model whole on each rank
    "whole": None,
    "DDP dp=4": {},
    "fsdp dp=4": dict(fsdp=True),
    "tp=2 x DDP 2": dict(tp_size=2),
    "tp=2 x fsdp=2": dict(tp_size=2, fsdp=True),
    "HSDP 2x2": dict(fsdp=True, dp_replicate=2),
}


def _at_layout(kind: str, layout: str, seed: int):
    """``kind`` built from ``seed`` at ``layout``, with its AdamW; "llama-qlora": int4 MLPs
    (their codes are buffers, which FSDP leaves whole) with LoRA on every linear."""
    from fastlm.peft import apply_lora
    from fastlm.quant import quantize_

    torch.manual_seed(seed)
    name, extra = MODELS[kind.removesuffix("-qlora")]
    model = create(name, vocab_size=VOCAB, dropout=0.0, **extra)
    if kind.endswith("-qlora"):
        quantize_(model, bits=4, group_size=32, include=["*up_proj", "*gate_proj"])
        apply_lora(model, r=4, target_modules=["qkv", "o", "up_proj", "down_proj"])
    if RESHARD_LAYOUTS[layout] is not None:
        model, _ = parallelize(model, **RESHARD_LAYOUTS[layout])
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=LR)


def _expect_parts(model, optimizer, full: dict[str, torch.Tensor], label: str) -> int:
    """Every tensor this rank holds of ``model`` and of its AdamW state equals, bit for
    bit, its part of the unsharded ``full`` (by checkpoint key); returns how many were
    compared."""
    from fastlm.parallel.dcp import MODEL, OPTIM

    inner = unwrap(model)
    layout = getattr(inner, "tp_layout", None)
    specs, rank = (layout.specs, layout.rank) if layout else ({}, 0)
    names = {id(p): n for n, p in inner.named_parameters()}
    held, seen = {}, set()
    for n, t in inner.state_dict(keep_vars=True).items():
        if id(t) not in seen:  # a tied head is stored once, under the embedding's name
            seen.add(id(t))
            held[f"{MODEL}{n}"] = (t, specs.get(n))
    for p, state in optimizer.state.items():
        for key, value in state.items():
            held[f"{OPTIM}{names[id(p)]}/{key}"] = (value, specs.get(names[id(p)]))
    for key, (t, spec) in held.items():
        want = full[key] if t.dim() == 0 else slice_of(full[key], spec, rank, t)
        got = local_part(t)
        if not torch.equal(got, want):
            raise AssertionError(
                f"{label}: {key} differs from the checkpoint's part: largest difference "
                f"{max_error(got, want):.3e}, shapes {tuple(got.shape)} / {tuple(want.shape)}"
            )
    return len(held)


def reshard_matrix(rank: int) -> None:
    """DCP checkpoints at every layout of RESHARD_LAYOUTS load at every other: a model
    trained 2 steps at the source layout is saved with its AdamW state; what each rank
    holds equals its part of the unsharded checkpoint, bit for bit, at the source and at
    each target (built from another seed, so nothing is left from it). GPT (tied head,
    row-parallel biases owned by one rank), Llama with 1 key/value head (rows shared by
    the tensor-parallel ranks) and QLoRA (int4 codes cut by tensor parallelism, whole
    under FSDP)."""
    import tempfile

    from fastlm.parallel import dcp

    made = [tempfile.mkdtemp(prefix="fastlm-reshard-") if rank == 0 else None]
    dist.broadcast_object_list(made, src=0)
    for kind in ("gpt", "llama-kv1", "llama-qlora"):
        data = batch(kind.removesuffix("-qlora"))
        for source in RESHARD_LAYOUTS:
            model, optimizer = _at_layout(kind, source, seed=0)
            for _ in range(2):  # every replica on the whole batch: the states stay equal
                model(**data).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            where = os.path.join(made[0], f"{kind}-{source}".replace(" ", "_"))
            dcp.save(where, model, optimizer)
            full = {}
            keys = sorted(dcp.stored(where))
            for group in dcp.read_full(where, keys):
                full.update(group)
            _expect_parts(model, optimizer, full, f"{kind} saved at {source}")
            for target in RESHARD_LAYOUTS:
                other, other_opt = _at_layout(kind, target, seed=1)
                dcp.load(where, other, other_opt)
                count = _expect_parts(other, other_opt, full, f"{kind} {source} -> {target}")
                report(kind, f"{source} -> {target}", {"tensors_equal": count})


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
    from fastlm.models.loading import model_of
    from fastlm.parallel.checkpoint import load_sharded

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
    "fsdp_2": fsdp_2,
    "fsdp_4": fsdp_4,
    "reshard_matrix": reshard_matrix,
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
