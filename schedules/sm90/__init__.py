"""Hopper (sm_90a): TMA loads, wgmma and warp specialisation through TileLang.

This file declares the arch (see `schedules.archs`): its target, the GPUs it serves, its
limits, the block sizes its kernels are built for, and its kernel table. Each tunable
kernel's module declares its schedule knobs (`default_schedule`, `search_space`,
`alternatives`); `programs` says which TileLang program a kernel is for its knobs.
"""

from ..archs import Arch, KernelDef

SHARED_MEMORY_BYTES = 227 * 1024
"""Shared memory one CTA may use on Hopper (the kernel modules import it from here)."""

# After the limit above, which the kernel modules import from this package.
from . import (  # noqa: E402
    backward_dkdv,
    backward_dq,
    backward_query,
    forward,
    key_pass,
    programs,
    reverse_lut,
    select,
)

ARCH = Arch(
    name="sm90",
    target="sm_90a",
    spellings=("sm90", "sm_90", "sm_90a"),
    capabilities=((9, 0),),
    shared_memory_bytes=SHARED_MEMORY_BYTES,
    block_q=(64, 128),
    block_kv=(64, 128),
    kernels={
        "pool": KernelDef(programs.pool),
        "select": KernelDef(programs.select, limits={"key_blocks": select.MAX_KEY_BLOCKS}),
        "key_major": KernelDef(programs.key_major,
                               limits={"query_blocks": reverse_lut.MAX_QUERY_BLOCKS}),
        # Without flush-to-zero: compiled with it, the CTA that gets a single key block hung
        # on the H200 (TileLang's warp-specialised pipeline of one iteration, a known
        # upstream hazard); compiled without it, every case of the GPU tests has passed.
        "key_pass": KernelDef(programs.key_pass, tuning=key_pass, fast_arithmetic=False),
        "forward": KernelDef(programs.sla_forward, tuning=forward),
        "gated_forward": KernelDef(programs.gated_forward, tuning=forward, tuned_as="forward"),
        "backward_query": KernelDef(programs.backward_query, tuning=backward_query),
        "gated_backward_query": KernelDef(programs.gated_backward_query, tuning=backward_query,
                                          tuned_as="backward_query"),
        "backward_dq": KernelDef(programs.sla_backward_dq, tuning=backward_dq),
        "backward_dkdv": KernelDef(programs.sla_backward_dkdv, tuning=backward_dkdv),
    },
)
