"""Pieces shared by every kernel: targets, dtypes and layout-aware tile slicing."""

from __future__ import annotations

import tilelang.language as T

from .constants import LINEAR_EPS, LN2, LOG2E  # noqa: F401  (the kernels import them from here)

DTYPES = {"bfloat16": T.bfloat16, "float16": T.float16}

# A float32 quiet NaN (CUDA's CUDART_NAN_F): what a row of an invalid routing is written as.
NAN = T.float32(float("nan"))

# The named barrier TileLang's warp-specialised code uses among the consumer threads; an
# explicit `T.sync_threads(CONSUMER_BARRIER, threads)` joins the same rendezvous.
CONSUMER_BARRIER = 3


def target(arch: str) -> dict:
    """TileLang's target for an arch such as "sm_90a" (the dict form; strings are rejected)."""
    return {"kind": "cuda", "arch": arch}


def seq_shape(batch, heads, length, dim, layout: str) -> list:
    """Shape of a (B, H, L, D) operand as stored in `layout`."""
    return [batch, heads, length, dim] if layout == "bhsd" else [batch, length, heads, dim]


def rows(x, b, h, start, count: int, layout: str):
    """The `count` rows of head (b, h) from row `start`, in either layout."""
    if layout == "bhsd":
        return x[b, h, start:start + count, :]
    return x[b, start:start + count, h, :]


def element(x, b, h, row, d, layout: str):
    """One element of head (b, h) at (row, d), in either layout."""
    return x[b, h, row, d] if layout == "bhsd" else x[b, row, h, d]
