"""Which implementation serves each device type: the one place that chooses.

The op layer (`sla_tl.ops`) registers, for each device type here, the backend's
`route`, `forward` and `backward` as that device's kernels.
"""

from __future__ import annotations

from types import ModuleType

from . import reference_backend, tilelang_backend

BACKENDS: dict[str, ModuleType] = {
    "cpu": reference_backend,
    "cuda": tilelang_backend,
}
