"""Which implementation serves each device type: the one place that chooses.

The op layer (`sla_tl.ops`) registers, for each device type here, the backend's
`route`, `forward` and `backward` as that device's kernels.
"""

from __future__ import annotations

from types import ModuleType

from . import reference_backend

BACKENDS: dict[str, ModuleType] = {
    "cpu": reference_backend,
    # The GPU runs the reference until the TileLang kernels serve this device.
    "cuda": reference_backend,
}
