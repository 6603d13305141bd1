"""The reference against independent formulations of the design contract, and its gradients."""

from __future__ import annotations

import pytest
import torch

from sla_tl import reference, spec
from sla_tl.feature_maps import FEATURE_MAPS
from sla_tl.routing import Routing, block_mask
from sla_tl.schedules import feature_maps as kernel_feature_maps
from sla_tl.spec import LINEAR_EPS, num_blocks

from .helpers import random_projection, random_qkv, relative_error


def test_mean_pool_averages_partial_last_block_over_its_rows(generator):
    x = torch.randn(2, 3, 37, 8, generator=generator, dtype=torch.float64)
    pooled = reference.mean_pool(x, 16)
    assert pooled.shape == (2, 3, 3, 8)
    for i, (start, stop) in enumerate([(0, 16), (16, 32), (32, 37)]):
        torch.testing.assert_close(pooled[:, :, i], x[:, :, start:stop].mean(dim=2))


def test_mean_pool_of_bf16_runs_in_float32(generator):
    x = torch.randn(1, 1, 40, 8, generator=generator).bfloat16()
    pooled = reference.mean_pool(x, 16)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled[0, 0, 2], x[0, 0, 32:].float().mean(dim=0))


@pytest.mark.parametrize("topk,k_low", [(0.25, 0.0), (0.3, 0.2), (0.5, 0.5), (0.9, 0.3)])
@pytest.mark.parametrize("lq,lk", [(64, 64), (70, 150), (130, 33)])
def test_route_selects_top_and_bottom_blocks(generator, topk, k_low, lq, lk):
    q, k, _ = random_qkv(2, 2, lq, lk, 16, torch.float32, generator)
    routing = reference.route(q, k, topk, k_low, 16, 16)
    scores = reference.block_scores(q, k, 16, 16)
    n_kv = num_blocks(lk, 16)
    n_crit = max(1, min(n_kv, int(topk * n_kv)))
    n_neg = min(n_kv - n_crit, int(k_low * n_kv))
    assert routing.lut.shape == (2, 2, num_blocks(lq, 16), n_crit)
    assert routing.neg_lut.shape == (2, 2, num_blocks(lq, 16), n_neg)
    assert all(t.dtype == torch.int32 for t in routing)
    assert (routing.lut_count == n_crit).all() and (routing.neg_count == n_neg).all()
    assert (routing.lut.diff(dim=-1) > 0).all(), "critical LUT must be strictly ascending"
    assert (routing.neg_lut.diff(dim=-1) > 0).all(), "negligible LUT must be strictly ascending"
    crit = block_mask(routing.lut, routing.lut_count, n_kv)
    neg = block_mask(routing.neg_lut, routing.neg_count, n_kv)
    assert not (crit & neg).any()
    rest = ~(crit | neg)
    inf = torch.tensor(float("inf"))
    lowest_crit = torch.where(crit, scores, inf).amin(-1)
    assert (lowest_crit >= torch.where(crit, -inf, scores).amax(-1)).all()
    if n_neg:
        highest_neg = torch.where(neg, scores, -inf).amax(-1)
        assert (highest_neg <= torch.where(rest, scores, inf).amin(-1)).all()


def test_smooth_k_is_subtracted_before_pooling(generator):
    q, k, _ = random_qkv(1, 1, 32, 48, 8, torch.float64, generator)
    smoothed = k - k.mean(dim=2, keepdim=True)
    expected = reference.mean_pool(q, 16) @ reference.mean_pool(smoothed, 16).transpose(-1, -2)
    torch.testing.assert_close(reference.block_scores(q, k, 16, 16), expected)


@pytest.mark.parametrize("topk,expected", [(0.0, 1), (0.01, 1), (1.0, 5), (0.5, 2)])
def test_critical_count_is_clamped(generator, topk, expected):
    q, k, _ = random_qkv(1, 1, 32, 80, 8, torch.float32, generator)
    routing = reference.route(q, k, topk, 1.0, 16, 16)
    assert routing.lut.shape[-1] == expected
    assert routing.neg_lut.shape[-1] == 5 - expected, "negligible blocks come from the rest only"


def _all_critical(batch: int, heads: int, lq: int, lk: int, bq: int, bk: int) -> Routing:
    n_q, n_kv = num_blocks(lq, bq), num_blocks(lk, bk)
    lut = torch.arange(n_kv, dtype=torch.int32).expand(batch, heads, n_q, n_kv).contiguous()
    full = torch.full((batch, heads, n_q), n_kv, dtype=torch.int32)
    empty = torch.zeros(batch, heads, n_q, 0, dtype=torch.int32)
    return Routing(lut, full, empty, torch.zeros_like(full))


def test_all_critical_equals_full_attention_plus_bias(generator):
    q, k, v = random_qkv(2, 2, 50, 70, 16, torch.float64, generator)
    weight, bias = random_projection(16, torch.float64, generator)
    routing = _all_critical(2, 2, 50, 70, 16, 32)
    out, lse, _ = reference.attention_with_routing(
        q, k, v, routing, weight, bias, 16, 32, "softmax", "marginal"
    )
    # No marginal block anywhere: O_l = 0, so the projection contributes its bias only.
    assert relative_error(out, reference.full_attention(q, k, v) + bias) < 1e-12
    expected_lse = torch.logsumexp((q @ k.transpose(-1, -2)) / 4.0, dim=-1)
    torch.testing.assert_close(lse, expected_lse.float())


def _linear_from_block_sums(q, k, v, routing, bq, bk, feature, linear):
    """The paper's cheap form: global sums of h_j = phi(K_j)^T V_j and z_j minus excluded blocks."""
    n_kv = num_blocks(k.shape[2], bk)
    pq, pk = reference.feature_map(q, feature), reference.feature_map(k, feature)
    h = torch.stack([pk[:, :, j * bk:(j + 1) * bk].transpose(-1, -2) @ v[:, :, j * bk:(j + 1) * bk]
                     for j in range(n_kv)], dim=2)
    z = torch.stack([pk[:, :, j * bk:(j + 1) * bk].sum(dim=2) for j in range(n_kv)], dim=2)
    excluded = torch.zeros(*routing.lut_count.shape, n_kv, dtype=torch.bool)
    if linear == "marginal":
        excluded = block_mask(routing.lut, routing.lut_count, n_kv) | block_mask(
            routing.neg_lut, routing.neg_count, n_kv)
    keep = (~excluded).to(q.dtype)
    h_rows = h.sum(dim=2, keepdim=True) - torch.einsum("bhij,bhjde->bhide", 1 - keep, h)
    z_rows = z.sum(dim=2, keepdim=True) - torch.einsum("bhij,bhjd->bhid", 1 - keep, z)
    rows = torch.arange(q.shape[2]) // bq
    h_tok, z_tok = h_rows[:, :, rows], z_rows[:, :, rows]
    num = torch.einsum("bhld,bhlde->bhle", pq, h_tok)
    den = torch.einsum("bhld,bhld->bhl", pq, z_tok).unsqueeze(-1) + LINEAR_EPS
    has_marginal = keep[:, :, rows].any(dim=-1, keepdim=True)
    return torch.where(has_marginal, num / den, torch.zeros_like(num))


@pytest.mark.parametrize("feature", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_linear_branch_matches_block_sum_form(generator, feature, linear):
    q, k, v = random_qkv(2, 3, 45, 75, 16, torch.float64, generator)
    routing = reference.route(q, k, 0.25, 0.2, 16, 16)
    weight = torch.eye(16, dtype=torch.float64)
    bias = torch.zeros(16, dtype=torch.float64)
    settings = (16, 16, feature, linear)
    out = reference.attention_with_routing(q, k, v, routing, weight, bias, *settings).out
    zero = torch.zeros_like(weight)
    sparse_only = reference.attention_with_routing(
        q, k, v, routing, zero, bias, 16, 16, feature, linear
    ).out
    expected = _linear_from_block_sums(q, k, v, routing, 16, 16, feature, linear)
    assert relative_error(out - sparse_only, expected) < 1e-10


def test_row_without_critical_block_gives_zero_sparse_output(generator):
    q, k, v = random_qkv(1, 1, 32, 48, 16, torch.float64, generator)
    routing = reference.route(q, k, 0.4, 0.0, 16, 16)
    count = routing.lut_count.clone()
    count[0, 0, 1] = 0
    routing = routing._replace(lut_count=count)
    zero = torch.zeros(16, 16, dtype=torch.float64)
    out, lse, _ = reference.attention_with_routing(
        q, k, v, routing, zero, torch.zeros(16, dtype=torch.float64), 16, 16, "softmax", "marginal"
    )
    assert (out[0, 0, 16:] == 0).all() and (lse[0, 0, 16:] == float("-inf")).all()
    assert out[0, 0, :16].abs().sum() > 0 and torch.isfinite(lse[0, 0, :16]).all()


def test_bf16_inputs_return_bf16_close_to_float64(generator):
    q, k, v = random_qkv(1, 2, 40, 56, 16, torch.float64, generator)
    weight, bias = random_projection(16, torch.float32, generator)
    routing = reference.route(q, k, 0.5, 0.0, 16, 16)
    args = (weight, bias, 16, 16, "softmax", "marginal")
    out16 = reference.attention_with_routing(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), routing, *args
    ).out
    out64 = reference.attention_with_routing(q, k, v, routing, *args).out
    assert out16.dtype == torch.bfloat16
    assert relative_error(out16, out64) < 2e-2


@pytest.mark.parametrize("feature", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_reference_gradcheck(generator, feature, linear):
    q, k, v = random_qkv(1, 2, 23, 37, 8, torch.float64, generator)
    weight, bias = random_projection(8, torch.float64, generator)
    routing = reference.route(q, k, 0.34, 0.34, 16, 16)

    def fn(q, k, v, weight, bias):
        out = reference.attention_with_routing(
            q, k, v, routing, weight, bias, 16, 16, feature, linear
        ).out
        return out

    inputs = tuple(t.requires_grad_() for t in (q, k, v, weight, bias))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("feature", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("linear", ["marginal", "global"])
@pytest.mark.parametrize("gated", [False, True])
def test_explicit_backward_matches_autograd(generator, feature, linear, gated):
    q, k, v = random_qkv(2, 2, 45, 70, 16, torch.float64, generator)
    weight, bias = random_projection(16, torch.float64, generator)
    gate = torch.rand(2, 2, 45, generator=generator, dtype=torch.float64) * 2 - 0.5
    routing = reference.route(q, k, 0.25, 0.25, 16, 32)
    count = routing.lut_count.clone()
    count[0, 1, 2] = 0  # one row with no critical block at all
    routing = routing._replace(lut_count=count)
    settings = (16, 32, feature, linear)
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v, weight, bias, gate))
    if not gated:
        leaves = leaves[:5]
    out = reference.attention_with_routing(*leaves[:3], routing, *leaves[3:5], *settings,
                                           None, *leaves[5:]).out
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    expected = torch.autograd.grad(out, leaves, grad)
    *explicit, d_gate = reference.attention_backward(grad, q, k, v, routing, weight, bias,
                                                     *settings, None, gate if gated else None)
    names = ("q", "k", "v", "weight", "bias")
    for name, mine, theirs in zip(names, explicit, expected[:5], strict=True):
        assert relative_error(mine, theirs) < 1e-12, name
    if gated:
        assert relative_error(d_gate, expected[5]) < 1e-12
    else:
        assert d_gate is None


def test_the_kernels_and_the_reference_have_the_same_feature_maps():
    assert tuple(kernel_feature_maps.FEATURE_MAPS) == spec.FEATURE_MAPS == tuple(FEATURE_MAPS)


@pytest.mark.parametrize("feature", spec.FEATURE_MAPS)
def test_each_feature_maps_gradient_is_its_maps(generator, feature):
    x = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 16, generator=generator, dtype=torch.float64)
    (expected,) = torch.autograd.grad(FEATURE_MAPS[feature].phi(x), x, grad)
    assert relative_error(FEATURE_MAPS[feature].vjp(x.detach(), grad), expected) < 1e-12
