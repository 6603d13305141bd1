"""The algorithm settings that travel with one attention call."""

from __future__ import annotations

from typing import NamedTuple


class Settings(NamedTuple):
    """Everything besides tensors that fixes the numbers an attention call produces."""

    block_q: int
    block_kv: int
    feature_map: str
    linear: str
    scale: float | None
    layout: str
