"""Forged routing on the GPU: the kernels bound every LUT read (a forged count or entry gives
exactly the output of the clamped routing), and the operators flag the rows at fault on the
device (NaN there, the other rows untouched), also inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import kernels, spec, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.routing import reverse_lut
from sla_tl.settings import Settings

from .helpers import random_projection, random_qkv

pytestmark = pytest.mark.gpu

DIM, BLOCK_Q, BLOCK_KV, LENGTH = 128, 128, 64, 1000  # Mq = 8 query blocks, Nk = 16 key blocks
N_Q, N_KV = spec.num_blocks(LENGTH, BLOCK_Q), spec.num_blocks(LENGTH, BLOCK_KV)
TOPK, K_LOW = 0.25, 0.25  # 4 critical and 4 negligible blocks per row
DTYPE = "bfloat16"
ARCH = "sm_90a"
FAULTY_ROWS = [(0, 1, 2), (1, 0, 5), (1, 2, 7)]
# dQ's default and its hand-written alternatives, which bound the LUT on their own.
DQ_SCHEDULES = [{}] + kernels.alternatives(ARCH, "backward_dq", DIM, BLOCK_Q, BLOCK_KV)


def _settings(linear: str) -> Settings:
    return Settings(block_q=BLOCK_Q, block_kv=BLOCK_KV, linear=linear)


def _kernel(kind: str, schedule: dict | None = None):
    """The compiled kernel of one kind, as the plan of a marginal call launches it."""
    specs = kernels_for(ARCH, DIM, DTYPE, _settings("marginal"), schedule=schedule)
    return kernels.compiled(next(s for s in specs if s.kind == kind))


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [s for linear in ("marginal", "global")
             for s in kernels_for(ARCH, DIM, DTYPE, _settings(linear))]
    specs += [s for knobs in DQ_SCHEDULES[1:]
              for s in kernels_for(ARCH, DIM, DTYPE, _settings("marginal"),
                                   schedule={"backward_dq": knobs})
              if s.kind == "backward_dq"]
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


@pytest.fixture
def problem(generator):
    q, k, v = random_qkv(2, 3, LENGTH, LENGTH, DIM, torch.bfloat16, generator, device="cuda")
    w, b = random_projection(DIM, torch.float32, generator, device="cuda")
    routing = sla_tl.route(q, k, TOPK, K_LOW, BLOCK_Q, BLOCK_KV)
    return q, k, v, w, b, routing


def _forged_counts(count: torch.Tensor, width: int) -> torch.Tensor:
    """Counts above the width (by a little and by a lot) and negative, in a few rows."""
    forged = count.clone()
    forged[0, 1, 2] = width + 3
    forged[1, 0, 5] = 2**30
    forged[1, 2, 7] = -4
    return forged


def _forged_entries(lut: torch.Tensor, limit: int) -> torch.Tensor:
    forged = lut.clone()
    forged[0, 1, 2, 0] = -5
    forged[1, 0, 5, -1] = limit + 10
    forged[1, 2, 7, 1] = 2**31 - 1
    return forged


def _launch_forward(problem, lut, count, saved, active):
    q, k, v, w, b, _ = problem
    out, o_lin = (torch.full_like(q, float("nan")) for _ in range(2))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    kernel = _kernel("forward")
    kernel(q, k, v, lut.contiguous(), count.contiguous(), saved.h_rows, saved.z_rows, active,
           w.to(q.dtype).contiguous(), b.float().contiguous(), out, o_lin, lse)
    return out, o_lin, lse


def test_forward_kernel_bounds_forged_counts_and_entries(problem):
    q, k, v, w, b, routing = problem
    saved = tilelang_backend.forward(q, k, v, routing, w, b, _settings("marginal"))
    active = torch.ones_like(routing.lut_count)
    width = routing.lut.shape[-1]
    forged_lut = _forged_entries(routing.lut, N_KV)
    forged_count = _forged_counts(routing.lut_count, width)
    got = _launch_forward(problem, forged_lut, forged_count, saved, active)
    want = _launch_forward(problem, forged_lut.clamp(0, N_KV - 1),
                           forged_count.clamp(0, width), saved, active)
    torch.cuda.synchronize()
    for name, mine, theirs in zip(("out", "o_lin", "lse"), got, want, strict=True):
        assert not theirs.isnan().any(), name
        assert torch.equal(mine, theirs), f"{name} differs from the clamped routing's"


@pytest.mark.parametrize("knobs", DQ_SCHEDULES,
                         ids=lambda k: ",".join(map(str, k.values())) or "default")
def test_dq_kernel_bounds_forged_counts_and_entries(problem, generator, knobs):
    """A count above the width or negative (read as 0), entries outside the key blocks."""
    q, k, v, w, b, routing = problem
    saved = tilelang_backend.forward(q, k, v, routing, w, b, _settings("marginal"))
    grad = torch.randn(q.shape, generator=generator).to(q)
    delta = torch.randn(q.shape[:3], generator=generator).cuda()
    width = routing.lut.shape[-1]
    kernel = _kernel("backward_dq", {"backward_dq": knobs})

    def dq_for(lut, count):
        dq = torch.zeros_like(q)
        kernel(q, k, v, grad, saved.lse, delta, lut.contiguous(), count.contiguous(), dq)
        return dq

    forged_lut = _forged_entries(routing.lut, N_KV)
    forged_count = _forged_counts(routing.lut_count, width)
    got = dq_for(forged_lut, forged_count)
    want = dq_for(forged_lut.clamp(0, N_KV - 1), forged_count.clamp(0, width))
    torch.cuda.synchronize()
    assert not want.isnan().any()
    assert torch.equal(got, want)


def test_dkdv_kernel_bounds_a_forged_reverse_lut(problem, generator):
    q, k, v, w, b, routing = problem
    saved = tilelang_backend.forward(q, k, v, routing, w, b, _settings("marginal"))
    grad = torch.randn(q.shape, generator=generator).to(q)
    delta = torch.randn(q.shape[:3], generator=generator).cuda()
    reverse, reverse_count = reverse_lut(routing.lut, routing.lut_count, N_KV)
    dh = (torch.randn(2, 3, N_KV, DIM, DIM, generator=generator) / DIM).to(q)
    dz = (torch.randn(2, 3, N_KV, DIM, generator=generator) / DIM).cuda()
    kernel = _kernel("backward_dkdv")

    def dkdv_for(rlut, rcount):
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        kernel(q, k, v, grad, saved.lse, delta, rlut.contiguous(), rcount.contiguous(), dh, dz,
               dk, dv)
        return dk, dv

    width = reverse.shape[-1]
    forged_rlut = _forged_entries(reverse, N_Q)
    forged_rcount = _forged_counts(reverse_count, width)
    got = dkdv_for(forged_rlut, forged_rcount)
    want = dkdv_for(forged_rlut.clamp(0, N_Q - 1), forged_rcount.clamp(0, width))
    torch.cuda.synchronize()
    for name, mine, theirs in zip(("dk", "dv"), got, want, strict=True):
        assert not theirs.isnan().any(), name
        assert torch.equal(mine, theirs), f"{name} differs from the clamped reverse LUT's"


def _forge_rows(routing: sla_tl.Routing) -> sla_tl.Routing:
    """Row (0, 1, 2): count above the width; (1, 0, 5): a block twice in lut; (1, 2, 7): a
    block in lut and neg_lut (a fault in "marginal" mode only)."""
    lut, count, neg = routing.lut.clone(), routing.lut_count.clone(), routing.neg_lut.clone()
    count[0, 1, 2] = lut.shape[-1] + 1
    lut[1, 0, 5, 1] = lut[1, 0, 5, 0]
    neg[1, 2, 7, 0] = lut[1, 2, 7, 0]
    return routing._replace(lut=lut, lut_count=count, neg_lut=neg)


def _query_rows(row: tuple[int, int, int]) -> tuple:
    b, h, i = row
    return b, h, slice(i * BLOCK_Q, min(LENGTH, (i + 1) * BLOCK_Q))


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_rows_of_a_forged_routing_come_out_nan_and_the_others_are_untouched(problem, linear):
    q, k, v, w, b, routing = problem
    settings = dict(block_q=BLOCK_Q, block_kv=BLOCK_KV, linear=linear)
    valid = sla_tl.attention_with_routing(q, k, v, routing, w, b, **settings)
    forged = sla_tl.attention_with_routing(q, k, v, _forge_rows(routing), w, b, **settings)
    torch.cuda.synchronize()
    faulty = FAULTY_ROWS if linear == "marginal" else FAULTY_ROWS[:2]
    mask = torch.zeros(q.shape[:3], dtype=torch.bool, device="cuda")
    for row in faulty:
        mask[_query_rows(row)] = True
        assert forged[_query_rows(row)].isnan().all(), row
    assert not valid.isnan().any()
    assert torch.equal(forged[~mask], valid[~mask])
    with pytest.raises(ValueError, match=r"lut_count must lie in \[0, 4\]"):
        sla_tl.check_routing(q, k, _forge_rows(routing), block_q=BLOCK_Q, block_kv=BLOCK_KV,
                             linear=linear)


def test_forged_routing_is_flagged_inside_a_cuda_graph(problem):
    q, k, v, w, b, routing = problem
    forged = _forge_rows(routing)

    def step():
        return torch.ops.sla.attention_lut(q, k, v, *forged, w, b, BLOCK_Q, BLOCK_KV)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for row in FAULTY_ROWS:
        assert captured[_query_rows(row)].isnan().all(), row
    assert torch.equal(captured.isnan(), eager.isnan())
    finite = ~eager.isnan()
    assert torch.equal(captured[finite], eager[finite])


def test_backward_of_a_forged_routing_stays_in_bounds(problem, generator):
    q, k, v, w, b, routing = problem
    forged = _forge_rows(routing)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sla_tl.attention_with_routing(*leaves, forged, w, b, block_q=BLOCK_Q,
                                        block_kv=BLOCK_KV)
    out.backward(torch.randn(out.shape, generator=generator).to(out))
    torch.cuda.synchronize()  # an out-of-bounds access would surface here
    dq = leaves[0].grad
    for row in FAULTY_ROWS:
        assert dq[_query_rows(row)].isnan().all(), row
