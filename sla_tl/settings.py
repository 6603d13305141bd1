"""What travels with one attention call: its settings, and its forward's outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import spec


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything besides tensors and routing ratios that fixes the numbers an attention call
    produces; built by keyword, each defaulting to the operators' default."""

    block_q: int = spec.DEFAULT_BLOCK_Q
    block_kv: int = spec.DEFAULT_BLOCK_KV
    feature_map: str = spec.DEFAULT_FEATURE_MAP
    linear: str = spec.DEFAULT_LINEAR
    scale: float | None = None
    """The softmax scale of the sparse branch; None: `D ** -0.5` (`spec.softmax_scale`)."""
    layout: str = spec.DEFAULT_LAYOUT

    def op_args(self) -> tuple:
        """The settings as the operators take them, in their schema's order."""
        return (self.block_q, self.block_kv, self.feature_map, self.linear, self.scale,
                self.layout)

    @classmethod
    def from_op_args(cls, block_q: int, block_kv: int, feature_map: str, linear: str,
                     scale: float | None, layout: str) -> Settings:
        """The settings from the operators' arguments (`op_args`' inverse)."""
        return cls(block_q=block_q, block_kv=block_kv, feature_map=feature_map, linear=linear,
                   scale=scale, layout=layout)


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
