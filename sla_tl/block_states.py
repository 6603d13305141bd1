"""The linear branch's per-block states as dense 0/1 block-map GEMMs (torch, no host sync).

For query block i, H_i = sum of h_j over its marginal key blocks j. With the block map
E[i, j] = 1 where j is excluded (critical or negligible), that is H_i = H - (E h)_i: one
batched GEMM over all query blocks, reading each h_j once, instead of every query block
reading its excluded h_j one by one. The backward's dH_j = sum of G_i over the query
blocks for which j is marginal is the same product with E transposed.

When most blocks are excluded, subtracting them from the total would cancel most of it,
so the marginal blocks are summed directly instead (the map's complement).
"""

from __future__ import annotations

import torch

from .routing import Routing


def block_map(lut: torch.Tensor, count: torch.Tensor, n_kv: int) -> torch.Tensor:
    """int8 (B, H, Mq, Nk): 1 where the counted prefix of a LUT row lists key block j."""
    b, h, n_q, width = lut.shape
    valid = torch.arange(width, device=lut.device) < count.unsqueeze(-1)
    column = torch.where(valid, lut.long(), n_kv)  # invalid entries go to a spare column
    hits = torch.zeros((b, h, n_q, n_kv + 1), dtype=torch.int8, device=lut.device)
    return hits.scatter_(-1, column, 1)[..., :n_kv]


def _weights(routing: Routing, n_kv: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(B*H, Mq, Nk) 0/1 weights and whether they select the excluded blocks (True) or the
    marginal ones (False, when more than half of the blocks may be excluded)."""
    excluded = block_map(routing.lut, routing.lut_count, n_kv)
    if routing.neg_lut.shape[-1]:
        excluded = excluded + block_map(routing.neg_lut, routing.neg_count, n_kv)
    subtract = 2 * (routing.lut.shape[-1] + routing.neg_lut.shape[-1]) <= n_kv
    weights = excluded if subtract else 1 - excluded
    return weights.flatten(0, 1).to(dtype), subtract


def _combine(total: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor, subtract: bool,
             out: torch.Tensor) -> torch.Tensor:
    """out = total - weights @ blocks (subtract) or weights @ blocks, batched over B*H."""
    flat_out = out.view(weights.shape[0], weights.shape[1], -1)
    blocks = blocks.flatten(0, 1).flatten(2)
    if subtract:
        start = total.flatten(0, 1).flatten(1).unsqueeze(1).to(out.dtype)
        return torch.baddbmm(start, weights.to(blocks.dtype), blocks, alpha=-1, out=flat_out)
    return torch.bmm(weights.to(blocks.dtype), blocks, out=flat_out)


def query_states(
    h_block: torch.Tensor, z_block: torch.Tensor, h_total: torch.Tensor, z_total: torch.Tensor,
    routing: Routing, h_rows: torch.Tensor, z_rows: torch.Tensor,
) -> None:
    """Write H_i (B, H, Mq, D, D) and Z_i (B, H, Mq, D) of every query block ("marginal")."""
    weights, subtract = _weights(routing, h_block.shape[2], h_block.dtype)
    _combine(h_total, h_block, weights, subtract, h_rows)
    _combine(z_total, z_block, weights, subtract, z_rows)


def key_states(
    g_rows: torch.Tensor, gz_rows: torch.Tensor, routing: Routing, n_kv: int, linear: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dH_j (B, H, Nk, D, D) and dZ_j (B, H, Nk, D) of every key block from the query
    blocks' G_i and g_i; one shared (B, H, 1, ...) state in "global" mode."""
    # Summed in float32 at least: G_i is stored in the input dtype.
    g_total = g_rows.sum(dim=2, dtype=torch.promote_types(g_rows.dtype, torch.float32))
    gz_total = gz_rows.sum(dim=2)
    if linear == "global":
        return g_total.to(g_rows.dtype).unsqueeze(2), gz_total.unsqueeze(2)
    weights, subtract = _weights(routing, n_kv, g_rows.dtype)
    weights = weights.transpose(1, 2)
    b, h, _, d, _ = g_rows.shape
    dh = g_rows.new_empty((b, h, n_kv, d, d))
    dz = gz_rows.new_empty((b, h, n_kv, d))
    _combine(g_total, g_rows, weights, subtract, dh)
    _combine(gz_total, gz_rows, weights, subtract, dz)
    return dh, dz
