"""The result of routing, shared by the reference, the kernels and the public API."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Block classification of one attention call, query-block-major.

    Every field is int32 on the device of q. Rows are (batch, head, query block).
    Entries of a row past its count are ignored and may hold anything.
    Key blocks in neither list are marginal (they feed the linear branch).
    What makes one valid: `sla_tl.routing_check` (and `attention_with_routing`).
    """

    lut: torch.Tensor
    """(B, H, Mq, Kc): critical key-block indices (`route` gives them ascending)."""
    lut_count: torch.Tensor
    """(B, H, Mq): number of valid entries of each `lut` row (0..Kc)."""
    neg_lut: torch.Tensor
    """(B, H, Mq, Kn): negligible key-block indices (Kn may be 0)."""
    neg_count: torch.Tensor
    """(B, H, Mq): number of valid entries of each `neg_lut` row (0..Kn)."""


def block_mask(
    lut: torch.Tensor, count: torch.Tensor, n_kv_blocks: int, name: str = "lut"
) -> torch.Tensor:
    """Boolean (B, H, Mq, Nk) map of the key blocks listed in the counted prefix of `lut`.

    Reads the values of `lut` to check them, so it synchronises with a GPU: reference use only.
    """
    width = lut.shape[-1]
    valid = torch.arange(width, device=lut.device) < count.unsqueeze(-1).long()
    if (valid & ((lut < 0) | (lut >= n_kv_blocks))).any():
        raise ValueError(f"{name} entries must lie in [0, {n_kv_blocks}) within each row's count")
    index = torch.where(valid, lut.long(), torch.zeros_like(lut, dtype=torch.long))
    hits = torch.zeros(*lut.shape[:-1], n_kv_blocks, dtype=torch.int32, device=lut.device)
    hits.scatter_add_(-1, index, valid.int())
    return hits > 0
