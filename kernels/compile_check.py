"""Static GPU check: compile every shipped kernel configuration for sm_80 and sm_90, no GPU.

``python -m fastlm.kernels.compile_check [--json PATH] [--require-cuda] [--jobs N]``

Triton part: each family module in :data:`KERNEL_MODULES` lists, through ``compile_specs()``,
every configuration its launchers ship. Each is compiled with ``triton.compile`` for a
``GPUTarget`` (no driver needed), with the divisibility-16 specialization the JIT applies to
aligned inputs, and its cubin is read with the ``cuobjdump`` bundled in Triton: registers from
``-res-usage``; spills, tensor-core instructions and global load widths from ``-sass``.

CUDA C++ part: each ``csrc/*.cu`` is compiled with the flags of :mod:`fastlm.build_config`
plus ``-Xptxas=-v``; ptxas reports registers, stack, spills and shared memory, and the object's
SASS gives load widths and tensor-core use.

Exit status 1 on a compile error, any spill, shared memory over the arch limit, or a
``needs_wgmma`` kernel without tensor-core MMA (warpgroup MMA on sm_90), or a
``needs_wide_loads`` kernel whose widest global load is narrower than 128 bits (DESIGN.md,
"Verifying GPU code without a GPU").
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import importlib
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import triton
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from .launch import KernelSpec

# Kernel family modules exposing compile_specs(); add each new family here.
KERNEL_MODULES = (
    "fastlm.kernels.norm",
    "fastlm.kernels.attention",
    "fastlm.kernels.attention_decode",
    "fastlm.kernels.activation",
    "fastlm.kernels.rotary",
    "fastlm.kernels.cross_entropy",
    "fastlm.kernels.mlp",
    "fastlm.kernels.quant",
)
TRITON_CAPABILITIES = (80, 90)
# Opt-in shared memory per block (CUDA programming guide, compute capability table).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
WIDE_LOAD_BITS = 128

# <repo>/kernels is installed (editable) as fastlm.kernels, so csrc/ is its sibling.
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@dataclasses.dataclass
class Row:
    """One kernel configuration compiled for one arch. Sizes in bytes, widths in bits."""

    source: str  # "triton" or "cuda"
    label: str
    arch: str
    regs: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    tensor_cores: str = "-"  # "wgmma", "mma" or "-"
    widest_load: int | None = None
    needs_wide_loads: bool = False
    needs_wgmma: bool = False
    error: str | None = None
    seconds: float = 0.0


def problems(row: Row) -> list[str]:
    """Why ``row`` fails the check (empty when it passes)."""
    if row.error is not None:
        return [f"error: {row.error}"]
    found = []
    if row.spill_stores or row.spill_loads:
        found.append(f"spills {row.spill_stores}B stores / {row.spill_loads}B loads")
    limit = SHARED_LIMIT.get(_capability(row.arch))
    if limit is not None and row.shared > limit:
        found.append(f"shared memory {row.shared}B over the {row.arch} limit {limit}B")
    if row.needs_wide_loads and (row.widest_load or 0) < WIDE_LOAD_BITS:
        found.append(f"widest global load {row.widest_load}-bit, needs {WIDE_LOAD_BITS}-bit")
    if row.needs_wgmma and _capability(row.arch) >= 90 and row.tensor_cores != "wgmma":
        found.append(f"no warpgroup MMA (wgmma) on {row.arch}, got {row.tensor_cores}")
    elif row.needs_wgmma and row.tensor_cores == "-":
        found.append(f"no tensor-core MMA on {row.arch}")
    return found


def _capability(arch: str) -> int:
    return int(re.search(r"\d+", arch).group())


# ---------------------------------------------------------------------------------------------
# SASS and ptxas parsing


_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_ACCESS_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}
_GLOBAL_LOADS = {"LDG", "LDGSTS"}  # LDGSTS: cp.async, global to shared


def split_sass(text: str) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` output split into ``{(function, arch): body}``."""
    bodies: dict[tuple[str, str], list[str]] = {}
    arch, current = "", None
    for line in text.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch, current = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            current = bodies.setdefault((m.group(1), arch), [])
        elif current is not None:
            current.append(line)
    return {key: "\n".join(lines) for key, lines in bodies.items()}


def access_bits(opcode: str) -> int:
    """Width of a memory instruction from its modifiers: ``LDG.E.128`` 128, ``LDG.E`` 32."""
    for modifier in opcode.split(".")[1:]:
        if modifier in _ACCESS_BITS:
            return _ACCESS_BITS[modifier]
    return 32


@dataclasses.dataclass
class SassStats:
    widest_load: int | None = None
    # Local-memory traffic; in kernels without local arrays (all of ours) it is spilling.
    spill_stores: int = 0
    spill_loads: int = 0
    tensor_cores: str = "-"


def sass_stats(body: str) -> SassStats:
    """Global load width, local-memory (spill) bytes and tensor-core use of one function."""
    stats = SassStats()
    for opcode in _SASS_INSTR.findall(body):
        base = opcode.split(".")[0]
        if base in _GLOBAL_LOADS:
            stats.widest_load = max(stats.widest_load or 0, access_bits(opcode))
        elif base == "UTMALDG":  # TMA moves whole tiles: as wide as a load gets
            stats.widest_load = max(stats.widest_load or 0, WIDE_LOAD_BITS)
        elif base == "STL":
            stats.spill_stores += access_bits(opcode) // 8
        elif base == "LDL":
            stats.spill_loads += access_bits(opcode) // 8
        elif base.endswith("GMMA"):
            stats.tensor_cores = "wgmma"
        elif base.endswith("MMA") and stats.tensor_cores == "-":
            stats.tensor_cores = "mma"
    return stats


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output as ``{function: {"REG": n, "STACK": n, ...}}``."""
    usage: dict[str, dict[str, int]] = {}
    function = None
    for line in text.splitlines():
        if m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function is not None and "REG:" in line:
            usage[function] = {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", line)}
            function = None
    return usage


def parse_ptxas(text: str) -> list[Row]:
    """Rows (labelled with mangled names) from ``ptxas -v`` output, one per entry and arch."""
    rows: list[Row] = []
    current: Row | None = None
    properties_of = None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line):
            current = Row("cuda", m.group(1), m.group(2))
            rows.append(current)
        elif m := re.search(r"Function properties for (\S+)", line):
            properties_of = m.group(1)
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            # Non-inlined device functions get their own properties block; their frame is
            # part of the caller's stack, and ptxas reports their spills there too.
            if current is not None and properties_of == current.label:
                current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
            current.regs = int(m.group(1))
            if smem := re.search(r"(\d+) bytes smem", line):
                current.shared = int(smem.group(1))
    return rows


# ---------------------------------------------------------------------------------------------
# Triton


def _cuobjdump() -> str:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise RuntimeError("no cuobjdump: neither Triton's nvidia backend nor PATH has one")
    return found


def _require_attrs_api() -> None:
    # Triton >= 3.3 takes attrs as {(arg index,): [[name, value]]}, parsed by
    # BaseBackend.parse_attr; older releases took an AttrsDescriptor and cannot be driven here.
    if not hasattr(BaseBackend, "parse_attr"):
        raise RuntimeError(
            f"triton {triton.__version__} predates the attrs={{(idx,): [['tt.divisibility', 16]]}}"
            " compile API this check uses; install triton >= 3.3"
        )


def ast_source(spec: KernelSpec) -> ASTSource:
    """The ``ASTSource`` the JIT would build for ``spec``'s arguments."""
    names = list(spec.kernel.arg_names)
    given = set(spec.signature) | set(spec.constexprs) | set(spec.aligned)
    if unknown := sorted(given - set(names)):
        raise ValueError(f"{spec.label}: {unknown} are not arguments of {spec.kernel.__name__}")
    if missing := [n for n in names if n not in spec.signature and n not in spec.constexprs]:
        raise ValueError(f"{spec.label}: no type or constexpr value for {missing}")
    # Triton 3.x wants constexprs in the signature too, typed "constexpr".
    signature = {n: "constexpr" if n in spec.constexprs else spec.signature[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
    return ASTSource(fn=spec.kernel, signature=signature, constexprs=spec.constexprs, attrs=attrs)


def compile_triton(spec: KernelSpec, capability: int) -> Row:
    """Compile ``spec`` for ``sm_<capability>`` and read its resources from the cubin."""
    row = Row(
        "triton",
        spec.label,
        f"sm_{capability}",
        needs_wide_loads=spec.needs_wide_loads,
        needs_wgmma=spec.needs_wgmma,
    )
    start = time.perf_counter()
    try:
        _require_attrs_api()
        kernel = triton.compile(
            ast_source(spec),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # a failed compile is a result to report, not a crash
        row.error = f"{type(exc).__name__}: {exc}".strip()
        return row
    finally:
        row.seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _run([_cuobjdump(), "-res-usage", str(cubin)])
        sass = _run([_cuobjdump(), "-sass", str(cubin)])
    name = kernel.metadata.name
    res = parse_res_usage(usage).get(name, {})
    bodies = [body for (fn, _), body in split_sass(sass).items() if fn == name]
    stats = sass_stats("\n".join(bodies))
    row.regs, row.stack = res.get("REG"), res.get("STACK", 0)
    row.spill_stores, row.spill_loads = stats.spill_stores, stats.spill_loads
    # The dynamic allocation Triton requests at launch (and checks against the device limit).
    row.shared = kernel.metadata.shared
    row.tensor_cores, row.widest_load = stats.tensor_cores, stats.widest_load
    return row


def _run(cmd: Sequence[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@functools.cache
def _specs(module_name: str) -> list[KernelSpec]:
    return importlib.import_module(module_name).compile_specs()


def _compile_item(item: tuple[str, int, int]) -> Row:
    # Runs in a worker process: specs hold JITFunctions, so workers rebuild them by module.
    module_name, index, capability = item
    return compile_triton(_specs(module_name)[index], capability)


def check_triton(modules: Sequence[str], jobs: int) -> list[Row]:
    items, rows = [], []
    for module_name in modules:
        try:
            specs = _specs(module_name)
        except Exception as exc:  # an unimportable family fails the check, with its reason
            rows.append(Row("triton", module_name, "-", error=f"{type(exc).__name__}: {exc}"))
            continue
        items += [
            (module_name, i, cap)
            for i, spec in enumerate(specs)
            for cap in TRITON_CAPABILITIES
            if cap in spec.capabilities
        ]
    if jobs <= 1:
        return rows + [_compile_item(item) for item in items]
    # fork: workers inherit the imported modules instead of re-importing torch and triton.
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return rows + list(pool.map(_compile_item, items))


# ---------------------------------------------------------------------------------------------
# CUDA C++


def demangle(names: Sequence[str]) -> dict[str, str]:
    """Readable names (template arguments kept, parameter list dropped) for C++ symbols."""
    readable = list(names)
    if names and (cxxfilt := shutil.which("c++filt")):
        out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
        if out.returncode == 0 and len(out.stdout.splitlines()) == len(names):
            readable = out.stdout.splitlines()
    return dict(zip(names, map(_short_name, readable), strict=True))


_CXX_TYPES = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}


def _short_name(name: str) -> str:
    # c++filt prints a function template's return type ("void f<...>(...)"); kernels are void.
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    for long, short in _CXX_TYPES.items():
        name = re.sub(rf"\b{long}\b", short, name)
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0:
            return name[:i]
    return name


def compile_cuda_file(cu: Path, command: Sequence[str]) -> list[Row]:
    """Compile one ``.cu`` with ``command`` (nvcc and flags) and report each entry per arch."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / f"{cu.stem}.o"
        proc = subprocess.run(
            [*command, "-Xptxas=-v", "-c", str(cu), "-o", str(obj)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return [Row("cuda", cu.name, "-", error=tail, seconds=time.perf_counter() - start)]
        sass = split_sass(_run([_cuobjdump(), "-sass", str(obj)]))
    rows = parse_ptxas(proc.stderr + proc.stdout)
    names = demangle(sorted({row.label for row in rows}))
    elapsed = time.perf_counter() - start
    # One nvcc call builds every entry: each row gets an equal share of its time.
    for row in rows:
        stats = sass_stats(sass.get((row.label, row.arch), ""))
        row.tensor_cores, row.widest_load = stats.tensor_cores, stats.widest_load
        row.label = f"{cu.name}:{names[row.label]}"
        row.seconds = elapsed / len(rows)
    return sorted(rows, key=lambda row: (row.label, row.arch))


def check_cuda(require: bool, jobs: int) -> tuple[list[Row], str | None]:
    """Rows for every ``csrc/*.cu``, and a note when the check was skipped."""
    if not CSRC.is_dir():
        return _skipped(require, f"no csrc/ at {CSRC} (not an editable install?)")
    sources = sorted(CSRC.glob("*.cu"))
    if not sources:
        return _skipped(require, f"no .cu files in {CSRC}")
    try:
        from fastlm import build_config
    except ImportError as exc:
        return _skipped(require, f"fastlm.build_config does not import ({exc})")
    nvcc = build_config.nvcc_path()
    if nvcc is None:
        return _skipped(require, "no nvcc (set CUDA_HOME or put nvcc on PATH)")
    archs = build_config.cuda_archs()
    includes = [f"-I{d}" for d in [CSRC, *build_config.nvidia_include_dirs()]]
    command = [nvcc, *build_config.nvcc_flags(archs), *includes]
    with concurrent.futures.ThreadPoolExecutor(max(jobs, 1)) as pool:
        per_file = pool.map(lambda cu: compile_cuda_file(cu, command), sources)
        return [row for rows in per_file for row in rows], None


def _skipped(require: bool, why: str) -> tuple[list[Row], str | None]:
    if require:
        return [Row("cuda", "csrc", "-", error=f"--require-cuda: {why}")], None
    return [], f"CUDA C++ check skipped: {why}"


# ---------------------------------------------------------------------------------------------
# Report


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain-text table, columns left-aligned to their widest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def report(rows: Sequence[Row]) -> str:
    headers = (
        "source",
        "kernel",
        "arch",
        "regs",
        "stack",
        "spill st/ld",
        "smem",
        "tc",
        "widest ld",
        "s",
        "status",
    )
    body = []
    for row in rows:
        found = problems(row)
        status = "ok" if not found else "FAIL: " + found[0].splitlines()[0][:60]
        load = "-" if row.widest_load is None else f"{row.widest_load}b"
        body.append(
            (
                row.source,
                row.label,
                row.arch,
                "-" if row.regs is None else row.regs,
                row.stack,
                f"{row.spill_stores}/{row.spill_loads}",
                row.shared,
                row.tensor_cores,
                load,
                f"{row.seconds:.1f}",
                status,
            )
        )
    return format_table(headers, body)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastlm.kernels.compile_check", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument(
        "--require-cuda",
        action="store_true",
        help="fail (instead of skipping) when csrc/ or nvcc is missing (CI)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel compiles (default 2)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows = check_triton(KERNEL_MODULES, args.jobs)
    cuda_rows, note = check_cuda(args.require_cuda, args.jobs)
    rows += cuda_rows
    elapsed = time.perf_counter() - start

    print(report(rows))
    if note:
        print(note)
    failures = [(row, found) for row in rows if (found := problems(row))]
    for row, found in failures:
        print(f"\n{row.source} {row.label} [{row.arch}]:\n  " + "\n  ".join(found))
    print(
        f"\n{len(rows)} compiles, {len(failures)} failing, {elapsed:.1f} s "
        f"(triton {triton.__version__}, {args.jobs} jobs)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "triton": triton.__version__,
            "seconds": elapsed,
            "skipped": note,
            "rows": [dict(dataclasses.asdict(r), problems=problems(r)) for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
