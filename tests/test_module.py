"""SparseLinearAttention is a drop-in for thu-ml/SLA's module."""

from __future__ import annotations

import inspect

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
