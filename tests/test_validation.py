"""Bad input gets a ValueError or TypeError naming the argument at fault."""

from __future__ import annotations

import pytest
import torch

import sla_tl

from .helpers import random_projection, random_qkv


@pytest.fixture
def good(generator):
    q, k, v = random_qkv(1, 2, 40, 56, 64, torch.float32, generator)
    w, b = random_projection(64, torch.float32, generator)
    return dict(q=q, k=k, v=v, proj_weight=w, proj_bias=b)


def _call(args: dict, **settings):
    return sla_tl.attention(args["q"], args["k"], args["v"], args["proj_weight"],
                            args["proj_bias"], **settings)


def _with(good: dict, **changes) -> dict:
    return {**good, **changes}


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (lambda a: dict(q=a["q"][0]), ValueError, r"q must have rank 4"),
        (lambda a: dict(k=a["k"][None]), ValueError, r"k must have rank 4"),
        (lambda a: dict(v=a["v"][0]), ValueError, r"v must have rank 4"),
        (lambda a: dict(q=a["q"].to(torch.int32)), TypeError, r"q must be one of"),
        (lambda a: dict(k=a["k"].double()), TypeError, r"k must have q's dtype"),
        (lambda a: dict(v=a["v"].half()), TypeError, r"v must have q's dtype"),
        (lambda a: dict(q=a["q"][..., :32], k=a["k"][..., :32], v=a["v"][..., :32]),
         ValueError, r"head dim of q must be one of \(64, 128\)"),
        (lambda a: dict(k=a["k"][:, :1], v=a["v"][:, :1]), ValueError, r"k must match q"),
        (lambda a: dict(v=a["v"][:, :, :30]), ValueError, r"v must have k's length"),
        (lambda a: dict(q="not a tensor"), TypeError, r"q must be a torch.Tensor"),
        (lambda a: dict(proj_weight=a["proj_weight"][:32]), ValueError,
         r"proj_weight must have shape \(64, 64\)"),
        (lambda a: dict(proj_bias=a["proj_bias"][:3]), ValueError, r"proj_bias must have shape"),
        (lambda a: dict(proj_bias=a["proj_bias"].int()), TypeError,
         r"proj_bias must be a floating"),
        (lambda a: dict(q=a["q"].to("meta"), k=a["k"].to("meta"), v=a["v"].to("meta")),
         ValueError, r"q must be on a cpu or cuda device"),
        (lambda a: dict(proj_weight=a["proj_weight"].to("meta")), ValueError,
         r"proj_weight must be on q's device"),
    ],
)
def test_bad_tensors(good, change, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(_with(good, **change(good)))


@pytest.mark.parametrize(
    "settings,error,pattern",
    [
        (dict(topk=1.5), ValueError, r"topk must be in \[0, 1\]"),
        (dict(topk=-0.1), ValueError, r"topk must be in \[0, 1\]"),
        (dict(k_low=2.0), ValueError, r"k_low must be in \[0, 1\]"),
        (dict(block_q=0), ValueError, r"block_q must be a positive multiple of 16"),
        (dict(block_q=40), ValueError, r"block_q must be a positive multiple of 16"),
        (dict(block_kv=-16), ValueError, r"block_kv must be a positive multiple of 16"),
        (dict(block_kv=24), ValueError, r"block_kv must be a positive multiple of 16"),
        (dict(feature_map="hedgehog"), ValueError, r"feature_map must be one of"),
        (dict(linear="local"), ValueError, r"linear must be one of"),
        (dict(layout="sbhd"), ValueError, r"layout must be one of"),
        (dict(scale=0.0), ValueError, r"scale must be positive"),
        (dict(scale=float("nan")), ValueError, r"scale must be positive"),
    ],
)
def test_bad_settings(good, settings, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(good, **settings)


def test_bshd_layout_names_its_axes(good):
    with pytest.raises(ValueError, match=r"q must have rank 4 \(B, L, H, D\)"):
        _call(_with(good, q=good["q"][0]), layout="bshd")


def test_cuda_device_rules_checked_without_a_gpu():
    # Fake tensors carry a CUDA device without one, so the kernel-side dtype rule is testable.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 64, 64, device="cuda", dtype=torch.float32)
        w = torch.empty(64, 64, device="cuda")
        b = torch.empty(64, device="cuda")
        with pytest.raises(TypeError, match=r"q must be one of bfloat16, float16 on cuda"):
            torch.ops.sla.attention(q, q, q, w, b)
        on_cpu = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
        on_gpu = torch.empty(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"k must be on q's device"):
            torch.ops.sla.attention(on_cpu, on_gpu, on_gpu, w.cpu(), b.cpu())


def test_route_validates(good):
    with pytest.raises(ValueError, match=r"topk must be in"):
        sla_tl.route(good["q"], good["k"], topk=3.0)
    with pytest.raises(ValueError, match=r"block_kv must be a positive multiple of 16"):
        sla_tl.route(good["q"], good["k"], block_kv=10)


def test_routing_shape_and_dtype_are_checked(good):
    routing = sla_tl.route(good["q"], good["k"], 0.5, 0.0, 16, 16)
    args = (good["q"], good["k"], good["v"])
    proj = (good["proj_weight"], good["proj_bias"])
    with pytest.raises(TypeError, match=r"lut must be int32"):
        sla_tl.attention_with_routing(*args, routing._replace(lut=routing.lut.long()), *proj,
                                      block_q=16, block_kv=16)
    with pytest.raises(ValueError, match=r"lut must have shape \(B, H, Mq, width\)"):
        sla_tl.attention_with_routing(*args, routing, *proj, block_q=32, block_kv=16)
    wide = sla_tl.route(good["q"], good["k"], 1.0, 0.0, 16, 16)
    with pytest.raises(ValueError, match=r"lut is 4 wide but there are only 2 key blocks"):
        sla_tl.attention_with_routing(*args, wide, *proj, block_q=16, block_kv=32)
    # The reference reads the values too (kernels cannot without a host synchronisation).
    with pytest.raises(ValueError, match=r"lut entries must lie in \[0, 2\)"):
        sla_tl.attention_with_routing(*args, routing, *proj, block_q=16, block_kv=32)


def test_module_constructor_validates():
    with pytest.raises(ValueError, match=r"head_dim must be one of"):
        sla_tl.SparseLinearAttention(96, 0.1)
    with pytest.raises(ValueError, match=r"feature_map must be one of"):
        sla_tl.SparseLinearAttention(64, 0.1, feature_map="hedgehog")
    with pytest.raises(ValueError, match=r"BLKK must be a positive multiple of 16"):
        sla_tl.SparseLinearAttention(64, 0.1, BLKK=20)
    with pytest.raises(ValueError, match=r"topk must be in"):
        sla_tl.SparseLinearAttention(64, 1.1)
