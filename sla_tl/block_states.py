"""The linear branch's per-block states as dense 0/1 block-map GEMMs (torch, no host sync).

For query block i, H_i = sum of h_j over its marginal key blocks j. With the block map
M[i, j] = 1 where j is marginal for i (`sla_tl.routing.marginal_map`), that is
H_i = (M h)_i: one batched GEMM over all query blocks, reading each h_j once, instead of
every query block reading its h_j one by one. The backward's dH_j = sum of G_i over the
query blocks for which j is marginal is the same product with M transposed.
"""

from __future__ import annotations

import torch


def _apply(weights: torch.Tensor, blocks: torch.Tensor, out: torch.Tensor) -> None:
    """out = weights @ blocks, batched over B*H (weights (B, H, M, N)), with the blocks'
    trailing dims flattened."""
    weights = weights.flatten(0, 1)
    flat_out = out.view(weights.shape[0], weights.shape[1], -1)
    torch.bmm(weights, blocks.flatten(0, 1).flatten(2).to(weights.dtype), out=flat_out)


def query_states(h_block: torch.Tensor, z_block: torch.Tensor, marginal: torch.Tensor,
                 h_rows: torch.Tensor, z_rows: torch.Tensor) -> None:
    """Write H_i (B, H, Mq, D, D) and Z_i (B, H, Mq, D) of every query block ("marginal")
    from the key blocks' h_j and z_j and the (B, H, Mq, Nk) marginal map."""
    _apply(marginal, h_block, h_rows)
    _apply(marginal.to(z_block.dtype), z_block, z_rows)


def query_h_states(h_block: torch.Tensor, marginal: torch.Tensor, h_rows: torch.Tensor) -> None:
    """Write H_i alone (the selection kernel writes Z_i: fusion selection_z_rows)."""
    _apply(marginal, h_block, h_rows)


def key_blocks_total(z_block: torch.Tensor) -> torch.Tensor:
    """Every key block's z_j summed, (B, H, D): what a row's Z_i is, less its excluded
    blocks'."""
    return z_block.sum(dim=2)


def query_states_of_maps(h_block: torch.Tensor, z_block: torch.Tensor,
                         marginal: torch.Tensor, marginal_f32: torch.Tensor,
                         h_rows: torch.Tensor, z_rows: torch.Tensor) -> None:
    """`query_states` with the marginal map given in both dtypes its GEMMs take (the
    selection kernel writes both): no cast."""
    _apply(marginal, h_block, h_rows)
    _apply(marginal_f32, z_block, z_rows)


def global_states(h_group: torch.Tensor, z_block: torch.Tensor, h_rows: torch.Tensor,
                  z_rows: torch.Tensor) -> None:
    """Write the one H (B, H, 1, D, D) and Z (B, H, 1, D) every query block shares
    ("global"): the sums of the key pass's per-group h and per-block z."""
    torch.sum(h_group, dim=2, keepdim=True, out=h_rows)
    torch.sum(z_block, dim=2, keepdim=True, out=z_rows)


def key_states(g_rows: torch.Tensor, gz_rows: torch.Tensor, marginal_t: torch.Tensor | None,
               n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dH_j (B, H, Nk, D, D) and dZ_j (B, H, Nk, D) of every key block from the query
    blocks' G_i and g_i and the transposed marginal map; with no map ("global"), the one
    shared (B, H, 1, ...) state."""
    if marginal_t is None:
        # Summed in float32 at least: G_i is stored in the input dtype.
        wide = torch.promote_types(g_rows.dtype, torch.float32)
        g_total = g_rows.sum(dim=2, keepdim=True, dtype=wide).to(g_rows.dtype)
        return g_total, gz_rows.sum(dim=2, keepdim=True)
    b, h, _, d, _ = g_rows.shape
    dh = g_rows.new_empty((b, h, n_kv, d, d))
    dz = gz_rows.new_empty((b, h, n_kv, d))
    _apply(marginal_t, g_rows, dh)
    _apply(marginal_t.to(gz_rows.dtype), gz_rows, dz)
    return dh, dz


def key_states_of_maps(g_rows: torch.Tensor, gz_rows: torch.Tensor, marginal_t: torch.Tensor,
                       marginal_t_f32: torch.Tensor,
                       n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`key_states` ("marginal") with the transposed map given in both dtypes its GEMMs
    take (the key-major kernel writes both): no cast."""
    b, h, _, d, _ = g_rows.shape
    dh = g_rows.new_empty((b, h, n_kv, d, d))
    dz = gz_rows.new_empty((b, h, n_kv, d))
    _apply(marginal_t, g_rows, dh)
    _apply(marginal_t_f32, gz_rows, dz)
    return dh, dz
