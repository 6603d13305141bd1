"""The linear branch's per-block states as dense 0/1 block-map GEMMs (torch, no host sync).

For query block i, H_i = sum of h_j over its marginal key blocks j. With the block map
M[i, j] = 1 where j is marginal for i, that is H_i = (M h)_i: one batched GEMM over all
query blocks, reading each h_j once, instead of every query block reading its h_j one by
one. The backward's dH_j = sum of G_i over the query blocks for which j is marginal is
the same product with M transposed. The map's 0/1 weights are exact in any dtype.
"""

from __future__ import annotations

import torch

from . import routing_check
from .routing import Routing
from .routing_check import Listing


def marginal_map(listed: Listing, dtype: torch.dtype) -> torch.Tensor:
    """(B*H, Mq, Nk) in `dtype`: 1 where key block j is marginal for query block i, i.e.
    listed in neither LUT (`listed` tallies both, see `routing_check.listing`)."""
    return (listed.per_block == 0).flatten(0, 1).to(dtype)


def _apply(weights: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """out = weights @ blocks, batched over B*H, with the blocks' trailing dims flattened."""
    flat_out = out.view(weights.shape[0], weights.shape[1], -1)
    torch.bmm(weights, blocks.flatten(0, 1).flatten(2).to(weights.dtype), out=flat_out)


def query_states(
    h_block: torch.Tensor, z_block: torch.Tensor, routing: Routing, h_rows: torch.Tensor,
    z_rows: torch.Tensor, listed: Listing | None = None,
) -> None:
    """Write H_i (B, H, Mq, D, D) and Z_i (B, H, Mq, D) of every query block ("marginal").
    `listed` is the routing's tally of both LUTs, when the caller has it already."""
    if listed is None:
        listed = routing_check.listing(routing, h_block.shape[2], negligible=True)
    weights = marginal_map(listed, h_block.dtype)
    _apply(weights, h_block, h_rows)
    _apply(weights.to(z_block.dtype), z_block, z_rows)


def key_states(
    g_rows: torch.Tensor, gz_rows: torch.Tensor, routing: Routing, n_kv: int, linear: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dH_j (B, H, Nk, D, D) and dZ_j (B, H, Nk, D) of every key block from the query
    blocks' G_i and g_i; one shared (B, H, 1, ...) state in "global" mode."""
    if linear == "global":
        # Summed in float32 at least: G_i is stored in the input dtype.
        wide = torch.promote_types(g_rows.dtype, torch.float32)
        g_total = g_rows.sum(dim=2, keepdim=True, dtype=wide).to(g_rows.dtype)
        return g_total, gz_rows.sum(dim=2, keepdim=True)
    listed = routing_check.listing(routing, n_kv, negligible=True)
    weights = marginal_map(listed, g_rows.dtype).transpose(1, 2)
    b, h, _, d, _ = g_rows.shape
    dh = g_rows.new_empty((b, h, n_kv, d, d))
    dz = gz_rows.new_empty((b, h, n_kv, d))
    _apply(weights, g_rows, dh)
    _apply(weights.to(gz_rows.dtype), gz_rows, dz)
    return dh, dz
