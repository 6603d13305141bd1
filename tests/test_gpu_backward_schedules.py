"""dK/dV under every schedule the tuner may pick and every alternative, on the GPU, against
the float64 reference; outputs poisoned with NaN first. (Whether the tuner's choices are bit
for bit the default's is the tuner's own check, on its measurement inputs.)"""

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
    Case(128, "bfloat16", "bshd", "relu", "marginal", 128, 64, 300, 200, 1.0, 0.0),
    Case(128, "float16", "bhsd", "softmax", "marginal", 128, 64, 129, 64, 0.05, 0.0),
    Case(64, "bfloat16", "bhsd", "softmax", "global", 128, 64, 2000, 999, 0.3, 0.2),
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 32760, 32760, 0.05, 0.0,
         batch=1, heads=2),
]


def dkdv_schedules(case: Case) -> list[dict]:
    """The tuner's choices for dK/dV (its search space), then the alternatives."""
    return kernels.every_schedule(ARCH, "backward_dkdv", case.dim, case.block_q, case.block_kv)


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    return [spec for case in CASES for knobs in [{}, *dkdv_schedules(case)]
            for spec in kernels_for(ARCH, case.dim, case.dtype, case.settings,
                                    schedule={"backward_dkdv": knobs})]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_every_dkdv_schedule_matches_reference(case, generator):
    q, k, v, weight, bias = case_inputs(case, generator)
    s = case.settings
    schedules = dkdv_schedules(case)
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    device = case.reference_device
    expected = reference.attention_backward(
        *(bhsd64(t, case.layout, device) for t in (grad, q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    )
    first_of_class: dict[str, tuple] = {}
    for knobs in schedules:
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                  {"backward_dkdv": knobs}, buffers=dict(dq=dq, dk=dk, dv=dv))
        torch.cuda.synchronize()
        for name, got, ref in (("dk", dk, expected[1]), ("dv", dv, expected[2])):
            assert not got.isnan().any(), f"{knobs}: {name} has NaN (unwritten elements)"
            assert relative_error(bhsd64(got, case.layout, "cpu"), ref) < TOLERANCE, (
                knobs, name)
        if knobs.get("warp_specialization") == "manual":
            # The hand-written kernel's ring depth orders the work only.
            first_knobs, first = first_of_class.setdefault("manual", (knobs, (dk, dv)))
            assert torch.equal(dk, first[0]) and torch.equal(dv, first[1]), (
                f"{knobs} and {first_knobs} differ")
