"""sla-tl: trainable Sparse-Linear Attention for diffusion transformers, in TileLang.

Importing the package registers the `torch.ops.sla` operators. The one exception is the
`sla-tl` command, which imports them only once a subcommand runs, so that `sla-tl --help`
needs neither torch nor TileLang; the names below then load on first use.
"""

from __future__ import annotations

import importlib
import os
import sys

# Public name -> the submodule that defines it.
_EXPORTS = {
    "PRESETS": "presets",
    "Routing": "routing",
    "SageSparseLinearAttention": "module",
    "SparseLinearAttention": "module",
    "UlyssesAttention": "ulysses",
    "attention": "api",
    "attention_dynamic_topk": "dynamic_topk",
    "attention_with_routing": "api",
    "check_routing": "api",
    "route": "api",
    "shard_sequence": "ulysses",
    "topk_tensor": "dynamic_topk",
    "ulysses_attention": "ulysses",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sla_tl' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def tune(arch: str = "sm90", **options):
    """Tune the kernels for the GPU in hand and store the best schedules; see
    `sla_tl.autotune.api.tune` for the options (shapes, trials, storage, error_budget, ...)."""
    from .autotune.api import tune as run_tune  # Optuna loads only when tuning

    return run_tune(arch, **options)


def _started_by_the_command() -> bool:
    """Whether the `sla-tl` console script is what imports the package."""
    program = os.path.basename(getattr(sys, "argv", None) and sys.argv[0] or "")
    return os.path.splitext(program)[0] == "sla-tl"


if not _started_by_the_command():
    for _name in _EXPORTS:
        __getattr__(_name)

__all__ = sorted([*_EXPORTS, "tune"])
__version__ = "0.1.0"
