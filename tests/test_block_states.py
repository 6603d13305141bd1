"""The linear branch's block-map GEMMs against explicit per-block sums (float64, CPU)."""

from __future__ import annotations

import pytest
import torch

from sla_tl import block_states
from sla_tl import routing as routing_module
from sla_tl.routing import Routing, block_mask

from .helpers import relative_error

B, H, N_Q, N_KV, D = 2, 3, 5, 9, 8


def _map(routing: Routing, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The marginal map the CUDA path derives, (B, H, Mq, Nk)."""
    return routing_module.marginal_map(routing_module.listing(routing, N_KV, True), dtype)


def _random_routing(n_crit: int, n_neg: int, generator: torch.Generator) -> Routing:
    """Disjoint critical and negligible blocks per row, with a few rows cut short."""
    order = torch.rand(B, H, N_Q, N_KV, generator=generator).argsort(dim=-1).to(torch.int32)
    lut, neg = order[..., :n_crit].sort(dim=-1).values, order[..., n_crit:n_crit + n_neg]
    lut_count = torch.randint(0, n_crit + 1, (B, H, N_Q), generator=generator, dtype=torch.int32)
    neg_count = torch.full((B, H, N_Q), n_neg, dtype=torch.int32)
    return Routing(lut.contiguous(), lut_count, neg.sort(dim=-1).values.contiguous(), neg_count)


def _marginal(routing: Routing) -> torch.Tensor:
    """(B, H, Mq, Nk) float64: 1 where a key block is neither critical nor negligible."""
    excluded = block_mask(routing.lut, routing.lut_count, N_KV)
    excluded |= block_mask(routing.neg_lut, routing.neg_count, N_KV)
    return (~excluded).double()


@pytest.mark.parametrize(("n_crit", "n_neg"), [(2, 1), (3, 0), (5, 3), (9, 0)])
def test_query_states_sum_each_query_blocks_marginal_blocks(n_crit: int, n_neg: int) -> None:
    generator = torch.Generator().manual_seed(n_crit * 10 + n_neg)
    routing = _random_routing(n_crit, n_neg, generator)
    h_block = torch.randn(B, H, N_KV, D, D, generator=generator, dtype=torch.float64)
    z_block = torch.randn(B, H, N_KV, D, generator=generator, dtype=torch.float64)
    h_rows = torch.full((B, H, N_Q, D, D), float("nan"), dtype=torch.float64)
    z_rows = torch.full((B, H, N_Q, D), float("nan"), dtype=torch.float64)
    block_states.query_states(h_block, z_block, _map(routing), h_rows, z_rows)
    marginal = _marginal(routing)
    assert relative_error(h_rows, torch.einsum("bhij,bhjde->bhide", marginal, h_block)) < 1e-12
    assert relative_error(z_rows, torch.einsum("bhij,bhjd->bhid", marginal, z_block)) < 1e-12


@pytest.mark.parametrize(("n_crit", "n_neg"), [(2, 1), (6, 2)])
def test_key_states_sum_the_query_blocks_each_key_block_is_marginal_for(
    n_crit: int, n_neg: int
) -> None:
    generator = torch.Generator().manual_seed(100 + n_crit)
    routing = _random_routing(n_crit, n_neg, generator)
    g_rows = torch.randn(B, H, N_Q, D, D, generator=generator, dtype=torch.float64)
    gz_rows = torch.randn(B, H, N_Q, D, generator=generator, dtype=torch.float64)
    dh, dz = block_states.key_states(g_rows, gz_rows, _map(routing).transpose(-1, -2), N_KV)
    marginal = _marginal(routing)
    assert relative_error(dh, torch.einsum("bhij,bhide->bhjde", marginal, g_rows)) < 1e-12
    assert relative_error(dz, torch.einsum("bhij,bhid->bhjd", marginal, gz_rows)) < 1e-12


def test_global_key_state_is_the_sum_over_all_query_blocks() -> None:
    generator = torch.Generator().manual_seed(7)
    g_rows = torch.randn(B, H, N_Q, D, D, generator=generator, dtype=torch.float64)
    gz_rows = torch.randn(B, H, N_Q, D, generator=generator, dtype=torch.float64)
    dh, dz = block_states.key_states(g_rows, gz_rows, None, N_KV)
    assert dh.shape == (B, H, 1, D, D) and dz.shape == (B, H, 1, D)
    assert relative_error(dh[:, :, 0], g_rows.sum(2)) < 1e-12
    assert relative_error(dz[:, :, 0], gz_rows.sum(2)) < 1e-12


@pytest.mark.parametrize("n_crit", [1, 4, 9])
def test_reverse_lut_lists_each_key_blocks_query_blocks_in_order(n_crit: int) -> None:
    generator = torch.Generator().manual_seed(200 + n_crit)
    routing = _random_routing(n_crit, 0, generator)
    reverse, count = routing_module.reverse_lut(routing.lut, routing.lut_count, N_KV)
    listed = block_mask(routing.lut, routing.lut_count, N_KV)
    assert reverse.shape == (B, H, N_KV, N_Q) and reverse.dtype == torch.int32
    for b in range(B):
        for h in range(H):
            for j in range(N_KV):
                expected = listed[b, h, :, j].nonzero().flatten().tolist()
                assert count[b, h, j].item() == len(expected)
                assert reverse[b, h, j, :len(expected)].tolist() == expected
