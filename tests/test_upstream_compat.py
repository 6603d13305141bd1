"""The module's presets against the published SLA variants, emulated here in float64.

Each emulation follows the upstream module's algorithm as read in its source (thu-ml/SLA
branches `main` and `SLA-1`, TurboDiffusion's vendored `SLA`, SageSLA) or, for the paper's
setting, the paper's equations; it is written out plainly, not taken from that code:

- routing (all of them): smooth k by its mean over L, mean-pool q and k over blocks (a
  partial last block averaged over the rows it has), score pooled q against pooled k, and
  make the `min(K, int(topk * K))` highest-scoring key blocks of each row critical;
- sparse branch: softmax attention over the critical blocks' keys, scale D ** -0.5;
- linear branch of `main`, TurboDiffusion and SageSLA: phi(q) (phi(k)^T v) /
  (1e-5 + phi(q) . colsum phi(k)) over all keys;
- linear branch of `SLA-1`: the same sums over the keys of the non-critical blocks only,
  without the 1e-5, and zero where every block is critical; the paper's: over the
  marginal blocks (neither critical nor among the `int(k_low * K)` lowest-scoring);
- output: O_s + proj_l(O_l).

Our module runs in bfloat16 (like upstream's); the emulation takes the same bf16-rounded
inputs in float64, so what separates the two is bf16 rounding alone.
"""

from __future__ import annotations

import pytest
import torch

import sla_tl

from .helpers import relative_error

# bf16 keeps 8 significant bits; a result rounded once sits ~2e-3 from the exact one.
BF16_NOISE = 1e-2


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    n = -(-x.shape[-2] // block)
    return torch.stack([x[..., i * block:(i + 1) * block, :].mean(dim=-2) for i in range(n)], -2)


def _token_mask(block_mask: torch.Tensor, lq: int, lk: int, block_q: int, block_kv: int):
    rows = block_mask.repeat_interleave(block_q, dim=-2)[..., :lq, :]
    return rows.repeat_interleave(block_kv, dim=-1)[..., :lk]


def _block_classes(q, k, topk, k_low, block_q, block_kv):
    """(critical, negligible) block masks (B, H, Mq, Nk) by upstream's routing."""
    smoothed = k - k.mean(dim=-2, keepdim=True)
    scores = _mean_pool(q, block_q) @ _mean_pool(smoothed, block_kv).transpose(-1, -2)
    n_kv = scores.shape[-1]
    n_crit = min(n_kv, int(topk * n_kv))
    order = scores.argsort(dim=-1, descending=True)
    critical = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :n_crit], True)
    n_neg = int(k_low * n_kv)
    negligible = torch.zeros_like(critical)
    if n_neg:
        negligible.scatter_(-1, order[..., n_kv - n_neg:], True)
    return critical, negligible & ~critical


def _phi(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return torch.nn.functional.elu(x) + 1
    return torch.relu(x)


def _emulate(variant: str, q, k, v, weight, bias, topk, feature_map):
    """Upstream's output for (B, H, L, D) float64 q, k, v (see the module docstring)."""
    block_q, block_kv, k_low = {
        "main": (64, 64, 0.0), "sla-1": (64, 64, 0.0), "paper": (64, 64, 0.10),
        "turbodiffusion": (128, 64, 0.0), "sagesla": (64, 128, 0.0),
    }[variant]
    lq, lk, dim = q.shape[-2], k.shape[-2], q.shape[-1]
    critical, negligible = _block_classes(q, k, topk, k_low, block_q, block_kv)
    crit = _token_mask(critical, lq, lk, block_q, block_kv)
    scores = (q @ k.transpose(-1, -2)) * dim**-0.5
    o_s = torch.softmax(scores.masked_fill(~crit, float("-inf")), dim=-1) @ v
    weights = _phi(q, feature_map) @ _phi(k, feature_map).transpose(-1, -2)
    if variant in ("sla-1", "paper"):
        marginal = ~(crit | _token_mask(negligible, lq, lk, block_q, block_kv))
        weights = weights * marginal
        o_l = (weights @ v) / weights.sum(dim=-1, keepdim=True)
        o_l = torch.where(marginal.any(dim=-1, keepdim=True), o_l, torch.zeros_like(o_l))
    else:
        o_l = (weights @ v) / (1e-5 + weights.sum(dim=-1, keepdim=True))
    return o_s + o_l @ weight.T + bias


# preset -> (emulated variant, the layout its module takes)
PRESET_VARIANTS = {
    "thu-ml": ("main", "bhsd"),
    "sla-1": ("sla-1", "bhsd"),
    "paper": ("paper", "bhsd"),
    "turbodiffusion": ("turbodiffusion", "bshd"),
    "sagesla": ("sagesla", "bhsd"),
    "turbodiffusion-sagesla": ("sagesla", "bshd"),
}


def _problem(generator, length=1000, heads=2, dim=64):
    """bf16 q, k, v (B, H, L, D) whose values are exact in float64 too, and a non-zero
    projection as a thu-ml-keyed state_dict."""
    q, k, v = (torch.randn(1, heads, length, dim, generator=generator, dtype=torch.float64)
               .bfloat16() for _ in range(3))
    state = {"proj_l.weight": torch.randn(dim, dim, generator=generator) / dim**0.5,
             "proj_l.bias": torch.randn(dim, generator=generator) * 0.02}
    return q, k, v, state


def _ours(preset, q, k, v, state, topk, feature_map, layout):
    module = sla_tl.SparseLinearAttention(q.shape[-1], topk, feature_map, preset=preset)
    module.load_state_dict(state, strict=True)
    if layout == "bshd":
        return module(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    return module(q, k, v)


def _upstream(variant, q, k, v, state, topk, feature_map):
    return _emulate(variant, q.double(), k.double(), v.double(),
                    state["proj_l.weight"].double(), state["proj_l.bias"].double(), topk,
                    feature_map)


def test_presets_cover_every_emulated_variant():
    assert set(PRESET_VARIANTS) == set(sla_tl.PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESET_VARIANTS))
def test_preset_matches_its_upstream_variant(generator, preset):
    variant, layout = PRESET_VARIANTS[preset]
    q, k, v, state = _problem(generator)
    ours = _ours(preset, q, k, v, state, 0.2, "softmax", layout)
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours, _upstream(variant, q, k, v, state, 0.2, "softmax")) < BF16_NOISE


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("preset", ["thu-ml", "sla-1"])
def test_preset_matches_upstream_with_other_feature_maps(generator, preset, feature_map):
    variant, layout = PRESET_VARIANTS[preset]
    q, k, v, state = _problem(generator, length=700)
    ours = _ours(preset, q, k, v, state, 0.3, feature_map, layout)
    assert relative_error(ours, _upstream(variant, q, k, v, state, 0.3, feature_map)) < BF16_NOISE


def test_default_module_is_thu_ml_main_and_tells_it_from_sla_1(generator):
    q, k, v, state = _problem(generator)
    module = sla_tl.SparseLinearAttention(64, 0.2)
    module.load_state_dict(state)
    ours = module(q, k, v)
    assert relative_error(ours, _upstream("main", q, k, v, state, 0.2, "softmax")) < BF16_NOISE
    # The comparison can tell the variants apart: SLA-1's numbers are far outside the noise.
    assert relative_error(ours, _upstream("sla-1", q, k, v, state, 0.2, "softmax")) > 3 * BF16_NOISE


def test_return_sparsity_is_upstreams_critical_share(generator):
    q, k, v, _ = _problem(generator, length=1000)
    _, density = sla_tl.SparseLinearAttention(64, 0.2)(q, k, v, return_sparsity=True)
    n_kv = 16  # 1000 keys in blocks of 64
    assert density == int(0.2 * n_kv) / n_kv
