"""The fixed vocabulary of SLA: accepted values, defaults and the block arithmetic.

Every layer (reference, kernels, fake implementations, validation) derives block
counts and per-row selection sizes from these functions, so they cannot disagree.
"""

from __future__ import annotations

from . import feature_maps
from .schedules.constants import LINEAR_EPS  # noqa: F401  (one definition, shared with the kernels)

FEATURE_MAPS: tuple[str, ...] = tuple(feature_maps.FEATURE_MAPS)
LINEAR_MODES: tuple[str, ...] = ("marginal", "global")
LAYOUTS: tuple[str, ...] = ("bhsd", "bshd")
HEAD_DIMS: tuple[int, ...] = (64, 128)
BLOCK_MULTIPLE = 16

DEFAULT_TOPK = 0.05
DEFAULT_K_LOW = 0.0
DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_KV = 64
DEFAULT_FEATURE_MAP = "softmax"
DEFAULT_LINEAR = "marginal"
DEFAULT_LAYOUT = "bhsd"


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of `block` rows covering `length` rows (the last may be partial)."""
    return (length + block - 1) // block


def linear_state_rows(lq: int, block_q: int, linear: str) -> int:
    """How many (H_i, Z_i) linear states the forward keeps per head: one per query block
    ("marginal"), one shared by all ("global")."""
    return num_blocks(lq, block_q) if linear == "marginal" else 1


def num_critical(topk: float, n_kv_blocks: int) -> int:
    """Critical key blocks per query-block row: `clamp(int(topk * Nk), 1, Nk)`."""
    return max(1, min(n_kv_blocks, int(topk * n_kv_blocks)))


def num_negligible(k_low: float, n_kv_blocks: int, n_critical: int) -> int:
    """Negligible key blocks per row: `int(k_low * Nk)`, taken only from the non-critical rest."""
    return max(0, min(n_kv_blocks - n_critical, int(k_low * n_kv_blocks)))


def softmax_scale(dim: int, scale: float | None) -> float:
    """The sparse branch's softmax scale: `scale`, or `dim ** -0.5` when it is None."""
    return dim**-0.5 if scale is None else float(scale)
