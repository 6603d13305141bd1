"""sla-tl: trainable Sparse-Linear Attention for diffusion transformers, in TileLang.

Importing the package registers the `torch.ops.sla` operators.
"""

from .api import attention, attention_with_routing, route
from .module import SparseLinearAttention
from .routing import Routing

__all__ = ["Routing", "SparseLinearAttention", "attention", "attention_with_routing", "route"]
__version__ = "0.1.0"
