"""Which implementation serves each device type: the one place that chooses.

The op layer (`sla_tl.ops`) runs, for the inputs' device type, its backend's `route`,
`forward` (a given routing), `routed_forward` (routing, then the forward) and `backward`.
"""

from __future__ import annotations

from types import ModuleType

from . import reference_backend, tilelang_backend

BACKENDS: dict[str, ModuleType] = {
    "cpu": reference_backend,
    "cuda": tilelang_backend,
}
