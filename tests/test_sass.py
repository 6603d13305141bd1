"""Reading SASS: instructions, loops, the main loop, the softmax/wgmma overlap, on small
synthetic listings in the format `cuobjdump -sass` prints (no compiler needed)."""

from __future__ import annotations

import pytest

from sla_tl import sass


def listing(*instructions: str, function: str = "main_kernel") -> str:
    """A `cuobjdump -sass` listing of one function, the i-th instruction at 0x10 * i, each
    followed by the encoding-only line cuobjdump prints."""
    lines = ["", "\tcode for sm_90a", f"\t\tFunction : {function}",
             '\t.headerflags\t@"EF_CUDA_ACCELERATORS EF_CUDA_SM90"']
    for index, text in enumerate(instructions):
        lines.append(f"        /*{16 * index:04x}*/                   {text} ;"
                     "                   /* 0x00000a00ff017b82 */")
        lines.append("                                                       "
                     "                   /* 0x000fe20000000800 */")
    return "\n".join(lines) + "\n"


def instructions(*texts: str) -> list[sass.Instruction]:
    return sass.parse(sass.function_text(listing(*texts)))


QK = "HGMMA.64x64x16.F32.BF16 R88, R148, gdesc[UR12], RZ, !UPT, gsb0"
PV = "HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR12].tnspB, R24, gsb0"

# The shape of the hand-written forward: a prologue, the loop (QK^T and PV issued, a wait
# leaving one group in flight, the exponentials, the full wait), the last EXIT, then the
# out-of-line retry path of an mbarrier wait that jumps back into the loop.
PIPELINED = [
    "S2R R0, SR_TID.X",                                    # 0x00
    "USETMAXREG.TRY_ALLOC.CTAPOOL UP1, 0xf0",              # 0x10
    QK,                                                    # 0x20
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",                       # 0x30
    "MUFU.EX2 R88, R24",                                   # 0x40  prologue softmax
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R10",      # 0x50  loop top
    "@!P0 BRA 0x110",                                      # 0x60  to the retry path
    QK,                                                    # 0x70
    PV,                                                    # 0x80
    "WARPGROUP.DEPBAR.LE gsb0, 0x1",                       # 0x90
    "MUFU.EX2 R88, R88",                                   # 0xa0
    "MUFU.EX2 R89, R89",                                   # 0xb0
    "FADD R2, R88, R89",                                   # 0xc0
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",                       # 0xd0
    "MUFU.EX2 R13, R13",                                   # 0xe0  after the full wait
    "@!P0 BRA 0x50",                                       # 0xf0  back edge
    "EXIT",                                                # 0x100
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR10], R10",      # 0x110 retry path
    "@!P0 BRA 0x110",                                      # 0x120
    "BRA 0x70",                                            # 0x130 back into the loop
    "BRA 0x140",                                           # 0x140 end of code
]


def test_parse_reads_address_predicate_opcode_and_operands_and_skips_encodings():
    parsed = instructions("@!P0 BRA 0x50", PV, "@UPT LDL.LU.64 R2, [R1+0x8]", "EXIT")
    assert parsed == [
        sass.Instruction(0x00, "@!P0", "BRA", "0x50"),
        sass.Instruction(0x10, "", "HGMMA.64x128x16.F32.BF16",
                         "R24, R152, gdesc[UR12].tnspB, R24, gsb0"),
        sass.Instruction(0x20, "@UPT", "LDL.LU.64", "R2, [R1+0x8]"),
        sass.Instruction(0x30, "", "EXIT", ""),
    ]
    assert [x.base for x in parsed] == ["BRA", "HGMMA", "LDL", "EXIT"]


def test_function_text_is_the_named_functions_part_only():
    two = listing("MUFU.EX2 R1, R1", function="helper") + listing(QK, "EXIT")
    assert [x.opcode for x in sass.parse(sass.function_text(two))] == [QK.split()[0], "EXIT"]
    assert [x.opcode for x in sass.parse(sass.function_text(two, "helper"))] == ["MUFU.EX2"]
    with pytest.raises(ValueError, match=r"no function main_kernel in the SASS \(functions: "
                                         r"helper\)"):
        sass.function_text(listing("EXIT", function="helper"))


def test_branches_after_the_last_exit_are_not_loops():
    parsed = instructions(*PIPELINED)
    assert sass.loops(parsed) == [(0x50, 0xf0)]
    body = sass.main_loop(parsed)
    assert (body[0].address, body[-1].address, len(body)) == (0x50, 0xf0, 11)


def test_several_branches_back_to_one_target_are_one_loop():
    parsed = instructions("NOP", QK, "@P1 BRA 0x10", "FADD R1, R1, R2", "@P0 BRA 0x10", "EXIT")
    assert sass.loops(parsed) == [(0x10, 0x40)]
    assert len(sass.main_loop(parsed)) == 4


def test_the_main_loop_is_the_innermost_with_hgmma():
    nested = instructions(
        "NOP",                    # 0x00 outer loop top
        "NOP",                    # 0x10 inner loop top
        QK,                       # 0x20
        "@P0 BRA 0x10",           # 0x30 inner back edge
        "@P1 BRA 0x00",           # 0x40 outer back edge
        "EXIT",
    )
    assert sass.loops(nested) == [(0x00, 0x40), (0x10, 0x30)]
    assert [x.address for x in sass.main_loop(nested)] == [0x10, 0x20, 0x30]
    # A spin-wait loop without HGMMA inside the main loop leaves it the main loop.
    spinning = instructions(
        "NOP",                                              # 0x00
        QK,                                                 # 0x10 loop top
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R11",    # 0x20
        "@!P0 BRA 0x20",                                    # 0x30 spin
        "@P1 BRA 0x10",                                     # 0x40 back edge
        "EXIT",
    )
    assert len(sass.main_loop(spinning)) == 4


def test_of_two_separate_hgmma_loops_the_main_one_has_more_hgmma():
    parsed = instructions("NOP", QK, "@P0 BRA 0x10", "NOP", QK, PV, "@P0 BRA 0x40", "EXIT")
    assert [x.address for x in sass.main_loop(parsed)] == [0x40, 0x50, 0x60]


def test_no_loop_with_hgmma_is_an_empty_main_loop():
    assert sass.main_loop(instructions(QK, "NOP", "@P0 BRA 0x10", "EXIT")) == []
    assert sass.overlap([]) == (0, 0)


def test_exponentials_after_a_partial_wait_overlap_a_gemm():
    assert sass.overlap(sass.main_loop(instructions(*PIPELINED))) == (1, 2)


def test_waits_for_every_group_overlap_nothing():
    serial = [x.replace("gsb0, 0x1", "gsb0, 0x0") for x in PIPELINED]
    assert sass.overlap(sass.main_loop(instructions(*serial))) == (0, 0)


def test_a_partial_wait_is_overlap_only_when_exponentials_follow_it():
    hoisted = ["NOP", QK, PV, "WARPGROUP.DEPBAR.LE gsb0, 0x1",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R1, R1", "MUFU.EX2 R2, R2",
               "@P0 BRA 0x10", "EXIT"]
    assert sass.overlap(sass.main_loop(instructions(*hoisted))) == (0, 0)


def test_the_overlap_window_wraps_around_the_back_edge():
    wrapped = ["NOP",
               "MUFU.EX2 R1, R1",                  # 0x10 loop top, still after the wait
               "MUFU.EX2 R2, R2",
               "WARPGROUP.DEPBAR.LE gsb0, 0x0",
               QK, PV,
               "WARPGROUP.DEPBAR.LE gsb0, 0x2",    # two groups left in flight
               "MUFU.EX2 R3, R3",
               "@P0 BRA 0x10", "EXIT"]
    assert sass.overlap(sass.main_loop(instructions(*wrapped))) == (2, 3)


def test_setmaxnreg_values_are_distinct_and_highest_first():
    parsed = instructions("USETMAXREG.DEALLOC.CTAPOOL 0x18", "USETMAXREG.TRY_ALLOC.CTAPOOL UP1, "
                          "0xf0", "USETMAXREG.TRY_ALLOC.CTAPOOL UP1, 0xf0", "EXIT")
    assert sass.setmaxnreg(parsed) == (240, 24)
    assert sass.setmaxnreg(instructions("EXIT")) == ()


def test_local_memory_is_ldl_and_stl_only():
    parsed = instructions("LDL.LU.64 R2, [R1+0x8]", "STL.128 [R1], R4", "LDS R2, [R3]",
                          "STS [R3], R2", "LDG.E R2, desc[UR4][R2.64]", "EXIT")
    assert sass.local_memory_ops(parsed) == 2
    assert sass.uses_hgmma(parsed) is False
    assert sass.uses_hgmma(instructions(QK, "EXIT")) is True
