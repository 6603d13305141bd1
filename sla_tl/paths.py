"""Where sla-tl keeps what it writes: one cache directory, `$SLA_TL_CACHE_DIR`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SLA_TL_CACHE_DIR` (a leading `~` expanded), default `~/.cache/sla_tl`: the tuned
    store, the Optuna studies, the kernels (`sla_tl.kernel_cache`) and the static facts."""
    return Path(os.environ.get("SLA_TL_CACHE_DIR") or "~/.cache/sla_tl").expanduser()
