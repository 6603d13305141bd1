"""sla-tl: trainable Sparse-Linear Attention for diffusion transformers, in TileLang.

Importing the package registers the `torch.ops.sla` operators.
"""

from .api import attention, attention_with_routing, check_routing, route
from .module import SparseLinearAttention
from .routing import Routing


def tune(arch: str = "sm90", **options):
    """Tune the kernels for the GPU in hand and store the best schedules; see
    `sla_tl.autotune.api.tune` for the options (shapes, trials, storage, error_budget, ...)."""
    from .autotune.api import tune as run_tune  # Optuna loads only when tuning

    return run_tune(arch, **options)


__all__ = ["Routing", "SparseLinearAttention", "attention", "attention_with_routing",
           "check_routing", "route", "tune"]
__version__ = "0.1.0"
