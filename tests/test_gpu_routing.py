"""Routing's selection kernel on the GPU against torch's top-k on the same block scores."""

from __future__ import annotations

import pytest
import torch

from sla_tl import kernels, spec, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.plan import CallShape, route_phase
from sla_tl.routing import Routing
from sla_tl.settings import Settings
from sla_tl.targets import target_of

from .helpers import random_qkv

pytestmark = pytest.mark.gpu

# (block_q, block_kv, lq, lk, topk, k_low): odd lengths, one critical block, all blocks,
# Lq != Lk, more key blocks than a warp has lanes several times over, and the largest row.
CASES = [
    (128, 64, 1000, 1000, 0.1, 0.1),
    (64, 64, 300, 5000, 0.05, 0.3),
    (128, 128, 2000, 129, 1.0, 0.0),
    (128, 64, 700, 64, 0.05, 0.0),
    (64, 128, 4000, 7777, 0.0, 0.5),
    (128, 64, 32760, 32760, 0.05, 0.1),
    (128, 64, 1024, 64 * 4096, 0.01, 0.0),
]


def _expected(scores: torch.Tensor, n_crit: int, n_neg: int) -> tuple[torch.Tensor, ...]:
    """Ascending indices of each row's n_crit largest and, of the rest, n_neg smallest."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    critical = order[..., :n_crit].sort(dim=-1).values
    negligible = order[..., scores.shape[-1] - n_neg:].sort(dim=-1).values
    return critical.int(), negligible.int()


@pytest.mark.parametrize("block_q,block_kv,lq,lk,topk,k_low", CASES)
def test_selection_kernel_matches_top_k_of_the_same_scores(generator, block_q, block_kv, lq,
                                                           lk, topk, k_low):
    q, k, _ = random_qkv(2, 3, lq, lk, 128, torch.bfloat16, generator, device="cuda")
    s = Settings(block_q=block_q, block_kv=block_kv)
    shape = CallShape(2, 3, lq, lk, 128, q.dtype, s, False, (1, 0))
    pooled = route_phase(target_of(q.device), shape).run(
        dict(q=q, k=k), q.device, keep=True, only=["pool_q", "pool_k"])
    pooled_q, pooled_k = pooled["pooled_q"], pooled["pooled_k"]
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    got = Routing(*(torch.full(shape, -7, dtype=torch.int32, device="cuda") for shape in
                    ((*rows, n_crit), rows, (*rows, n_neg), rows)))
    kernels.compiled(KernelSpec("select", (), target_of(q.device).arch.target))(scores, *got)
    torch.cuda.synchronize()
    critical, negligible = _expected(scores, n_crit, n_neg)
    # Random scores have no ties, so the sets are the same block for block.
    assert torch.equal(got.lut, critical)
    assert torch.equal(got.neg_lut, negligible)
    assert (got.lut_count == n_crit).all() and (got.neg_count == n_neg).all()


def test_route_with_the_selection_kernel_picks_the_same_blocks_as_the_sort(generator):
    q, k, _ = random_qkv(1, 4, 3000, 3000, 64, torch.float16, generator, device="cuda")
    by_sort = tilelang_backend.route(q, k, 0.1, 0.2, 128, 64, "bhsd")
    by_kernel = tilelang_backend.route(q, k, 0.1, 0.2, 128, 64, "bhsd", selection="kernel")
    # The sort ranks smoothed scores, the kernel raw ones: equal up to rounding near ties.
    agree = (by_sort.lut == by_kernel.lut).float().mean().item()
    assert agree > 0.99, agree
    assert torch.equal(by_sort.lut_count, by_kernel.lut_count)
    assert torch.equal(by_sort.neg_count, by_kernel.neg_count)
