"""Routing's selection kernel on the GPU against torch's top-k on the same block scores."""

from __future__ import annotations

import pytest
import torch

from sla_tl import kernels, reference, spec, tilelang_backend
from sla_tl.routing import Routing
from sla_tl.schedules.compile import compile_program
from sla_tl.schedules.sm90 import key_pass, select

from .helpers import random_qkv, relative_error

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
    pooled_q = tilelang_backend._pool(q, block_q, "bhsd", kernels.arch_of(q.device))
    pooled_k = tilelang_backend._pool(k, block_kv, "bhsd", kernels.arch_of(q.device))
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    got = Routing(*(torch.full(shape, -7, dtype=torch.int32, device="cuda") for shape in
                    ((*rows, n_crit), rows, (*rows, n_neg), rows)))
    kernels.select_kernel(kernels.arch_of(q.device))(scores, *got)
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


@pytest.mark.parametrize("block_map_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("topk,k_low", [(0.1, 0.2), (0.3, 0.0), (1.0, 0.0)])
def test_selection_kernel_writes_the_marginal_block_map_and_flags(generator, block_map_dtype,
                                                                  topk, k_low):
    q, k, _ = random_qkv(2, 3, 1500, 2100, 64, torch.float16, generator, device="cuda")
    arch = kernels.arch_of(q.device)
    scores = (tilelang_backend._pool(q, 128, "bhsd", arch)
              @ tilelang_backend._pool(k, 64, "bhsd", arch).transpose(-1, -2))
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    got = Routing(*(torch.full(shape, -7, dtype=torch.int32, device="cuda") for shape in
                    ((*rows, n_crit), rows, (*rows, n_neg), rows)))
    dtype = getattr(torch, block_map_dtype)
    marginal = torch.full(scores.shape, float("nan"), dtype=dtype, device="cuda")
    active = torch.full(rows, -7, dtype=torch.int32, device="cuda")
    kernel = compile_program(select.top_bottom_select(block_map_dtype), arch)
    kernel(scores, *got, marginal, active)
    torch.cuda.synchronize()
    excluded = torch.zeros(scores.shape, dtype=torch.bool, device="cuda")
    excluded.scatter_(-1, got.lut.long(), True)
    if n_neg:
        excluded.scatter_(-1, got.neg_lut.long(), True)
    assert torch.equal(marginal, (~excluded).to(dtype))
    assert (active == int(n_crit + n_neg < n_kv)).all()


@pytest.mark.parametrize("dim,block_kv,lk", [(128, 64, 2000), (64, 128, 777), (128, 64, 64)])
def test_key_pass_pools_the_keys_it_loads(generator, dim, block_kv, lk):
    """The key pass with routing's pooled K: the means of the key blocks, and the same
    linear states, bit for bit, as the key pass without it."""
    _, k, v = random_qkv(2, 3, 1, lk, dim, torch.bfloat16, generator, device="cuda")
    arch = kernels.arch_of(k.device)
    n_kv = spec.num_blocks(lk, block_kv)
    threads = 128 if dim == 64 else 256

    def run(pool_keys: bool) -> list[torch.Tensor]:
        program = key_pass.key_pass(dim, block_kv, "bfloat16", "softmax", "bhsd", True, 8,
                                    threads, pool_keys=pool_keys)
        kernel = compile_program(program, arch, fast_arithmetic=False)
        outs = [torch.full((2, 3, n_kv, dim, dim), float("nan"), dtype=torch.bfloat16,
                           device="cuda"),
                torch.full((2, 3, n_kv, dim), float("nan"), device="cuda"),
                torch.full((2, 3, 1, dim, dim), float("nan"), device="cuda")]
        if pool_keys:
            outs.append(torch.full((2, 3, n_kv, dim), float("nan"), device="cuda"))
        kernel(k, v, *outs)
        torch.cuda.synchronize()
        return outs

    plain, pooled = run(False), run(True)
    assert torch.equal(plain[0], pooled[0]) and torch.equal(plain[1], pooled[1])
    expected = reference.mean_pool(k.double().cpu(), block_kv)
    assert relative_error(pooled[3], expected) < 1e-5
