"""The static GPU check's parsers and pass/fail rule, and one real sm_90 compile."""

from __future__ import annotations

import importlib.util

import pytest
import triton
import triton.language as tl
from fastlm.kernels import compile_check as cc
from fastlm.kernels.launch import KernelSpec

PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN6fastlm3fwdEPf' for 'sm_90a'
ptxas info    : Function properties for _ZN6fastlm3fwdEPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 380 bytes cmem[0]
ptxas info    : Function properties for _ZN6fastlm6helperEf
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_ZN6fastlm3bwdEPf' for 'sm_80'
ptxas info    : Function properties for _ZN6fastlm3bwdEPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""

SASS = """\
\tcode for sm_90a
\t\tFunction : _fwd
        /*0120*/              @!P2 LDG.E.128 R8, desc[UR6][R12.64] ;   /* 0x000000060c08a981 */
        /*0130*/                   LDG.E.U16 R4, desc[UR6][R2.64] ;    /* 0x000000060204b981 */
        /*0140*/                   STL.64 [R1], R4 ;                    /* 0x0000000401007387 */
        /*0150*/                   LDL R6, [R1+0x8] ;                   /* 0x0000080001067983 */
\t\tFunction : _bwd
        /*0010*/              @P0 LDG.E.EL.U16 R0, desc[UR4][R2.64] ;   /* 0x0000000402008981 */
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x0 */
\tcode for sm_80
\t\tFunction : _bwd
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR4][R4.64] ; /* 0x0 */
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ; /* 0x0000000c0804723c */
"""


def test_parse_ptxas_takes_each_entry_per_arch_and_ignores_callee_blocks():
    fwd, bwd = cc.parse_ptxas(PTXAS)
    assert (fwd.label, fwd.arch, fwd.regs, fwd.shared) == ("_ZN6fastlm3fwdEPf", "sm_90a", 255, 2048)
    assert (fwd.stack, fwd.spill_stores, fwd.spill_loads) == (8, 8, 4)
    assert (bwd.label, bwd.arch, bwd.regs, bwd.shared, bwd.stack) == (
        "_ZN6fastlm3bwdEPf",
        "sm_80",
        40,
        0,
        0,
    )


def test_sass_is_split_by_function_and_arch():
    bodies = cc.split_sass(SASS)
    assert set(bodies) == {("_fwd", "sm_90a"), ("_bwd", "sm_90a"), ("_bwd", "sm_80")}
    assert "LDGSTS" in bodies[("_bwd", "sm_80")] and "LDGSTS" not in bodies[("_bwd", "sm_90a")]


@pytest.mark.parametrize(
    ("opcode", "bits"),
    [
        ("LDG.E.128", 128),
        ("LDG.E.64", 64),
        ("LDG.E", 32),
        ("LDG.E.U16", 16),
        ("LDG.E.EL.S8", 8),
        ("LDGSTS.E.BYPASS.LTC128B.128", 128),
    ],
)
def test_access_bits(opcode, bits):
    assert cc.access_bits(opcode) == bits


def test_sass_stats_reads_widest_load_spills_and_tensor_cores():
    bodies = cc.split_sass(SASS)
    fwd = cc.sass_stats(bodies[("_fwd", "sm_90a")])
    assert (fwd.widest_load, fwd.spill_stores, fwd.spill_loads, fwd.tensor_cores) == (
        128,
        8,
        4,
        "-",
    )
    narrow = cc.sass_stats(bodies[("_bwd", "sm_90a")])
    assert (narrow.widest_load, narrow.tensor_cores) == (16, "wgmma")
    pipelined = cc.sass_stats(bodies[("_bwd", "sm_80")])
    assert (pipelined.widest_load, pipelined.tensor_cores) == (128, "mma")
    assert cc.sass_stats("").widest_load is None


def test_parse_res_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _rms_fwd:
  REG:40 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:584 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = cc.parse_res_usage(text)["_rms_fwd"]
    assert (usage["REG"], usage["STACK"], usage["SHARED"]) == (40, 16, 1024)


def _row(**fields) -> cc.Row:
    base = dict(source="triton", label="k", arch="sm_90", regs=32, widest_load=128)
    return cc.Row(**(base | fields))


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"error": "CompilationError: boom"}, "error"),
        ({"spill_stores": 4}, "spills"),
        ({"spill_loads": 4}, "spills"),
        ({"shared": 227 * 1024 + 1}, "shared memory"),
        ({"arch": "sm_80", "shared": 164 * 1024}, "shared memory"),
        ({"needs_wide_loads": True, "widest_load": 16}, "128-bit"),
        ({"needs_wide_loads": True, "widest_load": None}, "128-bit"),
        ({"needs_wgmma": True, "tensor_cores": "mma"}, "wgmma"),
        ({"arch": "sm_80", "needs_wgmma": True, "tensor_cores": "-"}, "tensor-core"),
    ],
)
def test_problems_flags_each_rule(fields, reason):
    found = cc.problems(_row(**fields))
    assert len(found) == 1 and reason in found[0]


def test_problems_passes_a_clean_row():
    assert cc.problems(_row(needs_wide_loads=True, shared=227 * 1024)) == []
    assert cc.problems(_row(widest_load=16)) == []  # narrow loads only matter when required
    assert cc.problems(_row(arch="sm_90a", shared=200 * 1024)) == []
    assert cc.problems(_row(needs_wgmma=True, tensor_cores="wgmma")) == []
    assert cc.problems(_row(arch="sm_80", needs_wgmma=True, tensor_cores="mma")) == []


def test_unknown_spec_argument_is_a_clear_error():
    spec = KernelSpec("bad", _copy_kernel, {"X": "*bf16", "Y": "*bf16", "n": "i32"}, {}, 4)
    with pytest.raises(ValueError, match="BLOCK"):
        cc.ast_source(spec)


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


@pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="triton's nvidia backend is not installed",
)
def test_real_sm90_compile_reports_registers_and_wide_loads():
    spec = KernelSpec(
        "copy",
        _copy_kernel,
        {"X": "*bf16", "Y": "*bf16", "n": "i32"},
        {"BLOCK": 1024},
        num_warps=4,
        aligned=("X", "Y", "n"),
    )
    row = cc.compile_triton(spec, 90)
    assert row.error is None
    assert row.regs > 0 and row.spill_stores == row.spill_loads == 0
    assert row.widest_load == 128 and cc.problems(row) == []
