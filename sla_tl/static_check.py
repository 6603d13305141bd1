"""Static facts about the shipped kernels, with no GPU: compile each for its arch, then read
the generated CUDA (wgmma? TMA? warp specialisation?) and ptxas's resource report
(registers, spills, shared memory) of the kernel's entry function.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from typing import NamedTuple

from . import kernels
from .schedules import sm90
from .settings import Settings
from .warm import KernelSpec, kernels_for_call, map_in_parallel


class KernelFacts(NamedTuple):
    """What one compiled kernel uses."""

    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    threads: int
    wgmma: bool
    tma: bool


def shipped_kernels(arch: str = "sm_90a") -> list[KernelSpec]:
    """One kernel per distinct schedule the library builds: every block-size pair the kernels
    take at D=128, the 128x64 pair at D=64, both linear modes, without and with a gate
    (bf16, softmax, (B, H, L, D))."""
    configs = [(128, bq, bkv) for bq in kernels.KERNEL_BLOCK_Q for bkv in kernels.KERNEL_BLOCK_KV]
    configs.append((64, 128, 64))
    specs = []
    for dim, block_q, block_kv in configs:
        for linear in ("marginal", "global"):
            s = Settings(block_q, block_kv, "softmax", linear, None, "bhsd")
            for gated in (False, True):
                specs += kernels_for_call(dim, "bfloat16", s, arch, gated=gated)
    return list(dict.fromkeys(specs))


def spec_name(spec: KernelSpec) -> str:
    """A stable, readable key for a kernel spec (the record's key)."""
    args = [a for a in spec.args if not isinstance(a, float)]  # the softmax scale follows D
    return spec.getter.removesuffix("_kernel") + ":" + ",".join(str(a) for a in args)


def _ptxas_report(source: str, arch: str) -> str:
    import tilelang.env as tl_env

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    number = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cu")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run(
            [nvcc, "--cubin", "-O3", "-std=c++20", "-w", f"-gencode=arch=compute_{number},"
             f"code=sm_{number}", "-I" + tl_env.TILELANG_TEMPLATE_PATH,
             "-I" + tl_env.CUTLASS_INCLUDE_DIR, "-Xptxas", "-v", "-o",
             os.path.join(tmp, "kernel.cubin"), path],
            capture_output=True, text=True,
        )
    if result.returncode:
        raise RuntimeError(f"nvcc failed:\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def _entry_section(report: str) -> str:
    """The lines ptxas prints for `main_kernel` (helper functions are reported separately)."""
    start = report.index("Function properties for main_kernel")
    end = report.find("Function properties for", start + 1)
    return report[start:] if end < 0 else report[start:end]


def kernel_facts(spec: KernelSpec) -> KernelFacts:
    """Compile `spec` (or load it from TileLang's cache) and read its static facts."""
    kernel = getattr(kernels, spec.getter)(*spec.args)
    source = kernel.get_kernel_source()
    arch = next(a for a in spec.args if isinstance(a, str) and a.startswith("sm_"))
    entry = _entry_section(_ptxas_report(source, arch))
    registers = int(re.search(r"Used (\d+) registers", entry).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    static_smem = re.search(r"(\d+) bytes smem", entry)
    host = kernel.get_host_source()
    # The launch's dynamic shared memory is the last constant the host wrapper passes
    # (after the grid and block sizes); every kernel here uses some.
    dynamic = re.findall(r"v_int64\) = \(\(int64_t\)(\d+)\);", host)
    bounds = re.search(r"__launch_bounds__\((\d+)", source)
    return KernelFacts(
        name=spec_name(spec),
        registers=registers,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=(int(dynamic[-1]) if dynamic else 0)
        + (int(static_smem.group(1)) if static_smem else 0),
        threads=int(bounds.group(1)) if bounds else 0,
        wgmma="wgmma" in source,
        tma="tma_load" in source or "tma_store" in source,
    )


def collect(specs: list[KernelSpec], workers: int | None = None) -> list[KernelFacts]:
    """Compile every distinct spec and read its facts, in parallel processes, in order."""
    return map_in_parallel(kernel_facts, specs, workers)


RECORD_PATH = os.path.join(os.path.dirname(sm90.__file__), "resources.json")
# A schedule may use this many more registers than recorded before the check fails.
REGISTER_MARGIN = 8


def load_record(path: str = RECORD_PATH) -> dict[str, dict]:
    """The committed static facts, by kernel name."""
    with open(path) as f:
        return json.load(f)


def write_record(facts: list[KernelFacts], path: str = RECORD_PATH) -> None:
    """Write `facts` as the committed record."""
    with open(path, "w") as f:
        json.dump({x.name: x._asdict() for x in facts}, f, indent=1, sort_keys=True)
        f.write("\n")


def compare(facts: list[KernelFacts], record: dict[str, dict]) -> list[str]:
    """Differences that fail the check: spills, a kernel missing from the record, registers
    above the record by more than the margin, or other shared memory, threads, wgmma, TMA."""
    problems = []
    for x in facts:
        if x.spill_bytes:
            problems.append(f"{x.name}: spills {x.spill_bytes} bytes")
        if x.name not in record:
            problems.append(f"{x.name}: not in the record")
            continue
        want = record[x.name]
        if x.registers > want["registers"] + REGISTER_MARGIN:
            problems.append(f"{x.name}: registers {want['registers']} -> {x.registers}")
        for field in ("shared_bytes", "threads", "wgmma", "tma"):
            if getattr(x, field) != want[field]:
                problems.append(f"{x.name}: {field} {want[field]} -> {getattr(x, field)}")
    return problems


def diff(facts: list[KernelFacts], record: dict[str, dict]) -> list[str]:
    """Every difference from the record, failing or not ("name: field recorded -> now"),
    and the recorded kernels no longer built."""
    lines = []
    for x in facts:
        want = record.get(x.name)
        if want is None:
            lines.append(f"{x.name}: new kernel ({x.registers} registers, "
                         f"{x.spill_bytes} B spilled)")
            continue
        lines += [f"{x.name}: {field} {want[field]} -> {getattr(x, field)}"
                  for field in KernelFacts._fields[1:] if getattr(x, field) != want[field]]
    built = {x.name for x in facts}
    lines += [f"{name}: recorded, no longer built" for name in sorted(set(record) - built)]
    return lines

