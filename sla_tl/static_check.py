"""Static facts about the shipped kernels, with no GPU, and the gate that compares them with
the committed record (`sla-tl kernels`).

Each kernel is compiled for its arch with the nvcc flags it is really built with, then read
three ways: its generated CUDA (wgmma? TMA? threads), ptxas's resource report of the entry
function (registers, spills, shared memory) and its SASS (HGMMA, USETMAXREG, local memory,
the main loop's length and whether its softmax overlaps a wgmma; see `sla_tl.sass`).

The facts are cached by what determines them (`cache_key`, `sla_tl.static_cache`): a kernel
whose source, target, flags and tools are unchanged is not compiled again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import re
import shlex
import typing
import warnings
from pathlib import Path
from typing import NamedTuple

from . import cuda_tools, kernels, sass, static_cache
from .kernels import KernelSpec
from .parallel import map_in_parallel
from .plan import kernels_for
from .settings import Settings
from .targets import arch_named


class KernelFacts(NamedTuple):
    """What one compiled kernel uses."""

    name: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    threads: int
    wgmma: bool
    tma: bool
    hgmma: bool
    setmaxnreg: tuple[int, ...]
    local_memory_ops: int
    loop_instructions: int
    groups_in_flight: int
    overlapped_exp2: int


_FIELD_TYPES = typing.get_type_hints(KernelFacts)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def facts_to_json(facts: KernelFacts) -> dict:
    """The JSON form of `facts` the record and the cache store (the name is their key)."""
    return {field: list(value) if isinstance(value, tuple) else value
            for field, value in facts._asdict().items() if field != "name"}


def facts_from_json(name: str, entry: object) -> KernelFacts:
    """`name`'s facts from their JSON form; ValueError or TypeError saying what is wrong."""
    if not isinstance(entry, dict):
        raise TypeError(f"{name}: facts must be a JSON object; got {type(entry).__name__}")
    fields = KernelFacts._fields[1:]
    if set(entry) != set(fields):
        raise ValueError(f"{name}: facts must have the fields {', '.join(fields)}; missing "
                         f"{sorted(set(fields) - set(entry))}, unknown "
                         f"{sorted(set(entry) - set(fields))}")
    values = {}
    for field in fields:
        value, hint = entry[field], _FIELD_TYPES[field]
        if hint is bool:
            ok = isinstance(value, bool)
        elif hint is int:
            ok = _is_count(value)
        else:  # tuple[int, ...]
            ok = isinstance(value, list) and all(_is_count(v) for v in value)
            value = tuple(value) if ok else value
        if not ok:
            raise TypeError(f"{name}: {field} must be "
                            f"{'true or false' if hint is bool else 'counts'}; got {value!r}")
        values[field] = value
    return KernelFacts(name=name, **values)


def shipped_kernels(arch: str) -> list[KernelSpec]:
    """One kernel per distinct program the library builds with its default knobs, as the
    plans of calls launch them: every block-size pair the arch's kernels take at D=128, the
    128x64 pair at D=64, both linear modes, without and with a gate (bf16, softmax,
    (B, H, L, D))."""
    declared = arch_named(arch)
    configs = [(128, bq, bkv) for bq in declared.block_q for bkv in declared.block_kv]
    configs.append((64, 128, 64))
    specs = []
    for dim, block_q, block_kv in configs:
        for linear in ("marginal", "global"):
            s = Settings(block_q=block_q, block_kv=block_kv, linear=linear)
            for gated in (False, True):
                specs += kernels_for(arch, dim, "bfloat16", s, gated=gated)
    return list(dict.fromkeys(specs))


def device_flags(kernel) -> list[str]:
    """The nvcc flags beyond TileLang's own that a compiled TileLang kernel was built with,
    in the order TileLang's CUDA backend passes them: those of its pass configs, then the
    `compile_flags` given to `tilelang.compile` (`schedules.compile.compile_program`'s
    per-kernel choice; TileLang keeps them on the kernel), then fast math and the register
    usage level where a pass config asks for them."""
    from tilelang.transform import PassConfigKey

    configs = dict(kernel.pass_configs or {})
    flags = configs.get(PassConfigKey.TL_DEVICE_COMPILE_FLAGS) or []
    flags = [flags] if isinstance(flags, str) else list(flags)
    flags += list(kernel.compile_flags or [])
    tokens = [token for flag in flags for token in shlex.split(str(flag))]
    if configs.get(PassConfigKey.TL_ENABLE_FAST_MATH):
        tokens.append("--use_fast_math")
    level = configs.get(PassConfigKey.TL_PTXAS_REGISTER_USAGE_LEVEL)
    if level is not None:
        tokens.append(f"--ptxas-options=--register-usage-level={int(level)}")
    return tokens


def _entry_section(report: str) -> str:
    """The lines ptxas prints for `main_kernel` (helper functions are reported separately)."""
    start = report.find("Function properties for main_kernel")
    if start < 0:
        raise RuntimeError(f"ptxas reported no main_kernel:\n{report[-2000:]}")
    end = report.find("Function properties for", start + 1)
    return report[start:] if end < 0 else report[start:end]


def read_facts(name: str, source: str, host_source: str, ptxas_report: str,
               sass_text: str) -> KernelFacts:
    """A kernel's facts from its CUDA and host sources, ptxas's report and its SASS."""
    entry = _entry_section(ptxas_report)
    registers = int(re.search(r"Used (\d+) registers", entry).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry)
    static_smem = re.search(r"(\d+) bytes smem", entry)
    # The launch's dynamic shared memory is the last constant the host wrapper passes
    # (after the grid and block sizes); every kernel here uses some.
    dynamic = re.findall(r"v_int64\) = \(\(int64_t\)(\d+)\);", host_source)
    bounds = re.search(r"__launch_bounds__\((\d+)", source)
    instructions = sass.parse(sass.function_text(sass_text))
    if not instructions:
        raise RuntimeError(f"{name}: no instructions in the SASS of main_kernel")
    loop = sass.main_loop(instructions)
    groups, exp2 = sass.overlap(loop)
    return KernelFacts(
        name=name,
        registers=registers,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)),
        shared_bytes=(int(dynamic[-1]) if dynamic else 0)
        + (int(static_smem.group(1)) if static_smem else 0),
        threads=int(bounds.group(1)) if bounds else 0,
        wgmma="wgmma" in source,
        tma="tma_load" in source or "tma_store" in source,
        hgmma=sass.uses_hgmma(instructions),
        setmaxnreg=sass.setmaxnreg(instructions),
        local_memory_ops=sass.local_memory_ops(instructions),
        loop_instructions=len(loop),
        groups_in_flight=groups,
        overlapped_exp2=exp2,
    )


@functools.cache
def _reader_version() -> str:
    """A hash of the code that turns a kernel into facts: a change to it is a cache miss."""
    digest = hashlib.sha256()
    for module in (cuda_tools, sass):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def cache_key(source: str, host_source: str, arch: str, flags: list[str]) -> str:
    """The facts cache's key of a kernel: its CUDA and host sources, target and nvcc flags,
    the versions of nvcc, cuobjdump and TileLang, and the code that reads the facts."""
    import tilelang

    return static_cache.key({
        "source": source, "host": host_source, "arch": arch, "flags": flags,
        "nvcc": cuda_tools.version(cuda_tools.nvcc()),
        "cuobjdump": cuda_tools.version(cuda_tools.tool("cuobjdump")),
        "tilelang": tilelang.__version__,
        "reader": _reader_version(),
    })


def kernel_facts(spec: KernelSpec) -> KernelFacts:
    """`spec`'s static facts: from the facts cache, else by compiling it (the TileLang
    kernel itself comes from TileLang's cache where it is there) and reading the result."""
    name = spec.name
    kernel = kernels.compiled(spec)
    source, host_source = kernel.get_kernel_source(), kernel.get_host_source()
    flags = device_flags(kernel)
    key = cache_key(source, host_source, spec.arch, flags)
    cached = static_cache.load(key, functools.partial(facts_from_json, name))
    if cached is not None:
        return cached
    build = cuda_tools.build(source, spec.arch, flags)
    facts = read_facts(name, source, host_source, build.ptxas_report, build.sass)
    static_cache.store(key, facts_to_json(facts))
    return facts


def _facts_and_cache_warnings(spec: KernelSpec) -> tuple[KernelFacts, list[str]]:
    """`kernel_facts` in a worker process, with the cache's warnings for the parent to raise
    again (a worker's own display would bypass the command's one-line warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", static_cache.StaticCacheWarning)
        facts = kernel_facts(spec)
    ours = [w for w in caught if issubclass(w.category, static_cache.StaticCacheWarning)]
    for w in caught:
        if w not in ours:  # anything else shows as it would have
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return facts, [str(w.message) for w in ours]


def collect(specs: list[KernelSpec], workers: int | None = None,
            progress: bool = False) -> list[KernelFacts]:
    """Every distinct spec's facts, read in parallel processes, in order (with `progress`,
    a line per kernel on stderr); the cache's warnings are raised here, once each."""
    results = map_in_parallel(_facts_and_cache_warnings, specs, workers, progress)
    for message in dict.fromkeys(text for _, texts in results for text in texts):
        warnings.warn(message, static_cache.StaticCacheWarning, stacklevel=2)
    return [facts for facts, _ in results]


RECORD_FILE = "resources.json"


def record_path(arch: str) -> str:
    """The committed record of an arch's kernels: `resources.json` in its kernel folder."""
    package = importlib.import_module(f"{__package__}.schedules.{arch_named(arch).name}")
    return str(Path(package.__file__).with_name(RECORD_FILE))


# A schedule may use this many more registers than recorded before the check fails.
REGISTER_MARGIN = 8
# The main loop may grow by this share of its recorded instructions before the check fails
# (ptxas's scheduling moves a few instructions in or out of the loop on unrelated changes).
LOOP_MARGIN = 0.05
# Facts that must stay exactly as recorded.
EXACT_FIELDS = ("shared_bytes", "threads", "wgmma", "tma", "hgmma", "setmaxnreg")


def load_record(path: str) -> dict[str, KernelFacts]:
    """The committed static facts, by kernel name; ValueError naming the file if it cannot
    be read (rewrite it with `sla-tl kernels --write-record`)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the kernel record {path}: {error}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a kernel record (kernel name -> facts)")
    try:
        return {name: facts_from_json(name, entry) for name, entry in record.items()}
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a kernel record: {error} (rewrite it with "
                         "`sla-tl kernels --write-record`)") from None


def write_record(facts: list[KernelFacts], path: str) -> None:
    """Write `facts` as the committed record."""
    with open(path, "w") as f:
        json.dump({x.name: facts_to_json(x) for x in facts}, f, indent=1, sort_keys=True)
        f.write("\n")


def shown(value: object) -> str:
    """A fact as the gate prints it: register counts as "240/24" ("none" when empty)."""
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value) or "none"
    return str(value)


def compare(facts: list[KernelFacts], record: dict[str, KernelFacts]) -> list[str]:
    """Differences that fail the check: spills or more local memory, a kernel missing from
    the record, registers above the record by more than the margin, a main loop longer than
    the record by more than its margin or gone, fewer wgmma groups in flight at the
    softmax's exponentials, or any other shared memory, threads, wgmma, TMA, HGMMA or
    setmaxnreg."""
    problems = []
    for x in facts:
        if x.spill_bytes:
            problems.append(f"{x.name}: spills {x.spill_bytes} bytes")
        want = record.get(x.name)
        if want is None:
            problems.append(f"{x.name}: not in the record")
            continue
        if x.local_memory_ops > want.local_memory_ops:
            problems.append(f"{x.name}: local memory: {x.local_memory_ops} LDL/STL "
                            f"instructions (recorded {want.local_memory_ops})")
        if x.registers > want.registers + REGISTER_MARGIN:
            problems.append(f"{x.name}: registers {want.registers} -> {x.registers}")
        for field in EXACT_FIELDS:
            if getattr(x, field) != getattr(want, field):
                problems.append(f"{x.name}: {field} {shown(getattr(want, field))} -> "
                                f"{shown(getattr(x, field))}")
        if want.loop_instructions and not x.loop_instructions:
            problems.append(f"{x.name}: no loop with HGMMA any more (recorded "
                            f"{want.loop_instructions} instructions)")
        elif x.loop_instructions > want.loop_instructions * (1 + LOOP_MARGIN):
            growth = x.loop_instructions / max(want.loop_instructions, 1) - 1
            problems.append(f"{x.name}: main loop {want.loop_instructions} -> "
                            f"{x.loop_instructions} instructions (+{growth:.1%}, margin "
                            f"{LOOP_MARGIN:.0%})")
        if x.groups_in_flight < want.groups_in_flight:
            problems.append(
                f"{x.name}: wgmma groups in flight at the softmax's exponentials "
                f"{want.groups_in_flight} -> {x.groups_in_flight}"
                + (" (the softmax no longer overlaps a GEMM)" if not x.groups_in_flight else ""))
    return problems


def diff(facts: list[KernelFacts], record: dict[str, KernelFacts]) -> list[str]:
    """Every difference from the record, failing or not ("name: field recorded -> now"),
    and the recorded kernels no longer built."""
    lines = []
    for x in facts:
        want = record.get(x.name)
        if want is None:
            lines.append(f"{x.name}: new kernel ({x.registers} registers, "
                         f"{x.spill_bytes} B spilled, main loop {x.loop_instructions} "
                         "instructions)")
            continue
        lines += [f"{x.name}: {field} {shown(getattr(want, field))} -> "
                  f"{shown(getattr(x, field))}"
                  for field in KernelFacts._fields[1:] if getattr(x, field) != getattr(want, field)]
    built = {x.name for x in facts}
    lines += [f"{name}: recorded, no longer built" for name in sorted(set(record) - built)]
    return lines


# The table `sla-tl kernels` prints: (heading, fact) per column after the name.
_COLUMNS = (("regs", "registers"), ("spill", "spill_bytes"), ("smem", "shared_bytes"),
            ("thr", "threads"), ("wgmma", "wgmma"), ("TMA", "tma"), ("HGMMA", "hgmma"),
            ("maxnreg", "setmaxnreg"), ("LDL/STL", "local_memory_ops"),
            ("loop", "loop_instructions"), ("in-flight", "groups_in_flight"),
            ("EX2", "overlapped_exp2"))


def table(facts: list[KernelFacts]) -> list[str]:
    """The facts as a table, a heading and a line per kernel."""
    def cell(value: object) -> str:
        return ("yes" if value else "no") if isinstance(value, bool) else shown(value)

    rows = [["kernel", *(heading for heading, _ in _COLUMNS)]]
    rows += [[x.name, *(cell(getattr(x, field)) for _, field in _COLUMNS)] for x in facts]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [" ".join([row[0].ljust(widths[0])]
                     + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)])
            for row in rows]
