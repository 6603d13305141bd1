"""The backward's query pass under every schedule the tuner may pick, ungated and gated, on
the GPU: every gradient against the float64 reference, outputs poisoned with NaN first,
and each schedule's bits equal to the default's (its knobs order the work only)."""

from __future__ import annotations

import pytest
import torch

from sla_tl import kernels, reference, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.routing import Routing

from .helpers import Case, bhsd64, case_inputs, relative_error
from .test_gpu_kernels import ARCH

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2

CASES = [
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 1000, 1000, 0.1, 0.1),
    Case(64, "float16", "bshd", "elu", "global", 64, 64, 1000, 777, 0.2, 0.0),
    Case(128, "float16", "bshd", "relu", "marginal", 128, 128, 129, 300, 0.05, 0.0),
    Case(64, "bfloat16", "bhsd", "softmax", "marginal", 64, 128, 512, 512, 1.0, 0.0),
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 32760, 32760, 0.05, 0.0,
         batch=1, heads=2),
]


def query_schedules(case: Case) -> list[dict]:
    """The tuner's choices for the query pass (its search space), the default first."""
    return kernels.every_schedule(ARCH, "backward_query", case.dim, case.block_q, case.block_kv)


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    return list(dict.fromkeys(
        spec for case in CASES for knobs in query_schedules(case) for gated in (False, True)
        for spec in kernels_for(ARCH, case.dim, case.dtype, case.settings, gated=gated,
                                schedule={"backward_query": knobs})))


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


def _gate(case: Case, generator: torch.Generator) -> torch.Tensor:
    """Gate values on both sides of 0 and 1, in the layout's row order."""
    gate = torch.rand(case.batch, case.heads, case.lq, generator=generator) * 3 - 1
    if case.layout == "bshd":
        gate = gate.transpose(1, 2).contiguous()
    return gate.cuda()


@pytest.mark.parametrize("gated", [False, True], ids=["ungated", "gated"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_query_pass_schedule_matches_reference_and_default(case, gated, generator):
    q, k, v, weight, bias = case_inputs(case, generator)
    gate = _gate(case, generator) if gated else None
    s = case.settings
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s, gate=gate)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    device = case.reference_device
    expected = reference.attention_backward(
        *(bhsd64(t, case.layout, device) for t in (grad, q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
        gate=None if gate is None else bhsd64(gate, case.layout, device),
    )
    names = ("dq", "dk", "dv", "dweight", "dbias", "dgate")[:6 if gated else 5]
    schedules = query_schedules(case)
    assert len(schedules) > 1, "the query pass has no choices to check"
    first = None
    for knobs in schedules:
        buffers = {name: torch.full_like(t, float("nan")) for name, t in
                   (("dq", q), ("dk", k), ("dv", v))}
        if gated:
            buffers["d_gate_rows"] = torch.full((case.batch, case.heads, case.lq),
                                                float("nan"), device="cuda")
        returned = tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                             {"backward_query": knobs}, gate=gate,
                                             buffers=buffers)
        torch.cuda.synchronize()
        grads = [t.clone() for t in returned[:len(names)]]
        if gated:
            assert not buffers["d_gate_rows"].isnan().any(), f"{knobs}: dgate rows unwritten"
        for name, got, ref in zip(names, grads, expected, strict=False):
            assert not got.isnan().any(), f"{knobs}: {name} has NaN (unwritten elements)"
            if name in ("dq", "dk", "dv", "dgate"):
                got = bhsd64(got, case.layout, "cpu")
            assert relative_error(got, ref) < TOLERANCE, (knobs, name)
        if first is None:
            first = (knobs, grads)
            continue
        for name, got, default in zip(names, grads, first[1], strict=True):
            assert torch.equal(got, default), f"{knobs}: {name} differs from {first[0]}'s"
