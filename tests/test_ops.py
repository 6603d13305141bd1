"""The torch.ops.sla operators on the CPU: registration, agreement with the reference,
autograd, layouts and torch.compile."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference

from .helpers import random_projection, random_qkv, relative_error

SETTINGS = dict(block_q=16, block_kv=32, feature_map="elu", linear="marginal", scale=None)


def _op_args(q, k, v, w, b, topk=0.3, k_low=0.2, layout="bhsd", **overrides):
    s = {**SETTINGS, **overrides}
    return (q, k, v, w, b, topk, k_low, s["block_q"], s["block_kv"], s["feature_map"],
            s["linear"], s["scale"], layout)


def test_building_blocks_are_custom_ops_and_the_entries_their_compositions():
    # The building blocks: one device-agnostic kernel (the backend of q's device, from
    # sla_tl.dispatch), a fake kernel and, for the forwards, an autograd formula.
    for name in ("route", "attention_fwd", "routed_attention_fwd", "attention_bwd"):
        op = getattr(torch.ops.sla, name).default
        for key in ("CompositeExplicitAutograd", "Meta", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    # The entries decompose into one building block each, so autograd and torch.compile
    # see the building block.
    for name in ("attention", "attention_lut"):
        op = getattr(torch.ops.sla, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(),
                                                              "CompositeImplicitAutograd")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Autograd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_attention(generator, dtype):
    q, k, v = random_qkv(2, 2, 40, 56, 64, dtype, generator)
    w, b = random_projection(64, dtype, generator)
    for t in (q, k, v, w, b):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.sla.attention.default, _op_args(q, k, v, w, b))


@pytest.mark.parametrize("gated", [False, True])
def test_opcheck_attention_lut_and_building_blocks(generator, gated):
    q, k, v = random_qkv(1, 2, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = torch.rand(1, 2, 40, generator=generator, dtype=torch.float64) if gated else None
    routing = sla_tl.route(q, k, 0.5, 0.25, 16, 32)
    settings = (16, 32, "softmax", "global", 0.2, "bhsd")
    torch.library.opcheck(torch.ops.sla.route.default, (q, k, 0.5, 0.25, 16, 32, "bhsd"))
    torch.library.opcheck(torch.ops.sla.attention_fwd.default,
                          (q, k, v, *routing, w, b, gate, *settings))
    outputs = torch.ops.sla.attention_fwd(q, k, v, *routing, w, b, gate, *settings)
    grad = torch.randn_like(outputs[0])
    torch.library.opcheck(
        torch.ops.sla.attention_bwd.default,
        (grad, q, k, v, *outputs, *routing, w, b, gate, *settings),
    )
    for t in (q, k, v, w, b) + ((gate,) if gated else ()):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.sla.attention_lut.default,
                          (q, k, v, *routing, w, b, *settings, gate))


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_op_matches_reference(generator, linear):
    q, k, v = random_qkv(2, 3, 70, 45, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    out = torch.ops.sla.attention(*_op_args(q, k, v, w, b, linear=linear))
    ref = reference.attention(q, k, v, w, b, 0.3, 0.2, 16, 32, "elu", linear)
    assert relative_error(out, ref) < 1e-12


def test_schema_defaults_match_design(generator):
    q, k, v = random_qkv(1, 2, 200, 300, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    out = torch.ops.sla.attention(q, k, v, w, b)
    ref = reference.attention(q, k, v, w, b, 0.05, 0.0, 64, 64, "softmax", "marginal")
    assert relative_error(out, ref) < 1e-12


def test_bshd_layout_reads_views_and_returns_bshd(generator):
    q, k, v = random_qkv(2, 3, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    bshd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out = torch.ops.sla.attention(*_op_args(*bshd, w, b, layout="bshd"))
    assert out.shape == (2, 40, 3, 64) and out.is_contiguous()
    expected = torch.ops.sla.attention(*_op_args(q, k, v, w, b))
    assert relative_error(out.transpose(1, 2), expected) < 1e-12


def test_op_gradients_match_reference_autograd(generator):
    q, k, v = random_qkv(2, 2, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    torch.ops.sla.attention(*_op_args(*leaves)).backward(grad)
    reference.attention(*ref_leaves, 0.3, 0.2, 16, 32, "elu", "marginal").backward(grad)
    for mine, theirs in zip(leaves, ref_leaves, strict=True):
        assert relative_error(mine.grad, theirs.grad) < 1e-12


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_op_gradcheck(generator, layout):
    q, k, v = random_qkv(1, 2, 24, 40, 64, torch.float64, generator)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    w, b = random_projection(64, torch.float64, generator)
    routing = sla_tl.route(q, k, 0.34, 0.34, 16, 16, layout)

    def fn(q, k, v, w, b):
        return sla_tl.attention_with_routing(
            q, k, v, routing, w, b, block_q=16, block_kv=16, feature_map="softmax",
            linear="marginal", layout=layout,
        )

    inputs = tuple(t.requires_grad_() for t in (q, k, v, w, b))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_attention_with_routing_uses_the_given_blocks(generator):
    q, k, v = random_qkv(1, 1, 32, 64, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    routing = sla_tl.route(q, k, 0.25, 0.0, 16, 16)
    # A router of one's own: every query block attends to key block 3 only.
    fixed = routing._replace(lut=torch.full_like(routing.lut, 3))
    out = sla_tl.attention_with_routing(q, k, v, fixed, torch.zeros_like(w), b, block_q=16,
                                        block_kv=16)
    keys, values = k[:, :, 48:64], v[:, :, 48:64]
    expected = torch.softmax(q @ keys.transpose(-1, -2) / 8.0, dim=-1) @ values + b
    assert relative_error(out, expected) < 1e-12


def test_no_grad_call_skips_autograd_and_matches(generator):
    q, k, v = random_qkv(1, 2, 40, 40, 64, torch.float32, generator)
    w, b = random_projection(64, torch.float32, generator)
    with torch.no_grad():
        out = torch.ops.sla.attention(*_op_args(q.requires_grad_(), k, v, w, b))
    assert out.grad_fn is None
    assert relative_error(out, reference.attention(q, k, v, w, b, 0.3, 0.2, 16, 32, "elu",
                                                   "marginal")) < 1e-6


class _TinyAttentionBlock(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.sla = sla_tl.SparseLinearAttention(dim, topk=0.3, BLKQ=16, BLKK=16, k_low=0.2,
                                                layout="bshd")
        torch.nn.init.normal_(self.sla.proj_l.weight, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, 1, -1).unbind(dim=2)
        return self.sla(q, k, v).flatten(2)


def test_compiles_fullgraph_forward_and_backward(generator):
    torch._dynamo.reset()
    model = _TinyAttentionBlock(64)
    x = torch.randn(2, 40, 64, generator=generator)
    compiled = torch.compile(model, fullgraph=True)
    # A graph cached on disk by another version of the operators must not be reused.
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = compiled(x)
        out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    eager = model(x)
    eager.square().sum().backward()
    assert relative_error(out, eager) < 1e-5
    for name, param in model.named_parameters():
        assert relative_error(grads[name], param.grad) < 1e-4, name
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_autocast_around_a_call_changes_no_bit(generator, linear):
    """The operators compute in their inputs' dtypes: an autocast region (as a bf16 training
    loop has) gives the same outputs and gradients, bit for bit."""
    q, k, v = random_qkv(1, 2, 300, 200, 64, torch.float32, generator)
    w, b = random_projection(64, torch.float32, generator)

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
        out = torch.ops.sla.attention(*leaves[:3], *leaves[3:], 0.2, 0.1, 64, 64,
                                      linear=linear)
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    plain = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = run()
    for name, a, c in zip("out dq dk dv dw db".split(), plain, under_autocast, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c), name
