"""Tensor, data and fully sharded data parallelism (``fastlm.parallel``): step time, tokens/s,
communication and memory per rank of a training step for each layout, every layout a
separate ``torchrun`` job; and (``--fit``, no torchrun) the predicted largest micro-batch of
Llama models under FSDP on H100-80GB GPUs.

Each layout runs ``python -m torch.distributed.run --standalone --nproc_per_node N`` on this
file (``--worker``; gloo on the CPU, NCCL on GPUs). Every rank builds the same GPT,
``fastlm.parallel.parallelize(model, tp_size, dp_size, sequence_parallel, fsdp=...,
dp_replicate=...)``, AdamW, and runs warm-up steps then timed ones; a step is zeroing the
gradients (set to None) + forward + backward + ``optimizer.step()``, so the gradients are
still there after it. Rank 0 appends one JSON line per layout to a file the parent reads.
Layouts of the same world size share one launch (a launch costs seconds of start-up per
rank). Data parallelism is DDP (``dp=N``) or FSDP2 (``fsdp=N``: each block of the model's
``block_stacks`` one unit, then the root); ``HSDP RxS`` shards over groups of ``S`` ranks
and replicates over ``R`` of them; ``tp=2 x fsdp=2`` shards each tensor-parallel slice.

Formulas (``B x S`` tokens per data-parallel replica, the same for every layout):

* tokens per step = ``dp * B * S`` (the ``tp`` ranks of a replica share its batch);
* step time = median over the timed steps of the slowest rank's step;
* tokens/s = tokens per step / step time;
* efficiency = tokens/s at N ranks / (N x tokens/s at tp=1, dp=1). For dp this is
  weak-scaling efficiency (the batch grows with the replicas); for tp the batch is fixed, so
  it is strong-scaling efficiency of one replica spread over tp devices;
* communication per step: the collectives ``fastlm.parallel`` issues from Python during one
  step, counted by ``fastlm.parallel.comm.CollectiveCounter``, which wraps
  ``torch.distributed``'s ``all_reduce``, ``all_gather_into_tensor`` and
  ``reduce_scatter_tensor``; bytes are those of the whole (unsplit) tensor on one rank: the
  all-reduce's tensor, the all-gather's output, the reduce-scatter's input. A ring moves
  ``2 (n-1)/n`` of that per rank for an all-reduce and ``(n-1)/n`` for the other two;
* DDP's gradient all-reduce runs in C++ and is not seen by the wrapper: "dp grad all-reduce
  bytes (computed)" is the bytes of the gradients of the parameters that require grad, on
  one rank (its tp shard), reported separately. FSDP's collectives are PyTorch's too, not
  counted (their entry points differ between torch versions); for HSDP the same column
  holds its all-reduce of each gradient shard across the replicas, computed: fp32 (the
  reduce dtype), 4 bytes per element of a rank's gradient shard, dimension 0 padded as FSDP
  pads it (:func:`hsdp_comm_bytes`); FSDP's all-gathers and reduce-scatters: ``-``;
* memory per rank, exact tensor accounting (not the allocator's): after the timed steps,
  each rank sums ``local(t).numel() * t.element_size()`` (``fastlm.parallel.local``: an
  FSDP tensor's shard) over its parameters, their gradients and AdamW's state (``exp_avg``,
  ``exp_avg_sq``, ``step``); the table shows the largest over the ranks (each column
  separately). Not in it: activations, FSDP's gathered parameters and communication
  buffers, DDP's gradient buckets;
* memory goal = single-process bytes / N + one block's working set, N the ranks and the
  working set the bytes of the parameters and gradients of the model's largest block,
  unsharded (what FSDP gathers at a time). DDP holds the single process's bytes on every
  rank; ``fsdp=N`` about 1/N of them (``step`` is a scalar per tensor, not sharded); HSDP
  ``RxS`` 1/S;
* step vs DDP = step time of a fully sharded layout / step time of DDP (``dp=N``) at the
  same world size, in the same run.

Expected tensor-parallel bytes for GPT (:func:`tp_comm_bytes`), ``T = B*S`` tokens, ``R =
B*(S-1)`` loss rows, hidden ``H``, ``L`` layers, activations of ``e`` bytes: without
sequence parallelism every all-reduce: the vocabulary-parallel embedding's output (``T*H``),
each attention and MLP region's output forward and its input gradient backward (``4L*T*H``),
the loss's hidden gradient backward (``R*H``), and the vocabulary-parallel cross-entropy's
fp32 row max (``R``) and its stacked sums (``2R``)::

    bytes = e*H*(T*(1 + 4L) + R) + 4*3*R

With sequence parallelism each region all-gathers its input and reduce-scatters its output,
both ways (``8L*T*H``), the stack gathers its output forward and its input gradient backward
(``2*T*H``), and every norm weight and bias inside the blocks has its gradient all-reduced
(``n_norm`` elements in all, parameters of ``e`` bytes)::

    bytes = e*H*(T*(3 + 8L) + R) + 4*3*R + e*n_norm

On the CPU (fp32, one thread per rank, as the rest of the suite) the model is
``gpt2-tiny`` with an 8192-token vocabulary; layouts tp=1, tp=2, tp=2 with sequence
parallelism, dp=2, fsdp=2, and with ``--full`` tp=4, tp=2 x dp=2, dp=4, fsdp=4, HSDP 2x2
and tp=2 x fsdp=2. Ranks beyond the machine's cores oversubscribe it, and gloo moves bytes
through shared memory at memory speed: CPU step times measure the overhead of the
collectives and of the smaller per-rank GEMMs, not the scaling a GPU cluster would see. On
GPUs (the parameters in bf16, vocabulary padded to 50304 so it splits): ``gpt2`` (quick) or
``gpt2-medium`` at 8 x 1024 per replica, every tp, dp and fsdp up to the number of visible
GPUs, and from 4 GPUs HSDP 2xN/2 and tp=2 x fsdp=N/2.

GPU targets (from the issue): at least 90 % weak-scaling efficiency for dp and 80 % for tp=2
on NVLink. **Predicted, not measured** (no GPU run yet): gpt2-medium at 8 x 1024, bf16,
tp=2 moves 1.64 GB per rank per step (the formula above), ~5-7 ms at the 250-350 GB/s NCCL
reaches for 16 MB all-reduces between two NVLink GPUs, against ~25 ms of compute per rank
(~20 TFLOP per step by PaLM's estimate, ~50 ms on one GPU at 40 % of 989 TFLOP/s, halved);
the region all-reduces are not overlapped with compute and the halved GEMMs run less
efficiently, so tp=2 should land near 75-80 %, at risk against its target. dp all-reduces
0.71 GB of bf16 gradients per step (a ring over 8 GPUs: 1.24 GB per GPU, ~4 ms) in buckets
overlapped with the ~33 ms backward, so 90 % should hold up to 8 GPUs.

FSDP fit, **predicted** (:func:`fsdp_fit`; ``--fit``): for Llama shapes on N H100-80GB
GPUs under pure FSDP (bf16 compute, fp32 master weights, gradients and AdamW), the largest
micro-batch ``b`` of sequences of ``s`` tokens with::

    state + working set + b * s * (activations per token + 4 * V) <= 0.9 * 80e9

state = 16 bytes per parameter / N (none with CPU offload); working set = the root unit's
(embeddings, head, final norm) bf16 parameters and gradients, 4 bytes per parameter, plus
two blocks (the one computing and the next, whose all-gather FSDP prefetches) at 8 bytes
per parameter (bf16 parameters and gradients, the fp32 reduce-scatter input); activations
per token and layer ``A = 12h + 4 h_kv + 6 I + 4 heads`` bytes (Korthikanti et al.'s
``34 h`` for a GPT-3 block, rewritten for a Llama block in bf16 with flash attention: see
:func:`activation_bytes`), ``L * A`` without activation checkpointing, ``L * 2h + A`` with
it; and the logits in fp32 (``4 V`` per token).

``python -m bench.bench_parallel [--full] [--device cpu]`` prints the tables and writes
``parallel.md`` under ``bench/results/<device>/``; ``fastlm bench --only parallel`` does the
same and also times the step in-process without ``torch.distributed`` (the harness's row).
``python -m bench.bench_parallel --fit`` prints the predicted fit table only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (torchrun's workers): make ``bench`` importable, as bench/run.py does.
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from fastlm.kernels.compile_check import format_table
from torch import nn

from bench import harness
from bench.harness import Case
from fastlm.models import create

# (preset, vocab_size, batch per replica, seqlen) per (device, quick).
SIZES = {
    ("cuda", True): ("gpt2", 50304, 8, 1024),
    ("cuda", False): ("gpt2-medium", 50304, 8, 1024),
    ("cpu", True): ("gpt2-tiny", 8192, 8, 128),
    ("cpu", False): ("gpt2-tiny", 8192, 8, 128),
}
STEPS = {True: (2, 5), False: (3, 20)}  # (warm-up, timed) by quick
TIMEOUT_S = 300  # one launch; also every collective's timeout


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    dp: int = 1
    sp: bool = False  # sequence parallelism
    fsdp: bool = False  # the dp ranks shard the model (FSDP2) instead of replicating it (DDP)
    dp_replicate: int = 1  # with fsdp: > 1 is HSDP, dp / dp_replicate ranks per shard group

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        if self.dp_replicate > 1:
            data = [f"HSDP {self.dp_replicate}x{self.dp // self.dp_replicate}"]
        elif self.fsdp:
            data = [f"fsdp={self.dp}"]
        else:
            data = [f"dp={self.dp}"] if self.dp > 1 else []
        parts = [f"tp={self.tp}"] if self.tp > 1 or not data else []
        return " x ".join(parts + data) + ("+sp" if self.sp else "")

    @property
    def spec(self) -> str:
        """The worker's ``--layout`` argument: ``TP,DP,SP,FSDP,DP_REPLICATE``."""
        return f"{self.tp},{self.dp},{int(self.sp)},{int(self.fsdp)},{self.dp_replicate}"

    @classmethod
    def parse(cls, spec: str) -> Layout:
        tp, dp, sp, fsdp, dp_replicate = (int(x) for x in spec.split(","))
        return cls(tp, dp, bool(sp), bool(fsdp), dp_replicate)


def layouts(quick: bool, device: torch.device) -> list[Layout]:
    if device.type == "cuda":
        n = torch.cuda.device_count()
        sizes = [s for s in (1, 2, 4, 8) if s <= n]
        found = [Layout(tp) for tp in sizes] + [Layout(2, sp=True)] * (n >= 2)
        found += [Layout(1, dp, fsdp=fsdp) for dp in sizes[1:] for fsdp in (False, True)]
        if n >= 4:
            half = sizes[-1] // 2
            found += [Layout(1, sizes[-1], fsdp=True, dp_replicate=2), Layout(2, half, fsdp=True)]
        return found if not quick else [x for x in found if x.world <= 2]
    two = [Layout(1), Layout(2), Layout(2, sp=True), Layout(1, 2), Layout(1, 2, fsdp=True)]
    if quick:
        return two
    return [
        *two,
        Layout(4),
        Layout(2, 2),
        Layout(1, 4),
        Layout(1, 4, fsdp=True),
        Layout(1, 4, fsdp=True, dp_replicate=2),
        Layout(2, 2, fsdp=True),
    ]


def tp_comm_bytes(config, batch: int, seqlen: int, tp: int, sp: bool, e: int) -> int:
    """The module docstring's bytes of tensor-parallel collectives in one training step of
    a GPT (``config``) on one rank; 0 at ``tp`` 1."""
    if tp == 1:
        return 0
    t, r, h, n_layers = batch * seqlen, batch * (seqlen - 1), config.hidden_size, config.num_layers
    per_norm = 2 * h if config.norm == "layernorm" else h  # LayerNorm: weight and bias
    loss_reductions = 4 * 3 * r  # fp32 row max, then the sum of exponentials and target logit
    if not sp:
        return e * h * (t * (1 + 4 * n_layers) + r) + loss_reductions
    return e * h * (t * (3 + 8 * n_layers) + r) + loss_reductions + e * 2 * n_layers * per_norm


def hsdp_comm_bytes(params: Iterable[torch.Tensor], shard_ranks: int, replicas: int) -> int:
    """Bytes of HSDP's all-reduces of the gradient shards across ``replicas`` in one step on
    one rank: 4 (fp32, the reduce dtype) per element of each parameter's shard among
    ``shard_ranks``, dimension 0 padded to a multiple of them as FSDP pads it; 0 without
    replicas. ``params``: the FSDP parameters (their shapes are the unsharded ones)."""
    if replicas == 1:
        return 0
    return 4 * sum(-(-p.shape[0] // shard_ranks) * (p.numel() // p.shape[0]) for p in params)


# -- the worker (one per rank, under torchrun) --------------------------------------------------


def _model(preset: str, vocab: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same full weights on every rank
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return create(preset, vocab_size=vocab, dropout=0.0).to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def largest_block_bytes(model: nn.Module) -> int:
    """Bytes of the parameters of the largest block in the model's ``block_stacks`` (the
    units FSDP gathers one at a time), of the model as built, before any sharding."""
    blocks = [block for name in type(model).block_stacks for block in model.get_submodule(name)]
    return max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks)


def rank_memory(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state (its FSDP shards),
    by the tensors' sizes, and their total."""
    from fastlm.parallel import local

    def nbytes(tensors: Iterable[torch.Tensor]) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors)

    params = list(model.parameters())
    held = {
        "params": nbytes(params),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(
            t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)
        ),
    }
    return {**held, "total": sum(held.values())}


def measure_layout(
    layout: Layout,
    preset: str,
    vocab: int,
    batch: int,
    seqlen: int,
    warmup: int,
    steps: int,
    device: torch.device,
) -> dict:
    """One layout on this rank (every rank of the world calls it); the result is rank 0's."""
    from fastlm.parallel import data_parallel_layout, local, parallelize, unwrap
    from fastlm.parallel.comm import CollectiveCounter

    model = _model(preset, vocab, device)
    config = model.config
    block_bytes = largest_block_bytes(model)
    model, mesh = parallelize(
        model,
        tp_size=layout.tp,
        dp_size=layout.dp,
        sequence_parallel=layout.sp,
        fsdp=layout.fsdp,
        dp_replicate=layout.dp_replicate,
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    # The tp ranks of a replica share its tokens; replicas differ.
    gen = torch.Generator().manual_seed(1 + data_parallel_layout(mesh).rank)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)

    def step() -> None:
        # Zeroed first, not last: the memory count after the last step sees the gradients.
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        opt.step()

    for _ in range(max(warmup - 1, 0)):
        step()
    with CollectiveCounter() as counter:  # the last warm-up step: counted, not timed
        step()
    _sync(device)
    dist.barrier()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    step_s = statistics.median(slowest.tolist())
    memory = rank_memory(model, opt)
    largest = torch.tensor(list(memory.values()), dtype=torch.int64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    e = next(unwrap(model).parameters()).element_size()
    tokens = layout.dp * batch * seqlen
    if layout.fsdp:  # reduce-scattered, and with HSDP all-reduced across the replicas
        replicas = layout.dp_replicate
        shard_ranks = layout.dp // replicas
        dp_grad_bytes = hsdp_comm_bytes(params, shard_ranks, replicas) if replicas > 1 else None
    else:
        dp_grad_bytes = sum(p.numel() * p.element_size() for p in params) if layout.dp > 1 else 0
    result = {
        "layout": layout.name,
        "tp": layout.tp,
        "dp": layout.dp,
        "sp": layout.sp,
        "fsdp": layout.fsdp,
        "dp_replicate": layout.dp_replicate,
        "world": layout.world,
        "backend": dist.get_backend(),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "preset": preset,
        "vocab": vocab,
        "batch": batch,
        "seqlen": seqlen,
        "tokens_per_step": tokens,
        "step_ms": step_s * 1e3,
        "step_ms_all": [t * 1e3 for t in slowest.tolist()],
        "tokens_per_s": tokens / step_s,
        "collectives": {k: counter.calls[k] for k in CollectiveCounter.KINDS},
        "comm_bytes_by_kind": {k: counter.bytes[k] for k in CollectiveCounter.KINDS},
        "comm_bytes": sum(counter.bytes.values()),
        "comm_bytes_formula": tp_comm_bytes(config, batch, seqlen, layout.tp, layout.sp, e),
        "dp_grad_bytes_computed": dp_grad_bytes,
        "params_per_rank": sum(local(p).numel() for p in unwrap(model).parameters()),
        "memory": dict(zip(memory, largest.tolist(), strict=True)),
        # One block's parameters and gradients, of the dtype of the parameters.
        "block_working_set_bytes": 2 * block_bytes,
    }
    return result


def _worker(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument(
        "--layout", action="append", required=True, help="TP,DP,SP,FSDP,DP_REPLICATE"
    )
    parser.add_argument("--preset", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seqlen", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # as the harness times the CPU: one thread per process
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        for spec in args.layout:
            result = measure_layout(
                Layout.parse(spec),
                args.preset,
                args.vocab,
                args.batch,
                args.seqlen,
                args.warmup,
                args.steps,
                device,
            )
            if dist.get_rank() == 0:
                with args.json.open("a") as f:
                    f.write(json.dumps(result) + "\n")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalization, as tests/distributed/tp_checks.py does: gloo's threads
    # can still hold work objects then, and tearing those down aborts the process
    # ("terminate called without an active exception"; pytorch/pytorch#190489).
    sys.stdout.flush()
    os._exit(0)


# -- the parent ---------------------------------------------------------------------------------


def launch(
    group: Sequence[Layout],
    device: torch.device,
    quick: bool,
    size: tuple[str, int, int, int] | None = None,
    steps: tuple[int, int] | None = None,
) -> list[dict]:
    """Run ``group`` (layouts of one world size) in one torchrun launch; their results."""
    (world,) = {x.world for x in group}
    preset, vocab, batch, seqlen = size or SIZES[(device.type, quick)]
    warmup, timed = steps or STEPS[quick]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(world),
            str(Path(__file__).resolve()),
            "--worker",
            "--json",
            str(out),
            "--preset",
            preset,
            "--vocab",
            str(vocab),
            "--batch",
            str(batch),
            "--seqlen",
            str(seqlen),
            "--warmup",
            str(warmup),
            "--steps",
            str(timed),
            "--device",
            device.type,
        ]
        for x in group:
            cmd += ["--layout", x.spec]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default, said up front
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{', '.join(x.name for x in group)}: torchrun exited "
                f"{proc.returncode}:\n{proc.stderr[-3000:]}"
            )
        return [json.loads(line) for line in out.read_text().splitlines()]


def measure(chosen: Sequence[Layout], device: torch.device, quick: bool, **kwargs) -> list[dict]:
    """Every layout of ``chosen``, one launch per world size, with each result's efficiency
    and memory goal against the tp=1, dp=1 layout, and a fully sharded layout's step time
    against DDP's at its world size (None without them)."""
    results = []
    for world in sorted({x.world for x in chosen}):
        results += launch([x for x in chosen if x.world == world], device, quick, **kwargs)
    single = next((r for r in results if r["world"] == 1), None)
    ddp = {r["world"]: r for r in results if r["tp"] == 1 and r["world"] > 1 and not r["fsdp"]}
    cores = os.cpu_count() or 1
    for r in results:
        r["efficiency"] = (
            None if single is None else r["tokens_per_s"] / (r["world"] * single["tokens_per_s"])
        )
        if single is None:
            r["memory_goal"] = r["memory_vs_goal"] = None
        else:
            r["memory_goal"] = single["memory"]["total"] / r["world"] + r["block_working_set_bytes"]
            r["memory_vs_goal"] = r["memory"]["total"] / r["memory_goal"]
        same_world = ddp.get(r["world"])
        r["step_vs_ddp"] = (
            r["step_ms"] / same_world["step_ms"] if r["fsdp"] and same_world else None
        )
        r["oversubscribed"] = device.type == "cpu" and r["world"] * r["threads"] > cores
    order = {x.name: i for i, x in enumerate(chosen)}
    return sorted(results, key=lambda r: order[r["layout"]])


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _layout(r: dict) -> str:
    return r["layout"] + " *" * r["oversubscribed"]


def rows(results: Sequence[dict]) -> list[tuple[str, ...]]:
    return [
        (
            _layout(r),
            str(r["world"]),
            str(r["tokens_per_step"]),
            f"{r['step_ms']:.1f}",
            f"{r['tokens_per_s']:.0f}",
            str(sum(r["collectives"].values())),
            _mb(r["comm_bytes"]),
            _mb(r["comm_bytes_formula"]),
            _mb(r["dp_grad_bytes_computed"]),
            "-" if r["efficiency"] is None else f"{100 * r['efficiency']:.0f} %",
        )
        for r in results
    ]


def memory_rows(results: Sequence[dict]) -> list[tuple[str, ...]]:
    return [
        (
            _layout(r),
            str(r["world"]),
            _mb(r["memory"]["params"]),
            _mb(r["memory"]["grads"]),
            _mb(r["memory"]["optimizer"]),
            _mb(r["memory"]["total"]),
            _mb(r["memory_goal"]),
            _ratio(r["memory_vs_goal"]),
            f"{r['step_ms']:.1f}",
            _ratio(r["step_vs_ddp"]),
        )
        for r in results
    ]


HEADERS = (
    "layout",
    "ranks",
    "tokens/step",
    "step ms",
    "tokens/s",
    "collectives/step",
    "MB/step (measured)",
    "MB/step (formula)",
    "dp grad all-reduce MB (computed)",
    "efficiency vs tp=1",
)


MEMORY_HEADERS = (
    "layout",
    "ranks",
    "params MB",
    "grads MB",
    "AdamW state MB",
    "total MB (max rank)",
    "goal MB (1/N + block)",
    "total / goal",
    "step ms",
    "step / DDP step",
)


def table(results: Sequence[dict]) -> str:
    return (
        format_table(HEADERS, rows(results))
        + "\n\n"
        + format_table(MEMORY_HEADERS, memory_rows(results))
    )


def _markdown_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
        *("| " + " | ".join(row) + " |" for row in body),
    ]


def markdown(results: Sequence[dict], env: harness.Environment, seconds: float, load: float) -> str:
    r0 = results[0]
    cores = os.cpu_count()
    lines = [
        f"# Tensor and data parallelism: {env.device}",
        "",
        "| device | backend | torch | commit | date | load average before |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| {env.device} ({cores} cores) | {r0['backend']} | {env.torch} | {env.commit} "
        f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ} | {load:.2f} |",
        "",
        f"`{r0['preset']}`, vocabulary {r0['vocab']}, {r0['batch']} x {r0['seqlen']} tokens "
        f"per data-parallel replica, {'bf16' if r0['device'] == 'cuda' else 'fp32'}, "
        f"{r0['threads']} thread(s) per rank; one step = zeroing the gradients + forward + "
        f"backward + AdamW; median of {len(r0['step_ms_all'])} timed steps of the slowest rank "
        f"({seconds:.0f} s in all, `python -m bench.bench_parallel`; formulas in "
        "`bench/bench_parallel.py`).",
        "",
        *_markdown_table(HEADERS, rows(results)),
        "",
        "MB: bytes of the whole tensor of each Python-side collective on one rank (the "
        "all-reduce's tensor, the all-gather's output, the reduce-scatter's input), summed "
        "over one step. DDP's gradient all-reduce and HSDP's across its replicas are "
        "PyTorch's, computed, not counted; FSDP's all-gathers and reduce-scatters are "
        "neither (`-`).",
        "",
        "## Memory per rank and fully sharded step time",
        "",
        *_markdown_table(MEMORY_HEADERS, memory_rows(results)),
        "",
        "Bytes of the tensors each rank holds after the timed steps (its FSDP shards): "
        "parameters, gradients, AdamW's exp_avg, exp_avg_sq and step; the largest over the "
        "ranks. Activations, gathered FSDP units and communication buffers are not counted. "
        "Goal: the single process's total / N ranks + one block's parameters and gradients "
        "unsharded (the largest block); DDP holds a whole copy per rank and HSDP RxS one per "
        "shard group of S ranks, above it by design. Step / DDP step: against dp=N at the "
        "same world size.",
    ]
    if any(r["oversubscribed"] for r in results):
        lines += [
            "",
            f"\\* more ranks than the {cores} cores: the step time measures "
            "oversubscription, not scaling.",
        ]
    if r0["device"] == "cpu":
        lines += [
            "",
            "On the CPU gloo moves bytes through shared memory and every rank is one "
            "thread: these times measure the overhead of the collectives and of smaller "
            "per-rank GEMMs, not the scaling of GPUs over NVLink (targets and "
            "predictions in the module docstring).",
        ]
    return "\n".join(lines) + "\n"


def report(
    quick: bool,
    device: torch.device,
    out: Path | None = None,
    chosen: Sequence[Layout] | None = None,
    **kwargs,
) -> tuple[list[dict], Path]:
    """Measure (``kwargs``: :func:`launch`'s ``size`` and ``steps``), print the table and
    write ``parallel.md`` to ``out`` (default ``bench/results/<device>/``)."""
    env = harness.environment(device)
    load = os.getloadavg()[0]  # other work on the machine skews every row
    start = time.perf_counter()
    results = measure(chosen or layouts(quick, device), device, quick, **kwargs)
    seconds = time.perf_counter() - start
    print(table(results))
    if any(r["oversubscribed"] for r in results):
        print(f"* more ranks than the {os.cpu_count()} cores: oversubscribed")
    path = (out or harness.RESULTS / env.slug) / "parallel.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(results, env, seconds, load))
    print(f"parallel: {len(results)} layouts, {seconds:.1f} s; wrote {path}")
    return results, path


# -- the prediction (--fit): arithmetic only, no torchrun ---------------------------------------

GPU_BYTES = 80 * 10**9  # an H100-80GB
HEADROOM = 0.10  # left free: the CUDA context, NCCL's buffers, the allocator's fragmentation


@dataclasses.dataclass(frozen=True)
class LlamaShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # the head reads the embedding's matrix (Llama 3.2 1B)

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def block_params(self) -> int:
        h = self.hidden
        attention = 2 * h * h + 2 * h * self.kv_hidden  # q and o; k and v
        return attention + 3 * h * self.intermediate + 2 * h  # gate, up, down; two RMSNorms

    @property
    def root_params(self) -> int:
        """The embedding, the head unless tied, the final norm: FSDP's root unit."""
        return (1 if self.tied else 2) * self.vocab * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.root_params


# Each model with the sequence lengths asked of it.
FIT_MODELS = (
    (LlamaShape("llama-1b", 2048, 16, 32, 8, 8192, 128256, tied=True), (2048, 4096)),
    (LlamaShape("llama-7B", 4096, 32, 32, 32, 11008, 32000, tied=False), (2048, 4096)),
    (LlamaShape("llama-70B", 8192, 80, 64, 8, 28672, 128256, tied=False), (2048, 4096, 8192)),
)
FIT_GPUS = (8, 64)
FIT_SEQLENS = (2048, 4096, 8192)


def activation_bytes(shape: LlamaShape) -> int:
    """Bytes one Llama block keeps for its backward per token, in bf16 with flash attention.

    Korthikanti et al. ("Reducing Activation Recomputation in Large Transformer Models",
    2022) count ``s*b*h*(34 + 5*a*s/h)`` bytes per GPT-3 layer with 16-bit activations;
    flash attention keeps no ``s x s`` scores (the ``5as/h`` term), and without dropout
    there are no masks (``2h`` of the ``34h``): ``32h``. Rewritten for a Llama block, each
    norm and linear keeping its input: attention: the RMSNorm's input ``2h``, the q/k/v
    projections' input ``2h``, the rotated queries ``2h``, keys and values ``4 h_kv``, the
    attention output (the o projection's input) ``2h``, flash attention's fp32 logsumexp
    ``4 heads``; MLP: the RMSNorm's input ``2h``, the gate/up projections' input ``2h``,
    the gate and up outputs ``4I``, ``silu(gate) * up`` (the down projection's input)
    ``2I``. In all ``12h + 4 h_kv + 6I + 4 heads`` (a GPT block, ``h_kv = h`` and a GELU
    MLP of ``4I = 16h``, gives back the ``32h``)."""
    h = shape.hidden
    return 12 * h + 4 * shape.kv_hidden + 6 * shape.intermediate + 4 * shape.heads


def fsdp_memory(
    shape: LlamaShape, gpus: int, seqlen: int, checkpointing: bool, cpu_offload: bool
) -> tuple[int, int]:
    """Predicted bytes per GPU of training ``shape`` with FSDP over ``gpus`` (bf16 compute,
    fp32 master weights, gradients and AdamW), as ``(fixed, per_sequence)``: a micro-batch
    of ``b`` sequences of ``seqlen`` tokens needs ``fixed + b * per_sequence``.

    fixed = sharded state + working set. Sharded state: 16 bytes per parameter (fp32 master
    4, fp32 gradient 4, AdamW's two moments 8) / ``gpus``; none with CPU offload (the
    shards, gradients and the optimizer step live in host memory). Working set, what FSDP
    gathers: the root unit (embedding, head, final norm), gathered through the whole
    forward and the whole backward, at 4 bytes per parameter (bf16 parameters and
    gradients), and two blocks, the one computing and the next whose all-gather FSDP
    prefetches, at 8 bytes per parameter (bf16 parameters and gradients, and the fp32
    reduce-scatter input the gradients are copied into).

    per_sequence = ``seqlen`` x (activations + logits) per token. Activations: without
    checkpointing every layer keeps :func:`activation_bytes` ``A``, ``L * A``; with it each
    layer keeps its input (``2h``, bf16) and one block's are rebuilt at a time in the
    backward, ``L * 2h + A``. Logits: fp32, ``4 V`` (an unfused loss upcasts them; fastlm's
    fused linear cross-entropy holds one chunk of them plus an fp32 ``V x h`` weight
    gradient, so for it this errs high once a micro-batch has more than ``h`` tokens)."""
    state = 0 if cpu_offload else -(-16 * shape.params // gpus)
    working_set = 4 * shape.root_params + 2 * 8 * shape.block_params
    per_layer = activation_bytes(shape)
    kept = (
        2 * shape.hidden * shape.layers + per_layer if checkpointing else shape.layers * per_layer
    )
    return state + working_set, seqlen * (kept + 4 * shape.vocab)


def fsdp_fit(
    shape: LlamaShape,
    gpus: int,
    seqlen: int,
    checkpointing: bool,
    cpu_offload: bool,
    gpu_bytes: int = GPU_BYTES,
    headroom: float = HEADROOM,
) -> int:
    """Predicted largest micro-batch (sequences of ``seqlen`` tokens per GPU) that trains
    ``shape`` under FSDP over ``gpus`` GPUs of ``gpu_bytes`` each, ``headroom`` of them left
    free: ``floor((gpu_bytes * (1 - headroom) - fixed) / per_sequence)`` with
    :func:`fsdp_memory`'s terms; 0 when not even one sequence fits."""
    fixed, per_sequence = fsdp_memory(shape, gpus, seqlen, checkpointing, cpu_offload)
    return max(0, int((gpu_bytes * (1 - headroom) - fixed) // per_sequence))


FIT_HEADERS = (
    "model",
    "params",
    "GPUs",
    "activation checkpointing",
    "CPU offload",
    "state + working set GB",
    *(f"seq {s}" for s in FIT_SEQLENS),
)


def _fit_cell(batch: int | None) -> str:
    if batch is None:  # a length not asked of this model
        return "-"
    return str(batch) if batch else "does not fit"


def fit_rows() -> list[tuple[str, ...]]:
    found = []
    for shape, seqlens in FIT_MODELS:
        for gpus in FIT_GPUS:
            for checkpointing in (False, True):
                for offload in (False, True):
                    fixed, _ = fsdp_memory(shape, gpus, seqlens[0], checkpointing, offload)
                    fits = {s: fsdp_fit(shape, gpus, s, checkpointing, offload) for s in seqlens}
                    found.append(
                        (
                            shape.name,
                            f"{shape.params / 1e9:.2f} B",
                            str(gpus),
                            "yes" if checkpointing else "no",
                            "yes" if offload else "no",
                            f"{fixed / 1e9:.1f}",
                            *(_fit_cell(fits.get(s)) for s in FIT_SEQLENS),
                        )
                    )
    return found


def fit_markdown() -> str:
    return (
        "\n".join(
            [
                "# FSDP on H100-80GB: largest micro-batch per GPU (predicted, not measured)",
                "",
                f"Sequences per GPU that fit in {GPU_BYTES / 1e9:.0f} GB less "
                f"{HEADROOM:.0%} headroom under pure FSDP (bf16 compute, fp32 master weights, "
                "gradients and AdamW sharded over the GPUs; CPU offload moves those to the "
                "host), counting the root unit and two blocks gathered, bf16 activations with "
                "flash attention and fp32 logits: formulas in `fsdp_memory` and "
                "`activation_bytes`, `bench/bench_parallel.py`.",
                "",
                *_markdown_table(FIT_HEADERS, fit_rows()),
            ]
        )
        + "\n"
    )


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """For ``fastlm bench``: the layouts run as torchrun jobs (their own table and
    ``parallel.md``), then the same step in this process without torch.distributed, timed
    by the harness: the reference the tp=1 launch is measured against."""
    from fastlm.train.metrics import flops_per_token

    report(quick, device)
    preset, vocab, batch, seqlen = SIZES[(device.type, quick)]
    model = _model(preset, vocab, device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocates the optimizer state outside the measured step
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    flops = int(flops_per_token(model, seqlen) * batch * seqlen)
    dtype = next(model.parameters()).dtype
    yield Case(
        f"{preset} parallel step",
        "single process",
        (batch, seqlen),
        dtype,
        step,
        weight_bytes,
        flops,
        batch * seqlen,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--worker" in argv:
        _worker(argv)  # does not return
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_parallel", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--full", action="store_true", help="every layout, more steps")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--out", type=Path, help="folder of parallel.md (default bench/results/<device>)"
    )
    parser.add_argument(
        "--fit",
        action="store_true",
        help="print only the predicted FSDP fit of Llama models on H100-80GB (no torchrun)",
    )
    args = parser.parse_args(argv)
    if args.fit:
        print(fit_markdown(), end="")
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, _ = report(not args.full, device, args.out)
    ok = all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
