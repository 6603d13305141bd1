"""Compiling a kernel's TileLang program for a target arch."""

from __future__ import annotations

import tilelang

from .common import target

# ptxas turns a register spill into an error, so a spilling schedule fails to compile.
NO_SPILLS = ["--ptxas-options=--warn-on-spills,--warning-as-error"]
# Flush denormals to zero: exp2 then compiles to a bare MUFU.EX2, without the range guard
# around every exponential (the loops' softmax is full of them).
FAST_ARITHMETIC = ["-ftz=true"]


def compile_program(program, arch: str, forbid_spills: bool = True,
                    fast_arithmetic: bool = True):
    """Compile a TileLang program for `arch` (e.g. "sm_90a"); callers preallocate outputs.
    The kernel keeps the flags it was built with (`kernel.compile_flags`), for whatever
    must build it the same way (the static kernel gate)."""
    flags = (FAST_ARITHMETIC if fast_arithmetic else []) + (NO_SPILLS if forbid_spills else [])
    return tilelang.compile(program, out_idx=None, target=target(arch), compile_flags=flags)
