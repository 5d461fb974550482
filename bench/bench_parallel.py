"""Tensor and data parallelism (``fastlm.parallel``): step time, tokens/s and communication
per training step for each layout, every layout a separate ``torchrun`` job.

Each layout runs ``python -m torch.distributed.run --standalone --nproc_per_node N`` on this
file (``--worker``; gloo on the CPU, NCCL on GPUs). Every rank builds the same GPT,
``fastlm.parallel.parallelize(model, tp_size, dp_size, sequence_parallel)``, AdamW, and
runs warm-up steps then timed ones; a step is forward + backward + ``optimizer.step()``.
Rank 0 appends one JSON line per layout to a file the parent reads. Layouts of the same
world size share one launch (a launch costs seconds of start-up per rank).

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
  one rank (its tp shard), reported separately.

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
parallelism, dp=2, and with ``--full`` tp=4 and tp=2 x dp=2. Ranks beyond the machine's
cores oversubscribe it, and gloo moves bytes through shared memory at memory speed: CPU
step times measure the overhead of the collectives and of the smaller per-rank GEMMs, not
the scaling a GPU cluster would see. On GPUs (the parameters in bf16, vocabulary padded to
50304 so it splits): ``gpt2`` (quick) or ``gpt2-medium`` at 8 x 1024 per replica, every tp
and dp up to the number of visible GPUs.

GPU targets (from the issue): at least 90 % weak-scaling efficiency for dp and 80 % for tp=2
on NVLink. **Predicted, not measured** (no GPU run yet): gpt2-medium at 8 x 1024, bf16,
tp=2 moves 1.64 GB per rank per step (the formula above), ~5-7 ms at the 250-350 GB/s NCCL
reaches for 16 MB all-reduces between two NVLink GPUs, against ~25 ms of compute per rank
(~20 TFLOP per step by PaLM's estimate, ~50 ms on one GPU at 40 % of 989 TFLOP/s, halved);
the region all-reduces are not overlapped with compute and the halved GEMMs run less
efficiently, so tp=2 should land near 75-80 %, at risk against its target. dp all-reduces
0.71 GB of bf16 gradients per step (a ring over 8 GPUs: 1.24 GB per GPU, ~4 ms) in buckets
overlapped with the ~33 ms backward, so 90 % should hold up to 8 GPUs.

``python -m bench.bench_parallel [--full] [--device cpu]`` prints the table and writes
``parallel.md`` under ``bench/results/<device>/``; ``fastlm bench --only parallel`` does the
same and also times the step in-process without ``torch.distributed`` (the harness's row).
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
from collections.abc import Iterator, Sequence
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

    @property
    def world(self) -> int:
        return self.tp * self.dp

    @property
    def name(self) -> str:
        parts = [f"tp={self.tp}"] if self.tp > 1 or self.dp == 1 else []
        parts += [f"dp={self.dp}"] if self.dp > 1 else []
        return " x ".join(parts) + ("+sp" if self.sp else "")


def layouts(quick: bool, device: torch.device) -> list[Layout]:
    if device.type == "cuda":
        n = torch.cuda.device_count()
        sizes = [s for s in (1, 2, 4, 8) if s <= n]
        found = [Layout(tp) for tp in sizes] + [Layout(2, sp=True)] * (n >= 2)
        found += [Layout(1, dp) for dp in sizes[1:]]
        return found if not quick else [x for x in found if x.world <= 2]
    if quick:
        return [Layout(1), Layout(2), Layout(2, sp=True), Layout(1, 2)]
    return [Layout(1), Layout(2), Layout(4), Layout(2, sp=True), Layout(1, 2), Layout(2, 2)]


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


# -- the worker (one per rank, under torchrun) --------------------------------------------------


def _model(preset: str, vocab: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same full weights on every rank
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return create(preset, vocab_size=vocab, dropout=0.0).to(device, dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    from fastlm.parallel import parallelize, unwrap
    from fastlm.parallel.comm import CollectiveCounter

    model = _model(preset, vocab, device)
    config = model.config
    model, mesh = parallelize(
        model, tp_size=layout.tp, dp_size=layout.dp, sequence_parallel=layout.sp
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    # The tp ranks of a replica share its tokens; replicas differ.
    gen = torch.Generator().manual_seed(1 + mesh.get_local_rank("dp"))
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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
    e = next(unwrap(model).parameters()).element_size()
    tokens = layout.dp * batch * seqlen
    result = {
        "layout": layout.name,
        "tp": layout.tp,
        "dp": layout.dp,
        "sp": layout.sp,
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
        "dp_grad_bytes_computed": 0
        if layout.dp == 1
        else sum(p.numel() * p.element_size() for p in params),
        "params_per_rank": sum(p.numel() for p in unwrap(model).parameters()),
    }
    return result


def _worker(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--layout", action="append", required=True, help="TP,DP,SP")
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
            tp, dp, sp = (int(x) for x in spec.split(","))
            result = measure_layout(
                Layout(tp, dp, bool(sp)),
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
            cmd += ["--layout", f"{x.tp},{x.dp},{int(x.sp)}"]
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
    against the tp=1, dp=1 layout (None without it)."""
    results = []
    for world in sorted({x.world for x in chosen}):
        results += launch([x for x in chosen if x.world == world], device, quick, **kwargs)
    base = next((r["tokens_per_s"] for r in results if r["world"] == 1), None)
    cores = os.cpu_count() or 1
    for r in results:
        r["efficiency"] = None if base is None else r["tokens_per_s"] / (r["world"] * base)
        r["oversubscribed"] = device.type == "cpu" and r["world"] * r["threads"] > cores
    order = {x.name: i for i, x in enumerate(chosen)}
    return sorted(results, key=lambda r: order[r["layout"]])


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def rows(results: Sequence[dict]) -> list[tuple[str, ...]]:
    return [
        (
            r["layout"] + " *" * r["oversubscribed"],
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


def table(results: Sequence[dict]) -> str:
    return format_table(HEADERS, rows(results))


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
        f"{r0['threads']} thread(s) per rank; one step = forward + backward + AdamW; median "
        f"of {len(r0['step_ms_all'])} timed steps of the slowest rank ({seconds:.0f} s in all, "
        "`python -m bench.bench_parallel`; formulas in `bench/bench_parallel.py`).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "| " + " | ".join("---" for _ in HEADERS) + " |",
        *("| " + " | ".join(row) + " |" for row in rows(results)),
        "",
        "MB: bytes of the whole tensor of each Python-side collective on one rank (the "
        "all-reduce's tensor, the all-gather's output, the reduce-scatter's input), summed "
        "over one step. DDP's gradient all-reduce runs in C++ and is computed, not counted.",
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
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results, _ = report(not args.full, device, args.out)
    ok = all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
