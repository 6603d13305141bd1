"""sla::attention_dynamic_topk: the numbers of sla::attention, with topk a tensor that a
compiled graph reads without being compiled again."""

from __future__ import annotations

import pytest
import torch

import sla_tl

from .helpers import random_projection, random_qkv, relative_error

SETTINGS = dict(k_low=0.2, block_q=16, block_kv=32, feature_map="elu", linear="marginal")


def _problem(generator, dtype=torch.float64):
    q, k, v = random_qkv(1, 2, 72, 96, 64, dtype, generator)
    w, b = random_projection(64, dtype, generator)
    return [t.requires_grad_() for t in (q, k, v, w, b)]


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_matches_attention_forward_and_backward(generator, linear):
    tensors = _problem(generator)
    settings = {**SETTINGS, "linear": linear}
    want = sla_tl.attention(*tensors, topk=0.3, **settings)
    got = sla_tl.attention_dynamic_topk(*tensors, sla_tl.topk_tensor(0.3), **settings)
    assert relative_error(got, want) < 1e-12
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, tensors, grad)
    for a, b in zip(got_grads, torch.autograd.grad(want, tensors, grad), strict=True):
        assert relative_error(a, b) < 1e-12


def test_opcheck(generator):
    q, k, v, w, b = _problem(generator)
    args = (q, k, v, w, b, sla_tl.topk_tensor(0.4), 0.1, 16, 32, "softmax", "global", None,
            "bhsd")
    torch.library.opcheck(torch.ops.sla.attention_dynamic_topk.default, args)


def test_compiled_call_takes_a_new_topk_without_recompiling(generator):
    tensors = _problem(generator)
    topk = sla_tl.topk_tensor(0.3)
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(graph)
        return graph.forward

    compiled = torch.compile(lambda *t: sla_tl.attention_dynamic_topk(*t, topk, **SETTINGS),
                             fullgraph=True, backend=counting_backend)
    first = compiled(*tensors)
    compiled_once = len(compiles)
    topk.fill_(0.7)
    second = compiled(*tensors)
    assert len(compiles) == compiled_once
    assert relative_error(second, sla_tl.attention(*tensors, topk=0.7, **SETTINGS)) < 1e-12
    assert relative_error(first, sla_tl.attention(*tensors, topk=0.3, **SETTINGS)) < 1e-12


def test_topk_must_be_a_cpu_scalar_tensor_in_range(generator):
    q, k, v, w, b = _problem(generator)
    with pytest.raises(TypeError, match="topk"):
        sla_tl.attention_dynamic_topk(q, k, v, w, b, 0.3)
    with pytest.raises(ValueError, match="topk"):
        sla_tl.attention_dynamic_topk(q, k, v, w, b, torch.tensor([0.3]))
    with pytest.raises(ValueError, match="topk"):
        sla_tl.attention_dynamic_topk(q, k, v, w, b, torch.tensor(1.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="topk"):
        sla_tl.topk_tensor(-0.1)
