"""The persistent forward (`warp_specialization="persistent"`: one CTA per SM taking query
blocks in turn) where it can go wrong: many query blocks per CTA whose rows differ (counts
from 0 to the LUT's width, so the ring of key blocks runs on across blocks of unequal
length), gated and not, against the per-block schedule bit for bit and against float64.

Outputs are poisoned with NaN before each kernel runs, so an unwritten element fails.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from sla_tl import reference, spec, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.routing import Routing
from sla_tl.schedules.sm90 import forward_ws
from sla_tl.settings import ForwardOutputs, Settings

from .helpers import bhsd64, random_projection, random_qkv, relative_error

pytestmark = pytest.mark.gpu

ARCH = "sm_90a"
TOLERANCE = 1e-2


class Case(NamedTuple):
    dim: int
    dtype: str
    layout: str
    feature: str
    linear: str
    block_kv: int
    lq: int
    lk: int
    batch: int
    heads: int
    gated: bool
    n_crit: int
    n_neg: int

    @property
    def settings(self) -> Settings:
        return Settings(block_q=forward_ws.BLOCK_Q, block_kv=self.block_kv,
                        feature_map=self.feature, linear=self.linear, layout=self.layout)

    def __str__(self) -> str:
        return "-".join(str(x) for x in self)


# Each has more query blocks than the persistent grid has CTAs (129 x 6, 64 x 5, 157 x 4,
# 71 x 4 against 132), odd lengths, Lq != Lk, both head dims, dtypes, layouts, linear modes.
CASES = [
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 64, 16461, 9001, 2, 3, False, 9, 3),
    Case(128, "float16", "bshd", "elu", "global", 64, 8192, 8192, 1, 5, True, 12, 0),
    Case(64, "bfloat16", "bhsd", "relu", "marginal", 128, 20000, 3000, 1, 4, True, 7, 2),
    Case(64, "float16", "bshd", "softmax", "marginal", 64, 9000, 12345, 2, 2, False, 16, 0),
]


def _schedules(case: Case) -> list[dict]:
    """Per block and persistent at every pipeline depth the hand-written schedule takes."""
    stages = [n for n in (2, 3) if forward_ws.fits(case.dim, forward_ws.BLOCK_Q,
                                                   case.block_kv, n)]
    return [dict(warp_specialization=variant, num_stages=n)
            for n in stages for variant in ("manual", "persistent")]


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (see `tests.compile_ahead`)."""
    return [s for c in CASES for knobs in _schedules(c)
            for s in kernels_for(ARCH, c.dim, c.dtype, c.settings, gated=c.gated,
                                 backward=False, schedule={"forward": knobs})
            if s.kind.endswith("forward")]


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    compile_ahead(kernels_ahead())


def _uneven_routing(case: Case, generator: torch.Generator) -> Routing:
    """Distinct random critical and negligible blocks per row, each row with its own counts
    (0 to the width; a row with no critical block among them)."""
    b, h = case.batch, case.heads
    n_q = spec.num_blocks(case.lq, forward_ws.BLOCK_Q)
    n_kv = spec.num_blocks(case.lk, case.block_kv)
    order = torch.rand(b, h, n_q, n_kv, generator=generator).argsort(-1).to(torch.int32)
    lut = order[..., :case.n_crit].contiguous()
    neg_lut = order[..., case.n_crit:case.n_crit + case.n_neg].contiguous()
    count = torch.randint(0, case.n_crit + 1, (b, h, n_q), generator=generator,
                          dtype=torch.int32)
    count.view(-1)[0] = 0
    count.view(-1)[-1] = case.n_crit
    neg_count = torch.randint(0, case.n_neg + 1, (b, h, n_q), generator=generator,
                              dtype=torch.int32)
    return Routing(lut, count, neg_lut, neg_count).contiguous()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_persistent_forward_matches_per_block_and_reference(case, generator):
    dtype = getattr(torch, case.dtype)
    q, k, v = random_qkv(case.batch, case.heads, case.lq, case.lk, case.dim, dtype, generator,
                         device="cuda")
    gate = None
    if case.gated:
        gate = (torch.rand(case.batch, case.heads, case.lq, generator=generator) * 3 - 1)
    if case.layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        gate = None if gate is None else gate.transpose(1, 2).contiguous()
    gate = None if gate is None else gate.cuda()
    weight, bias = random_projection(case.dim, torch.float32, generator, device="cuda")
    routing = Routing(*(t.cuda() for t in _uneven_routing(case, generator)))
    s = case.settings

    results = {}
    for knobs in _schedules(case):
        outputs = ForwardOutputs(*(t.fill_(float("nan")) for t in tilelang_backend.forward(
            q, k, v, routing, weight, bias, s, gate=gate)))
        tilelang_backend.forward(q, k, v, routing, weight, bias, s, {"forward": knobs},
                                 gate=gate, buffers=outputs._asdict())
        torch.cuda.synchronize()
        for name in ("out", "lse", "linear"):
            assert not getattr(outputs, name).isnan().any(), f"{knobs}: {name} has NaN"
        results[tuple(sorted(knobs.items()))] = outputs

    first_knobs, first = next(iter(results.items()))
    for knobs, outputs in results.items():
        for name in ("out", "lse", "linear"):
            assert torch.equal(getattr(outputs, name), getattr(first, name)), (
                f"{knobs} and {first_knobs} differ in {name}")

    expected = reference.attention_with_routing(
        *(bhsd64(t, case.layout, "cuda") for t in (q, k, v)), routing,
        weight.double(), bias.double(), forward_ws.BLOCK_Q, case.block_kv, case.feature,
        case.linear, gate=None if gate is None else bhsd64(gate, case.layout, "cuda"))
    out = bhsd64(first.out, case.layout, "cuda")
    assert relative_error(out, expected.out) < TOLERANCE
    assert relative_error(first.lse[first.lse.isfinite()],
                          expected.lse[expected.lse.isfinite()]) < 1e-4
    assert torch.equal(first.lse.isinf(), expected.lse.isinf())  # the empty rows
