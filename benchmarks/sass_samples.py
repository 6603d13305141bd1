"""Where a kernel's warps spend their time, from Nsight Compute's SASS source page.

    python -m sla_tl.benchmarks.sass_samples counters_sass.csv[.gz] [--share 0.01]

Reads the CSV that `ncu --page source --csv --print-source sass` writes (gpu_check's
`counters` step, one kernel) and splits the SASS into *regions*: runs of consecutive
instructions executed the same number of times (a loop body, the code before or after it, a
branch taken per step). Prints each region holding at least `--share` of the warp-state
samples: its first line, instruction count, executions, share of the samples and its two
largest stall reasons. Samples are taken per warp at a fixed interval, so a region's share
is the share of warp time spent in it.
"""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import Counter
from typing import NamedTuple

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


class Region(NamedTuple):
    """Consecutive SASS lines executed equally often."""

    first_line: int
    source: str
    instructions: int
    executions: int
    samples: int
    stalls: Counter


def read_rows(path: str) -> tuple[list[str], list[list[str]]]:
    """The header and the instruction rows of a SASS source CSV (plain or gzipped)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    for index, row in enumerate(rows):
        if "Address" in row and "Source" in row:
            return row, [r for r in rows[index + 1:] if len(r) == len(row)]
    raise ValueError(f"{path}: no SASS source table (no header naming Address and Source)")


def regions(header: list[str], rows: list[list[str]]) -> list[Region]:
    """The rows grouped into regions, in address order."""
    for column in (SAMPLES, EXECUTED):
        if column not in header:
            raise ValueError(f"the SASS table has no {column!r} column")
    samples, executed, source = (header.index(c) for c in (SAMPLES, EXECUTED, "Source"))
    stall_columns = [(i, name.removeprefix("stall_")) for i, name in enumerate(header)
                     if name.startswith("stall_") and "Not Issued" not in name]
    found: list[Region] = []
    for line, row in enumerate(rows):
        count = int(row[executed] or 0)
        stalls = Counter({name: int(row[i] or 0) for i, name in stall_columns})
        if found and found[-1].executions == count:
            last = found[-1]
            found[-1] = last._replace(instructions=last.instructions + 1,
                                      samples=last.samples + int(row[samples] or 0),
                                      stalls=last.stalls + stalls)
        else:
            found.append(Region(line, row[source].strip(), 1, count, int(row[samples] or 0),
                                stalls))
    return found


def main(argv: list[str] | None = None) -> int:
    """Print the regions that hold at least `--share` of the samples."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu --page source --csv --print-source sass output")
    parser.add_argument("--share", type=float, default=0.01,
                        help="smallest share of all samples a region must hold to be shown")
    args = parser.parse_args(argv)
    try:
        header, rows = read_rows(args.csv)
        found = regions(header, rows)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    total = sum(r.samples for r in found) or 1
    print(f"{len(rows)} instructions, {total} samples")
    print(f"{'line':>6} {'instr':>6} {'executed':>10} {'share':>6}  stalls / first instruction")
    for r in found:
        if r.samples >= args.share * total:
            top = ", ".join(f"{name} {n / r.samples:.0%}" for name, n in
                            r.stalls.most_common(2) if n) if r.samples else ""
            print(f"{r.first_line:6d} {r.instructions:6d} {r.executions:10d} "
                  f"{r.samples / total:6.1%}  {top} / {r.source[:48]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
