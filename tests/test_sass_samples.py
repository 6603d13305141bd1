"""The SASS sample regions of `benchmarks.sass_samples`, on a small made-up ncu table."""

from __future__ import annotations

import csv
import gzip

import pytest

from sla_tl.benchmarks import sass_samples

HEADER = ["Address", "Source", sass_samples.SAMPLES, sass_samples.EXECUTED, "stall_wait",
          "stall_long_sb", "stall_wait (Not Issued)"]
ROWS = [
    ["0x0", "LDC R1, c[0x0][0x28]", "5", "10", "1", "4", "9"],
    ["0x10", "S2R R0, SR_TID.X", "1", "10", "1", "0", "9"],
    ["0x20", "HGMMA.64x64x16", "30", "400", "20", "10", "9"],
    ["0x30", "BRA 0x20", "10", "400", "0", "10", "9"],
    ["0x40", "EXIT", "4", "10", "0", "4", "9"],
]


def _write(path, rows, opener=open):
    with opener(path, "wt", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Kernel Name", "main_kernel"])
        writer.writerow(HEADER)
        writer.writerows(rows)


def test_regions_are_runs_of_equal_execution_counts(tmp_path):
    path = tmp_path / "sass.csv.gz"
    _write(path, ROWS, gzip.open)
    header, rows = sass_samples.read_rows(str(path))
    found = sass_samples.regions(header, rows)
    assert [(r.first_line, r.instructions, r.executions, r.samples) for r in found] == [
        (0, 2, 10, 6), (2, 2, 400, 40), (4, 1, 10, 4)]
    assert found[1].stalls["wait"] == 20 and found[1].stalls["long_sb"] == 20
    assert "wait (Not Issued)" not in found[1].stalls


def test_the_command_prints_the_regions_and_refuses_a_table_without_samples(tmp_path, capsys):
    path = tmp_path / "sass.csv"
    _write(path, ROWS)
    assert sass_samples.main([str(path), "--share", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "50 samples" in out and "80.0%" in out and "LDC" not in out
    bad = tmp_path / "bad.csv"
    bad.write_text("Address,Source\n0x0,NOP\n")
    with pytest.raises(SystemExit) as stop:
        sass_samples.main([str(bad)])
    assert stop.value.code == 2
    assert "no 'Warp Stall Sampling (All Samples)' column" in capsys.readouterr().err
