"""The static kernel gate's logic on synthetic facts and tool output (compiling every
kernel runs in `sla-tl kernels`): reading the facts, the facts cache, the record, the
checks and their messages."""

from __future__ import annotations

import json
import warnings

import pytest

from sla_tl import cuda_tools, kernels, static_cache, static_check
from sla_tl.kernels import KernelSpec
from sla_tl.plan import kernels_for
from sla_tl.schedules import compile as schedules_compile
from sla_tl.settings import Settings
from sla_tl.static_check import KernelFacts

from .test_sass import PIPELINED, listing

BASE = KernelFacts("forward:x", registers=168, spill_bytes=0, shared_bytes=231424,
                   threads=384, wgmma=True, tma=True, hgmma=True, setmaxnreg=(240, 24),
                   local_memory_ops=0, loop_instructions=427, groups_in_flight=1,
                   overlapped_exp2=32)
RECORD = {BASE.name: BASE}
RECORD_PATH = static_check.record_path("sm_90a")


# The checks and their messages


def test_identical_facts_pass():
    assert static_check.compare([BASE], RECORD) == []
    assert static_check.diff([BASE], RECORD) == []


def test_spill_fails_even_when_recorded():
    spilled = BASE._replace(spill_bytes=16)
    assert static_check.compare([spilled], {BASE.name: spilled}) == [
        "forward:x: spills 16 bytes"]


def test_register_rise_beyond_margin_fails_and_within_passes():
    within = BASE._replace(registers=BASE.registers + static_check.REGISTER_MARGIN)
    beyond = BASE._replace(registers=BASE.registers + static_check.REGISTER_MARGIN + 1)
    assert static_check.compare([within], RECORD) == []
    assert static_check.compare([beyond], RECORD) == ["forward:x: registers 168 -> 177"]


def test_lost_tma_or_wgmma_or_hgmma_or_smem_change_fails():
    changed = BASE._replace(tma=False, wgmma=False, hgmma=False, shared_bytes=1024)
    assert static_check.compare([changed], RECORD) == [
        "forward:x: shared_bytes 231424 -> 1024",
        "forward:x: wgmma True -> False",
        "forward:x: tma True -> False",
        "forward:x: hgmma True -> False",
    ]


def test_a_changed_setmaxnreg_fails():
    assert static_check.compare([BASE._replace(setmaxnreg=(232, 40))], RECORD) == [
        "forward:x: setmaxnreg 240/24 -> 232/40"]
    assert static_check.compare([BASE._replace(setmaxnreg=())], RECORD) == [
        "forward:x: setmaxnreg 240/24 -> none"]


def test_local_memory_appearing_fails():
    assert static_check.compare([BASE._replace(local_memory_ops=6)], RECORD) == [
        "forward:x: local memory: 6 LDL/STL instructions (recorded 0)"]


def test_main_loop_growth_beyond_margin_fails_and_within_passes():
    allowed = int(BASE.loop_instructions * (1 + static_check.LOOP_MARGIN))
    assert static_check.compare([BASE._replace(loop_instructions=allowed)], RECORD) == []
    assert static_check.compare([BASE._replace(loop_instructions=300)], RECORD) == []
    assert static_check.compare([BASE._replace(loop_instructions=allowed + 1)], RECORD) == [
        f"forward:x: main loop 427 -> {allowed + 1} instructions (+5.2%, margin 5%)"]


def test_a_lost_main_loop_fails():
    assert static_check.compare([BASE._replace(loop_instructions=0)], RECORD) == [
        "forward:x: no loop with HGMMA any more (recorded 427 instructions)"]


def test_a_lost_overlap_fails_and_a_kernel_that_never_had_one_passes():
    lost = BASE._replace(groups_in_flight=0, overlapped_exp2=0)
    assert static_check.compare([lost], RECORD) == [
        "forward:x: wgmma groups in flight at the softmax's exponentials 1 -> 0 "
        "(the softmax no longer overlaps a GEMM)"]
    assert static_check.compare([lost], {lost.name: lost}) == []
    deeper = {BASE.name: BASE._replace(groups_in_flight=2)}
    assert static_check.compare([BASE], deeper) == [
        "forward:x: wgmma groups in flight at the softmax's exponentials 2 -> 1"]


def test_unrecorded_kernel_fails():
    assert static_check.compare([BASE._replace(name="new:y")], RECORD) == [
        "new:y: not in the record"]


def test_diff_lists_every_change_failing_or_not():
    better = BASE._replace(registers=BASE.registers - 24, loop_instructions=400,
                           overlapped_exp2=34)
    new = BASE._replace(name="new:y")
    stale = {**RECORD, "old:z": BASE._replace(name="old:z")}
    assert static_check.diff([better, new], stale) == [
        "forward:x: registers 168 -> 144",
        "forward:x: loop_instructions 427 -> 400",
        "forward:x: overlapped_exp2 32 -> 34",
        "new:y: new kernel (168 registers, 0 B spilled, main loop 427 instructions)",
        "old:z: recorded, no longer built",
    ]
    assert static_check.compare([better], RECORD) == []  # a fall is reported, not failed


def test_table_has_a_heading_and_a_line_per_kernel():
    lines = static_check.table([BASE, BASE._replace(name="pool:y", hgmma=False,
                                                    setmaxnreg=(), loop_instructions=0)])
    assert lines[0].split() == ["kernel", "regs", "spill", "smem", "thr", "wgmma", "TMA",
                                "HGMMA", "maxnreg", "LDL/STL", "loop", "in-flight", "EX2"]
    assert lines[1].split() == ["forward:x", "168", "0", "231424", "384", "yes", "yes", "yes",
                                "240/24", "0", "427", "1", "32"]
    assert lines[2].split()[7:9] == ["no", "none"]
    assert len({len(line) for line in lines}) == 1


# Reading the facts from the tools' output

PTXAS_REPORT = """\
ptxas info    : Compiling entry function 'main_kernel' for 'sm_90a'
ptxas info    : Function properties for tl_helper
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for main_kernel
    0 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 168 registers, used 4 barriers, 1024 bytes smem
"""
SOURCE = "extern \"C\" __global__ void __launch_bounds__(384, 1) main_kernel() { " \
         "tl::tma_load(); tl::wgmma_ss(); }"
HOST = "(((v_int64) = ((int64_t)384);  (v_int64) = ((int64_t)230400);"


def test_read_facts_takes_each_fact_from_its_source():
    facts = static_check.read_facts("forward:x", SOURCE, HOST, PTXAS_REPORT,
                                    listing(*PIPELINED))
    assert facts == KernelFacts("forward:x", registers=168, spill_bytes=12,
                                shared_bytes=230400 + 1024, threads=384, wgmma=True, tma=True,
                                hgmma=True, setmaxnreg=(240,), local_memory_ops=0,
                                loop_instructions=11, groups_in_flight=1, overlapped_exp2=2)


def test_a_ptxas_report_without_the_entry_function_is_a_clear_error():
    with pytest.raises(RuntimeError, match="ptxas reported no main_kernel"):
        static_check.read_facts("forward:x", SOURCE, HOST, "ptxas info : nothing",
                                listing(*PIPELINED))


def test_device_flags_are_the_kernels_own_in_tilelangs_order():
    from tilelang.transform import PassConfigKey

    class Compiled:
        compile_flags = ["-ftz=true", "--ptxas-options=--warn-on-spills,--warning-as-error"]
        pass_configs = {PassConfigKey.TL_DEVICE_COMPILE_FLAGS: "-DX=1 -DY=2",
                        PassConfigKey.TL_ENABLE_FAST_MATH: True,
                        PassConfigKey.TL_PTXAS_REGISTER_USAGE_LEVEL: 5}

    assert static_check.device_flags(Compiled()) == [
        "-DX=1", "-DY=2", "-ftz=true", "--ptxas-options=--warn-on-spills,--warning-as-error",
        "--use_fast_math", "--ptxas-options=--register-usage-level=5"]


def test_each_kernel_is_checked_with_the_flags_it_is_built_with(monkeypatch):
    """The key pass is built without flush-to-zero, the forward with it; what
    `compile_program` passes TileLang is what the gate compiles with."""
    class Compiled:
        pass_configs = None

        def __init__(self, compile_flags):
            self.compile_flags = compile_flags

    monkeypatch.setattr(schedules_compile.tilelang, "compile",
                        lambda program, compile_flags, **options: Compiled(compile_flags))
    specs = kernels_for("sm_90a", 64, "bfloat16", Settings(block_q=64, block_kv=64),
                        backward=False)
    key_pass, forward = (kernels.compiled.__wrapped__(next(s for s in specs if s.kind == kind))
                         for kind in ("key_pass", "forward"))
    assert "-ftz=true" not in static_check.device_flags(key_pass)
    assert static_check.device_flags(forward) == [*schedules_compile.FAST_ARITHMETIC,
                                                  *schedules_compile.NO_SPILLS]


def test_a_compiled_tilelang_kernel_keeps_its_flags():
    pool = next(s for s in kernels_for("sm_90a", 64, "bfloat16",
                                       Settings(block_q=64, block_kv=64)) if s.kind == "pool")
    kernel = kernels.compiled(pool)
    assert static_check.device_flags(kernel) == [*schedules_compile.FAST_ARITHMETIC,
                                                 *schedules_compile.NO_SPILLS]


# The facts cache


class FakeKernel:
    """What `kernel_facts` reads of a compiled TileLang kernel."""

    pass_configs = None

    def __init__(self, source: str = SOURCE, flags: tuple[str, ...] = ("-ftz=true",)):
        self.source, self.compile_flags = source, list(flags)

    def get_kernel_source(self) -> str:
        return self.source

    def get_host_source(self) -> str:
        return HOST


SPEC = KernelSpec("forward", (("dim", 128), ("block_q", 128), ("block_kv", 64),
                              ("dtype", "bfloat16"), ("feature", "softmax"), ("layout", "bhsd"),
                              ("scale", 0.08)), "sm_90a")
SPEC_NAME = "forward:128,128,64,bfloat16,softmax,bhsd,sm_90a"


@pytest.fixture
def fake_tools(tmp_path, monkeypatch):
    """Kernels and tools faked (a kernel per spec, builds counted); the cache in tmp_path."""
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    builds = []
    kernel = FakeKernel()

    def build(source, arch, flags):
        builds.append((source, arch, list(flags)))
        return cuda_tools.Build(PTXAS_REPORT, listing(*PIPELINED))

    monkeypatch.setattr(kernels, "compiled", lambda spec: kernel)
    monkeypatch.setattr(cuda_tools, "build", build)
    monkeypatch.setattr(cuda_tools, "version", lambda executable: "release 13.0, V13.0.88")
    monkeypatch.setattr(cuda_tools, "tool", lambda name: f"/opt/cuda/bin/{name}")
    return kernel, builds


def _entries(tmp_path):
    return sorted((tmp_path / static_cache.SUBDIRECTORY).glob("*.json"))


def test_a_second_read_is_a_cache_hit(fake_tools, tmp_path):
    _, builds = fake_tools
    first = static_check.kernel_facts(SPEC)
    assert first.name == SPEC_NAME and first.loop_instructions == 11
    assert len(builds) == 1 and len(_entries(tmp_path)) == 1
    assert static_check.kernel_facts(SPEC) == first
    assert len(builds) == 1


@pytest.mark.parametrize("change", ["source", "flags", "nvcc"])
def test_a_changed_source_flag_or_compiler_is_a_miss(fake_tools, tmp_path, monkeypatch,
                                                      change):
    kernel, builds = fake_tools
    static_check.kernel_facts(SPEC)
    if change == "source":
        kernel.source = SOURCE.replace("384", "256")
    elif change == "flags":
        kernel.compile_flags = []
    else:
        monkeypatch.setattr(cuda_tools, "version", lambda executable: "release 13.1")
    static_check.kernel_facts(SPEC)
    assert len(builds) == 2 and len(_entries(tmp_path)) == 2
    assert builds[1][2] == kernel.compile_flags  # built with the kernel's own flags


@pytest.mark.parametrize("damage", [
    "{not json",
    "[]",
    '{"key": "another", "facts": {}}',
    "MISSING_FIELD",
    "WRONG_TYPE",
])
def test_a_damaged_entry_is_named_and_recomputed(fake_tools, tmp_path, damage):
    _, builds = fake_tools
    facts = static_check.kernel_facts(SPEC)
    (path,) = _entries(tmp_path)
    entry = json.loads(path.read_text())
    if damage == "MISSING_FIELD":
        del entry["facts"]["loop_instructions"]
        damage = json.dumps(entry)
    elif damage == "WRONG_TYPE":
        entry["facts"]["setmaxnreg"] = "240/24"
        damage = json.dumps(entry)
    path.write_text(damage)
    with pytest.warns(static_cache.StaticCacheWarning,
                      match=rf"damaged static-facts cache entry {path} .*; recomputing it"):
        assert static_check.kernel_facts(SPEC) == facts
    assert len(builds) == 2
    assert json.loads(path.read_text())["facts"] == static_check.facts_to_json(facts)


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_failure(fake_tools, tmp_path,
                                                                   monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(blocker))
    with pytest.warns(static_cache.StaticCacheWarning,
                      match=rf"cannot write the static-facts cache entry {blocker}"):
        assert static_check.kernel_facts(SPEC).name == SPEC_NAME


def test_collect_raises_a_workers_warnings_in_the_caller(fake_tools, tmp_path):
    static_check.kernel_facts(SPEC)
    (path,) = _entries(tmp_path)
    path.write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = static_check.collect([SPEC], workers=1)
    assert [f.name for f in facts] == [SPEC_NAME]
    assert [w.category for w in caught] == [static_cache.StaticCacheWarning]
    assert str(path) in str(caught[0].message)


# The committed record


def test_facts_survive_the_json_round_trip():
    assert static_check.facts_from_json(BASE.name, static_check.facts_to_json(BASE)) == BASE
    with pytest.raises(TypeError, match="forward:x: registers must be counts; got -1"):
        static_check.facts_from_json(BASE.name, {**static_check.facts_to_json(BASE),
                                                 "registers": -1})
    with pytest.raises(TypeError, match="forward:x: hgmma must be true or false; got 1"):
        static_check.facts_from_json(BASE.name, {**static_check.facts_to_json(BASE),
                                                 "hgmma": 1})


def test_record_covers_every_shipped_kernel():
    record = static_check.load_record(RECORD_PATH)
    names = {spec.name for spec in static_check.shipped_kernels("sm_90a")}
    assert names <= set(record), sorted(names - set(record))
    assert all(entry.spill_bytes == 0 and entry.local_memory_ops == 0
               for entry in record.values())


def test_shipped_kernels_use_wgmma_and_tma_where_expected():
    record = static_check.load_record(RECORD_PATH)
    for name, entry in record.items():
        kind = name.split(":")[0].removeprefix("gated_")  # a gated variant is its kernel's kind
        # Warp-level scans (a warp per row of scores; per key block of the LUT): no GEMM,
        # no bulk copy.
        if kind in ("select", "key_major"):
            assert not (entry.wgmma or entry.hgmma or entry.tma), name
            continue
        assert entry.wgmma == entry.hgmma == (kind != "pool"), name
        # Every GEMM kernel loads by TMA, the query pass too (its default `loads="tma"`).
        assert entry.tma, name
        assert (entry.loop_instructions > 0) == (kind not in ("pool", "backward_query")), name


def test_the_hand_written_forward_overlaps_softmax_with_a_gemm():
    """The default forward at 128-row query blocks (two or more stages fit) is the
    hand-written one: its loop leaves a wgmma group in flight over the exponentials."""
    record = static_check.load_record(RECORD_PATH)
    for name, entry in record.items():
        if name.startswith(("forward:", "gated_forward:")):
            dim, block_q, block_kv = (int(v) for v in name.split(":")[1].split(",")[:3])
            manual = kernels.default_knobs("sm_90a", "forward", dim, block_q, block_kv)[
                "warp_specialization"] != "auto"
            assert (entry.groups_in_flight >= 1 and entry.overlapped_exp2 > 0) == manual, name


# The command


def test_the_command_prints_the_table_the_differences_and_each_failure(monkeypatch, capsys):
    from sla_tl import cli

    lost = BASE._replace(groups_in_flight=0, overlapped_exp2=0, loop_instructions=460)
    monkeypatch.setattr(static_check, "shipped_kernels", lambda arch: [SPEC])
    monkeypatch.setattr(static_check, "collect", lambda specs, workers, progress: [lost])
    monkeypatch.setattr(static_check, "load_record", lambda path: RECORD)
    assert cli.main(["kernels"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == "kernel" and out[2].split()[0] == "forward:x"
    assert out[out.index(f"differences from {RECORD_PATH}:") + 1:][:3] == [
        "  forward:x: loop_instructions 427 -> 460",
        "  forward:x: groups_in_flight 1 -> 0",
        "  forward:x: overlapped_exp2 32 -> 0",
    ]
    assert [line for line in out if line.startswith("FAIL")] == [
        "FAIL forward:x: main loop 427 -> 460 instructions (+7.7%, margin 5%)",
        "FAIL forward:x: wgmma groups in flight at the softmax's exponentials 1 -> 0 "
        "(the softmax no longer overlaps a GEMM)",
    ]
    assert out[-1].startswith("static check failed: 2 problems")
    monkeypatch.setattr(static_check, "collect", lambda specs, workers, progress: [BASE])
    assert cli.main(["kernels"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "static check passed: 1 kernels within the record")
