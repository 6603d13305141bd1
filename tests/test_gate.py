"""SALAD's gate on the CPU: O = O_s + g * proj(O_l), exact against float64, with gradients."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference

from .helpers import random_projection, random_qkv, relative_error

SETTINGS = dict(topk=0.3, k_low=0.2, block_q=16, block_kv=16, feature_map="softmax")


def _gate(batch: int, heads: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Gate values on both sides of 0 and 1: the op must not assume a sigmoid's range."""
    return torch.rand(batch, heads, length, generator=generator, dtype=torch.float64) * 3 - 1


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_gated_output_is_sparse_plus_gated_projection(generator, linear):
    q, k, v = random_qkv(2, 3, 70, 45, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = _gate(2, 3, 70, generator)
    routing = sla_tl.route(q, k, 0.3, 0.2, 16, 16)
    settings = dict(block_q=16, block_kv=16, feature_map="elu", linear=linear)
    out = sla_tl.attention_with_routing(q, k, v, routing, w, b, gate=gate, **settings)
    # The parts, each from an ungated call: the sparse branch alone (zero projection) and O_l.
    zero = torch.zeros_like(w), torch.zeros_like(b)
    sparse = sla_tl.attention_with_routing(q, k, v, routing, *zero, **settings)
    o_l = reference.attention_with_routing(q, k, v, routing, w, b, 16, 16, "elu", linear).linear
    expected = sparse + gate.unsqueeze(-1) * (o_l @ w.T + b)
    assert relative_error(out, expected) < 1e-12
    assert relative_error(out, sla_tl.attention_with_routing(q, k, v, routing, w, b,
                                                             **settings)) > 1e-2


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_no_gate_and_a_gate_of_ones_give_the_ungated_output(generator, layout):
    q, k, v = random_qkv(1, 2, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    ones = torch.ones(q.shape[:3], dtype=torch.float64)
    plain = sla_tl.attention(q, k, v, w, b, layout=layout, **SETTINGS)
    assert torch.equal(sla_tl.attention(q, k, v, w, b, layout=layout, gate=None, **SETTINGS),
                       plain)
    assert relative_error(sla_tl.attention(q, k, v, w, b, layout=layout, gate=ones, **SETTINGS),
                          plain) < 1e-14


def test_bshd_gate_is_b_l_h(generator):
    q, k, v = random_qkv(2, 3, 48, 48, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = _gate(2, 3, 48, generator)
    expected = sla_tl.attention(q, k, v, w, b, gate=gate, **SETTINGS)
    bshd = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    out = sla_tl.attention(*bshd, w, b, layout="bshd", gate=gate.transpose(1, 2).contiguous(),
                           **SETTINGS)
    assert relative_error(out.transpose(1, 2), expected) < 1e-12


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_gated_op_gradcheck(generator, layout, linear):
    q, k, v = random_qkv(1, 2, 24, 40, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = _gate(1, 2, 24, generator)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        gate = gate.transpose(1, 2).contiguous()
    routing = sla_tl.route(q, k, 0.34, 0.34, 16, 16, layout)

    def fn(q, k, v, w, b, gate):
        return sla_tl.attention_with_routing(q, k, v, routing, w, b, block_q=16, block_kv=16,
                                             linear=linear, layout=layout, gate=gate)

    inputs = tuple(t.requires_grad_() for t in (q, k, v, w, b, gate))
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_gated_op_gradients_match_reference_autograd(generator):
    q, k, v = random_qkv(2, 2, 40, 56, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = _gate(2, 2, 40, generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b, gate)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b, gate)]
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    sla_tl.attention(*leaves[:5], gate=leaves[5], **SETTINGS).backward(grad)
    reference.attention(*ref_leaves[:5], 0.3, 0.2, 16, 16, "softmax", "marginal", None,
                        ref_leaves[5]).backward(grad)
    for name, mine, theirs in zip("q k v weight bias gate".split(), leaves, ref_leaves,
                                  strict=True):
        assert relative_error(mine.grad, theirs.grad) < 1e-12, name


def test_gate_gradient_is_rowsum_of_grad_times_projection(generator):
    q, k, v = random_qkv(1, 2, 40, 40, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    gate = _gate(1, 2, 40, generator).requires_grad_()
    routing = sla_tl.route(q, k, 0.3, 0.0, 16, 16)
    settings = dict(block_q=16, block_kv=16)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64)
    sla_tl.attention_with_routing(q, k, v, routing, w, b, gate=gate, **settings).backward(grad)
    o_l = reference.attention_with_routing(q, k, v, routing, w, b, 16, 16, "softmax",
                                           "marginal").linear
    assert relative_error(gate.grad, (grad * (o_l @ w.T + b)).sum(dim=-1)) < 1e-12


def test_gate_alone_requiring_grad_takes_the_autograd_path(generator):
    q, k, v = random_qkv(1, 2, 32, 32, 64, torch.float32, generator)
    w, b = random_projection(64, torch.float32, generator)
    gate = torch.rand(1, 2, 32, generator=generator).requires_grad_()
    out = sla_tl.attention(q, k, v, w, b, gate=gate, **SETTINGS)
    assert out.grad_fn is not None
    out.sum().backward()
    assert gate.grad.shape == gate.shape and gate.grad.abs().sum() > 0
    assert q.grad is None


@pytest.mark.parametrize(
    "make,error,pattern",
    [
        (lambda q: torch.rand(1, 40, 2), ValueError, r"gate must have shape \(B, H, Lq\)"),
        (lambda q: torch.rand(1, 2, 39), ValueError, r"gate must have shape"),
        (lambda q: torch.rand(1, 2, 40, 1), ValueError, r"gate must have shape"),
        (lambda q: torch.ones(1, 2, 40, dtype=torch.int32), TypeError,
         r"gate must be a floating tensor"),
        (lambda q: torch.ones(1, 2, 40, dtype=torch.bool), TypeError,
         r"gate must be a floating tensor"),
        (lambda q: 0.5, TypeError, r"gate must be a torch.Tensor"),
        (lambda q: torch.rand(1, 2, 40, device="meta"), ValueError,
         r"gate must be on q's device"),
    ],
)
def test_bad_gates_are_named(generator, make, error, pattern):
    q, k, v = random_qkv(1, 2, 40, 56, 64, torch.float32, generator)
    w, b = random_projection(64, torch.float32, generator)
    with pytest.raises(error, match=pattern):
        sla_tl.attention(q, k, v, w, b, gate=make(q))
    routing = sla_tl.route(q, k)
    with pytest.raises(error, match=pattern):
        sla_tl.attention_with_routing(q, k, v, routing, w, b, gate=make(q))


def test_bshd_gate_shape_is_named_with_its_axes(generator):
    q, k, v = (t.transpose(1, 2) for t in random_qkv(1, 2, 40, 40, 64, torch.float32,
                                                         generator))
    w, b = random_projection(64, torch.float32, generator)
    with pytest.raises(ValueError, match=r"gate must have shape \(B, Lq, H\) = \(1, 40, 2\)"):
        sla_tl.attention(q, k, v, w, b, layout="bshd", gate=torch.rand(1, 2, 40))


def test_gated_module_starts_as_the_sparse_branch_and_learns_its_gate(generator):
    q, k, v = random_qkv(2, 2, 64, 64, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.25, BLKQ=16, BLKK=16, k_low=0.25, gate=True)
    plain = sla_tl.SparseLinearAttention(64, 0.25, BLKQ=16, BLKK=16, k_low=0.25)
    assert set(module.state_dict()) == {"proj_l.weight", "proj_l.bias", "gate_proj.weight",
                                        "gate_proj.bias"}
    assert relative_error(module(q, k, v), plain(q, k, v)) < 1e-6
    gate = module.gate_of(q)
    assert gate.shape == (2, 2, 64) and gate.dtype == torch.float32
    assert torch.equal(gate, torch.full_like(gate, 0.5))
    torch.nn.init.normal_(module.proj_l.weight, std=0.1)
    module(q, k, v).float().square().sum().backward()
    assert module.gate_proj.weight.grad.abs().sum() > 0
    assert module.gate_proj.bias.grad.abs().sum() > 0
    assert module.proj_l.weight.grad.abs().sum() > 0


def test_gated_module_uses_sigmoid_of_its_gate_map(generator):
    q, k, v = random_qkv(1, 2, 48, 48, 64, torch.float64, generator)
    module = sla_tl.SparseLinearAttention(64, 0.3, BLKQ=16, BLKK=16, gate=True, layout="bshd")
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    bshd = [t.transpose(1, 2).to(torch.bfloat16) for t in (q, k, v)]
    out = module(*bshd)
    gate = torch.sigmoid(bshd[0].float() @ module.gate_proj.weight[0] + module.gate_proj.bias)
    assert gate.shape == (1, 48, 2)
    expected = sla_tl.attention(*bshd, module.proj_l.weight, module.proj_l.bias,
                                **module.attention_options(), gate=gate)
    assert relative_error(out, expected) < 1e-6
    ungated = sla_tl.attention(*bshd, module.proj_l.weight, module.proj_l.bias,
                               **module.attention_options())
    assert relative_error(out, ungated) > 1e-2


def test_module_gate_flag_must_be_a_bool():
    with pytest.raises(TypeError, match=r"gate must be a bool"):
        sla_tl.SparseLinearAttention(64, 0.1, gate="yes")


def test_gated_module_compiles_fullgraph(generator):
    torch._dynamo.reset()
    module = sla_tl.SparseLinearAttention(64, 0.3, BLKQ=16, BLKK=16, gate=True)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    q, k, v = random_qkv(1, 2, 40, 40, 64, torch.float32, generator)
    q.requires_grad_()
    with torch._inductor.config.patch(fx_graph_cache=False):
        out = torch.compile(module, fullgraph=True)(q, k, v)
        out.float().square().sum().backward()
    compiled_grads = (q.grad.clone(), module.gate_proj.weight.grad.clone())
    q.grad, module.gate_proj.weight.grad = None, None
    eager = module(q, k, v)
    eager.float().square().sum().backward()
    assert relative_error(out, eager) < 1e-5
    assert relative_error(compiled_grads[0], q.grad) < 1e-4
    assert relative_error(compiled_grads[1], module.gate_proj.weight.grad) < 1e-4
