"""What travels with one attention call: its settings, and its forward's outputs."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Settings(NamedTuple):
    """Everything besides tensors that fixes the numbers an attention call produces."""

    block_q: int
    block_kv: int
    feature_map: str
    linear: str
    scale: float | None
    layout: str


class ForwardOutputs(NamedTuple):
    """What `sla::attention_fwd` returns: the output, and what the backward reuses."""

    out: torch.Tensor
    """O_s + proj(O_l), contiguous in the user's layout."""
    lse: torch.Tensor
    """float32 (B, H, Lq): natural-log LSE of the sparse branch (-inf for an empty row)."""
    linear: torch.Tensor
    """O_l, the linear branch before the projection, in the user's layout and q's dtype."""
    h_rows: torch.Tensor
    """(B, H, Mq, D, D) in q's dtype: H_i of each query block; (B, H, 1, D, D) in "global"."""
    z_rows: torch.Tensor
    """(B, H, Mq, D) float32: Z_i of each query block; (B, H, 1, D) in "global"."""
