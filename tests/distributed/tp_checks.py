"""Tensor-parallel checks run under ``torchrun`` by tests/distributed/test_tensor_parallel.py
(one process per rank, gloo on CPU): ``python -m torch.distributed.run --nproc_per_node 2
tests/distributed/tp_checks.py <check>``. Each rank compares its result with the
single-process layers the parallel ones were sliced from; a failure exits non-zero."""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def mlp(rank: int) -> None:
    from fastlm.parallel.layers import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(0)  # the same full layers and data on every rank
    fc1, fc2 = nn.Linear(12, 16), nn.Linear(16, 12)
    x = torch.randn(5, 12, requires_grad=True)
    ref = fc2(F.gelu(fc1(x)))
    ref.sum().backward()
    x_tp = x.detach().clone().requires_grad_()
    col, row = ColumnParallelLinear(fc1), RowParallelLinear(fc2)
    y = row(F.gelu(col(x_tp)))
    y.sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x_tp.grad, x.grad)
    half = slice(8 * rank, 8 * rank + 8)
    torch.testing.assert_close(col.weight.grad, fc1.weight.grad[half])
    torch.testing.assert_close(row.weight.grad, fc2.weight.grad[:, half])
    torch.testing.assert_close(row.bias.grad, fc2.bias.grad)


def embedding_and_loss(rank: int) -> None:
    from fastlm.parallel.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy

    torch.manual_seed(0)
    emb = nn.Embedding(10, 6)
    ids = torch.randint(0, 10, (3, 4))
    torch.testing.assert_close(VocabParallelEmbedding(emb)(ids), emb(ids))
    logits = torch.randn(7, 10, requires_grad=True)
    target = torch.randint(0, 10, (7,))
    target[2] = -100
    ref = F.cross_entropy(logits, target)
    ref.backward()
    local = logits.detach()[:, 5 * rank : 5 * rank + 5].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, 5 * rank)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(local.grad, logits.grad[:, 5 * rank : 5 * rank + 5])


def models(rank: int) -> None:
    from fastlm.models import create
    from fastlm.parallel.parallelize import tensor_parallel

    no_dropout = {"gpt2-tiny": {}, "llama-tiny": {}, "bert-tiny": {"attention_dropout": 0.0}}
    for name, extra in no_dropout.items():
        torch.manual_seed(0)
        ref = create(name, vocab_size=96, dropout=0.0, **extra)
        torch.manual_seed(0)
        par = tensor_parallel(create(name, vocab_size=96, dropout=0.0, **extra))
        ids = torch.randint(0, 96, (2, 11))
        out_ref, out_par = ref(ids, labels=ids), par(ids, labels=ids)
        torch.testing.assert_close(out_par.loss, out_ref.loss, rtol=1e-5, atol=1e-5)
        out_ref.loss.backward()
        out_par.loss.backward()
        grads = dict(par.named_parameters())
        for pname, p in ref.named_parameters():
            if p.grad is None or pname not in grads:
                continue
            g = grads[pname].grad
            if g.shape == p.grad.shape:  # replicated: the whole gradient on every rank
                torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5, msg=pname)


def mesh_2x2(rank: int) -> None:
    """tp=2 x dp=2 on 4 ranks: two SGD steps, each dp replica on its half of the batch,
    give the same parameters as one process stepping on the whole batch."""
    from fastlm.models import create
    from fastlm.parallel.parallelize import parallelize

    torch.manual_seed(0)
    ref = create("gpt2-tiny", vocab_size=96, dropout=0.0)
    torch.manual_seed(0)
    par, mesh = parallelize(create("gpt2-tiny", vocab_size=96, dropout=0.0), tp_size=2)
    ids = torch.randint(0, 96, (4, 9))
    dp_rank = mesh.get_local_rank("dp")
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_par = torch.optim.SGD(par.parameters(), lr=0.1)
    for _ in range(2):
        ref(ids, labels=ids).loss.backward()
        opt_ref.step()
        opt_ref.zero_grad()
        mine = ids[2 * dp_rank : 2 * dp_rank + 2]
        par(mine, labels=mine).loss.backward()  # DDP averages the two halves' gradients
        opt_par.step()
        opt_par.zero_grad()
    full = dict(ref.named_parameters())
    for name, p in par.module.named_parameters():
        if p.shape == full[name].shape:
            torch.testing.assert_close(p, full[name], rtol=1e-4, atol=1e-5, msg=name)


CHECKS = {
    "mlp": mlp,
    "embedding_and_loss": embedding_and_loss,
    "models": models,
    "mesh_2x2": mesh_2x2,
}

if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        CHECKS[sys.argv[1]](dist.get_rank())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization: gloo's worker threads can still hold work objects with
    # Python references then, and tearing those down aborts the process ("terminate called
    # without an active exception", about 1 run in 6 here; pytorch/pytorch#190489, #179291).
    sys.stdout.flush()
    os._exit(0)
