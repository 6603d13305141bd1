"""The static kernel check's logic, on synthetic facts (compiling runs in `sla-tl kernels`)."""

from __future__ import annotations

from sla_tl import static_check
from sla_tl.static_check import KernelFacts

BASE = KernelFacts("forward:x", registers=168, spill_bytes=0, shared_bytes=164864, threads=384,
                   wgmma=True, tma=True)
RECORD = {BASE.name: BASE._asdict()}


def test_identical_facts_pass():
    assert static_check.compare([BASE], RECORD) == []


def test_spill_fails_even_when_recorded():
    spilled = BASE._replace(spill_bytes=16)
    assert static_check.compare([spilled], {BASE.name: spilled._asdict()}) == [
        "forward:x: spills 16 bytes"]


def test_register_rise_beyond_margin_fails_and_within_passes():
    within = BASE._replace(registers=BASE.registers + static_check.REGISTER_MARGIN)
    beyond = BASE._replace(registers=BASE.registers + static_check.REGISTER_MARGIN + 1)
    assert static_check.compare([within], RECORD) == []
    assert static_check.compare([beyond], RECORD) == ["forward:x: registers 168 -> 177"]


def test_lost_tma_or_wgmma_or_smem_change_fails():
    changed = BASE._replace(tma=False, wgmma=False, shared_bytes=1024)
    problems = static_check.compare([changed], RECORD)
    assert {p.split(": ")[1].split(" ")[0] for p in problems} == {"shared_bytes", "wgmma", "tma"}


def test_unrecorded_kernel_fails():
    assert static_check.compare([BASE._replace(name="new:y")], RECORD) == [
        "new:y: not in the record"]


def test_record_covers_every_shipped_kernel():
    record = static_check.load_record()
    names = {static_check.spec_name(spec) for spec in static_check.shipped_kernels()}
    assert names <= set(record), sorted(names - set(record))
    assert all(entry["spill_bytes"] == 0 for entry in record.values())


def test_shipped_kernels_use_wgmma_and_tma_where_expected():
    record = static_check.load_record()
    for name, entry in record.items():
        kind = name.split(":")[0].removeprefix("gated_")  # a gated variant is its kernel's kind
        assert entry["wgmma"] == (kind != "pool"), name
        # The query pass has no pipelined loop, so nothing there is a TMA copy.
        assert entry["tma"] == (kind != "backward_query"), name


def test_diff_lists_every_change_failing_or_not():
    fewer = BASE._replace(registers=BASE.registers - 24)
    new = BASE._replace(name="new:y")
    stale = {**RECORD, "old:z": BASE._replace(name="old:z")._asdict()}
    assert static_check.diff([fewer, new], stale) == [
        "forward:x: registers 168 -> 144",
        "new:y: new kernel (168 registers, 0 B spilled)",
        "old:z: recorded, no longer built",
    ]
    assert static_check.compare([fewer], RECORD) == []  # a fall is reported, not failed
    assert static_check.diff([BASE], RECORD) == []
