"""SparseLinearAttention is a drop-in for thu-ml/SLA's module."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import sla_tl
from sla_tl import reference

from .helpers import random_qkv, relative_error


def test_constructor_takes_thu_ml_positional_arguments():
    module = sla_tl.SparseLinearAttention(128, 0.1, "elu", 128, 64, False, True)
    assert (module.topk, module.feature_map, module.BLKQ, module.BLKK) == (0.1, "elu", 128, 64)
    assert module.dtype == torch.float16
    names = list(inspect.signature(sla_tl.SparseLinearAttention.__init__).parameters)[1:8]
    assert names == ["head_dim", "topk", "feature_map", "BLKQ", "BLKK", "use_bf16",
                     "tie_feature_map_qk"]
    forward = list(inspect.signature(sla_tl.SparseLinearAttention.forward).parameters)
    assert forward == ["self", "q", "k", "v", "return_sparsity"]


def test_thu_ml_state_dict_loads_strictly(generator):
    saved = {
        "proj_l.weight": torch.randn(64, 64, generator=generator),
        "proj_l.bias": torch.randn(64, generator=generator),
    }
    module = sla_tl.SparseLinearAttention(64, 0.2)
    assert set(module.state_dict()) == set(saved)
    module.load_state_dict(saved, strict=True)
    torch.testing.assert_close(module.proj_l.weight, saved["proj_l.weight"])


def test_untrained_module_returns_sparse_branch_in_input_dtype(generator):
    q, k, v = random_qkv(1, 2, 100, 100, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.3, BLKQ=32, BLKK=32)
    out, density = module(q, k, v, return_sparsity=True)
    assert out.dtype == torch.float32
    assert density == 1 / 4
    bf = [t.bfloat16() for t in (q, k, v)]
    routing = reference.route(*bf[:2], 0.3, 0.0, 32, 32)
    zero_w, zero_b = torch.zeros(64, 64), torch.zeros(64)
    sparse_only = reference.attention_with_routing(
        *bf, routing, zero_w, zero_b, 32, 32, "softmax", "marginal"
    ).out
    assert relative_error(out, sparse_only) < 1e-6


def test_module_trains_the_projection(generator):
    q, k, v = random_qkv(1, 2, 64, 64, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.25, BLKQ=16, BLKK=16, k_low=0.25, layout="bhsd")
    module(q, k, v).float().square().sum().backward()
    assert module.proj_l.bias.grad.abs().sum() > 0
    assert module.proj_l.weight.grad.abs().sum() > 0


def test_module_bshd_layout(generator):
    q, k, v = random_qkv(1, 2, 48, 80, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.4, BLKQ=16, BLKK=16, layout="bshd")
    torch.nn.init.normal_(module.proj_l.weight)
    bhsd = sla_tl.SparseLinearAttention(64, 0.4, BLKQ=16, BLKK=16)
    bhsd.load_state_dict(module.state_dict())
    out = module(*(t.transpose(1, 2) for t in (q, k, v)))
    assert out.shape == (1, 48, 2, 64)
    assert relative_error(out.transpose(1, 2), bhsd(q, k, v)) < 1e-6


def test_presets_fill_the_settings_left_unset():
    default = sla_tl.SparseLinearAttention(64, 0.1)
    assert (default.linear, default.k_low, default.BLKQ, default.BLKK, default.layout) == (
        "global", 0.0, 64, 64, "bhsd")
    turbo = sla_tl.SparseLinearAttention(128, 0.1, preset="turbodiffusion")
    assert (turbo.linear, turbo.BLKQ, turbo.BLKK, turbo.layout) == ("global", 128, 64, "bshd")
    paper = sla_tl.SparseLinearAttention(128, 0.05, preset="paper", BLKQ=128)
    assert (paper.linear, paper.k_low, paper.BLKQ, paper.BLKK) == ("marginal", 0.10, 128, 64)
    with pytest.raises(ValueError, match="preset"):
        sla_tl.SparseLinearAttention(64, 0.1, preset="SLA-2")


def test_sage_module_has_sagesla_call_signature():
    names = list(inspect.signature(sla_tl.SageSparseLinearAttention.__init__).parameters)[1:6]
    assert names == ["head_dim", "topk", "feature_map", "use_bf16", "tie_feature_map_qk"]
    sage = sla_tl.SageSparseLinearAttention(128, 0.2, "elu", False)
    assert (sage.BLKQ, sage.BLKK, sage.linear, sage.dtype) == (64, 128, "global", torch.float16)
    turbo = sla_tl.SageSparseLinearAttention(128, 0.2, preset="turbodiffusion-sagesla")
    assert turbo.layout == "bshd"


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_feature_map_attributes_compute_the_named_map(generator, feature_map):
    module = sla_tl.SparseLinearAttention(64, 0.1, feature_map, tie_feature_map_qk=False)
    x = torch.randn(2, 64, generator=generator)
    torch.testing.assert_close(module.feature_map_q(x), reference.feature_map(x, feature_map))
    torch.testing.assert_close(module.feature_map_k(x), reference.feature_map(x, feature_map))
    assert set(sla_tl.module.FEATURE_MAP_FUNCTIONS) == set(sla_tl.spec.FEATURE_MAPS)


def test_replaced_feature_map_is_refused_and_copies_keep_theirs(generator):
    q, k, v = random_qkv(1, 2, 64, 64, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.5, BLKQ=16, BLKK=16)
    copy.deepcopy(module)(q, k, v)  # an EMA-style copy still has the built-in maps
    module.feature_map_q = torch.nn.ReLU()
    with pytest.raises(ValueError, match="feature_map_q"):
        module(q, k, v)


def test_evident_layout_swap_is_an_error_naming_layout(generator):
    # A (B, L, H, D) tensor handed to a (B, H, L, D) module, as TurboDiffusion code does.
    q = torch.randn(1, 1024, 4, 64, generator=generator).bfloat16()
    with pytest.raises(ValueError, match="layout='bshd'"):
        sla_tl.SparseLinearAttention(64, 0.1)(q, q, q)
    with pytest.raises(ValueError, match="layout='bhsd'"):
        sla_tl.SparseLinearAttention(64, 0.1, preset="turbodiffusion")(
            q.transpose(1, 2), q.transpose(1, 2), q.transpose(1, 2))
    out = sla_tl.SparseLinearAttention(64, 0.1, preset="turbodiffusion", BLKQ=64)(q, q, q)
    assert out.shape == q.shape
