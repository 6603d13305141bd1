"""SALAD's gate in the CUDA kernels against the float64 reference, with the same routing.

The gated forward scales the projection term per row, O = O_s + g (O_l W^T + b); the gated
query pass gives the linear branch g dO and writes dg = rowsum(dO * (O_l W^T + b)).
Outputs are poisoned with NaN before each kernel runs, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.routing import Routing
from sla_tl.settings import ForwardOutputs

from .helpers import Case, bhsd64, case_inputs, random_projection, random_qkv, relative_error

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2


CASES = [
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 1000, 1000, 0.1, 0.1),
    Case(64, "float16", "bshd", "elu", "global", 64, 64, 1000, 777, 0.2, 0.0),
    Case(128, "bfloat16", "bshd", "softmax", "marginal", 128, 128, 300, 200, 1.0, 0.0),
    Case(64, "bfloat16", "bhsd", "relu", "marginal", 64, 128, 1024, 1024, 0.25, 0.0),
    Case(128, "bfloat16", "bhsd", "softmax", "global", 128, 64, 16384, 16384, 0.05, 0.0,
         batch=1, heads=2),
]


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [s for c in CASES for gated in (False, True)
             for s in kernels_for("sm_90a", c.dim, c.dtype, c.settings, gated=gated)]
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


def _inputs(case: Case, generator: torch.Generator):
    q, k, v, weight, bias = case_inputs(case, generator)
    # Gate values on both sides of 0 and 1: the kernels must not assume a sigmoid's range.
    gate = torch.rand(case.batch, case.heads, case.lq, generator=generator) * 3 - 1
    if case.layout == "bshd":
        gate = gate.transpose(1, 2).contiguous()
    return q, k, v, weight, bias, gate.cuda()


def _route(case: Case, q: torch.Tensor, k: torch.Tensor) -> Routing:
    return tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                  case.layout)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gated_forward_matches_reference(case, generator):
    q, k, v, weight, bias, gate = _inputs(case, generator)
    s = case.settings
    routing = _route(case, q, k)
    poisoned = ForwardOutputs(*(t.fill_(float("nan")) for t in tilelang_backend.forward(
        q, k, v, routing, weight, bias, s, gate=gate)))
    tilelang_backend.forward(q, k, v, routing, weight, bias, s, gate=gate,
                             buffers=poisoned._asdict())
    torch.cuda.synchronize()
    device = case.reference_device
    expected = reference.attention_with_routing(
        *(bhsd64(t, case.layout, device) for t in (q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
        gate=bhsd64(gate, case.layout, device),
    )
    for name, got in zip(ForwardOutputs._fields, poisoned, strict=True):
        assert not got.isnan().any(), f"{name} has NaN (unwritten or invalid elements)"
    out, o_lin = (bhsd64(t, case.layout, "cpu") for t in (poisoned.out, poisoned.linear))
    assert relative_error(out, expected.out) < TOLERANCE
    assert relative_error(poisoned.lse, expected.lse) < 1e-4
    if expected.linear.abs().sum() > 0:
        assert relative_error(o_lin, expected.linear) < TOLERANCE
    # The gate changes the output: a kernel ignoring it would fail here.
    ungated = reference.attention_with_routing(
        *(bhsd64(t, case.layout, device) for t in (q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    ).out
    assert relative_error(ungated, expected.out) > 5 * TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gated_backward_matches_reference(case, generator):
    q, k, v, weight, bias, gate = _inputs(case, generator)
    s = case.settings
    routing = _route(case, q, k)
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s, gate=gate)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    gate_grad = torch.full((case.batch, case.heads, case.lq), float("nan"), device="cuda")
    returned = tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                         gate=gate, buffers=dict(dq=dq, dk=dk, dv=dv,
                                                                 d_gate_rows=gate_grad))
    assert returned[0] is dq and returned[1] is dk and returned[2] is dv
    d_weight, d_bias, d_gate = returned[3:]
    torch.cuda.synchronize()
    assert d_gate.shape == gate.shape and d_gate.dtype == gate.dtype
    assert not gate_grad.isnan().any(), "dgate has NaN (unwritten or invalid elements)"
    device = case.reference_device
    expected = reference.attention_backward(
        *(bhsd64(t, case.layout, device) for t in (grad, q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
        gate=bhsd64(gate, case.layout, device),
    )
    got = [*(bhsd64(t, case.layout, "cpu") for t in (dq, dk, dv)), d_weight, d_bias,
           bhsd64(d_gate, case.layout, "cpu")]
    names = ("dq", "dk", "dv", "dweight", "dbias", "dgate")
    for name, mine, ref in zip(names, got, expected, strict=True):
        assert not mine.isnan().any(), f"{name} has NaN (unwritten or invalid elements)"
        assert relative_error(mine, ref) < TOLERANCE, name


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_a_gate_of_ones_matches_the_ungated_kernels(case, generator):
    q, k, v, weight, bias, gate = _inputs(case, generator)
    ones = torch.ones_like(gate)
    s = case.settings
    routing = _route(case, q, k)
    plain = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
    gated = tilelang_backend.forward(q, k, v, routing, weight, bias, s, gate=ones)
    assert relative_error(gated.out, plain.out) < 2e-3
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    plain_grads = tilelang_backend.backward(grad, q, k, v, plain, routing, weight, bias, s)
    gated_grads = tilelang_backend.backward(grad, q, k, v, gated, routing, weight, bias, s,
                                            gate=ones)
    assert plain_grads[5] is None
    for name, a, b in zip(("dq", "dk", "dv", "dweight", "dbias"), plain_grads[:5],
                          gated_grads[:5], strict=True):
        assert relative_error(b, a) < 5e-3, name


def test_gated_op_autograd_matches_the_reference(generator):
    q, k, v = random_qkv(2, 3, 1000, 1000, 128, torch.bfloat16, generator, device="cuda")
    w, b = random_projection(128, torch.float32, generator, device="cuda")
    gate = (torch.rand(2, 3, 1000, generator=generator) * 2).cuda()
    routing = sla_tl.route(q, k, 0.1, 0.1, 128, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b, gate)]
    out = sla_tl.attention_with_routing(*leaves[:3], routing, *leaves[3:5], block_q=128,
                                        block_kv=64, gate=leaves[5])
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
    out.backward(grad)
    cpu = [t.detach().double().cpu() for t in (q, k, v, w, b, gate, grad)]
    cpu_routing = Routing(*(t.cpu() for t in routing))
    args = (128, 64, "softmax", "marginal")
    expected = reference.attention_with_routing(*cpu[:3], cpu_routing, *cpu[3:5], *args,
                                                gate=cpu[5]).out
    expected_grads = reference.attention_backward(cpu[6], *cpu[:3], cpu_routing, *cpu[3:5],
                                                  *args, gate=cpu[5])
    assert relative_error(out, expected) < TOLERANCE
    for name, leaf, ref in zip("q k v weight bias gate".split(), leaves, expected_grads,
                               strict=True):
        assert leaf.grad.dtype == leaf.dtype, name
        assert torch.isfinite(leaf.grad).all(), name
        assert relative_error(leaf.grad, ref) < TOLERANCE, name


def test_gated_module_trains_on_cuda_as_on_the_cpu(generator):
    q, k, v = random_qkv(1, 2, 2000, 2000, 64, torch.float32, generator)
    module = sla_tl.SparseLinearAttention(64, 0.1, BLKQ=128, BLKK=64, gate=True)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.1)
    grads = []
    for device in ("cpu", "cuda"):
        copy = sla_tl.SparseLinearAttention(64, 0.1, BLKQ=128, BLKK=64, gate=True).to(device)
        copy.load_state_dict(module.state_dict())
        copy(*(t.to(device) for t in (q, k, v))).float().square().sum().backward()
        grads.append({n: p.grad.detach().cpu() for n, p in copy.named_parameters()})
    for name, cpu_grad in grads[0].items():
        assert cpu_grad.abs().sum() > 0, name
        assert relative_error(grads[1][name], cpu_grad) < 2e-2, name
