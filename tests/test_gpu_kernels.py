"""The TileLang kernels on the GPU against the float64 reference, with the same routing.

Outputs are poisoned with NaN before each kernel runs, so an unwritten element fails.
"""

from __future__ import annotations

import pytest
import torch

from sla_tl import kernels, reference, spec, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import CallShape, attention_plan, kernels_for, route_phase
from sla_tl.routing import Routing
from sla_tl.schedules.sm90 import forward_ws
from sla_tl.settings import ForwardOutputs, Settings
from sla_tl.targets import target_of

from .helpers import Case, bhsd64, case_inputs, random_qkv, relative_error

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2
ARCH = "sm_90a"


CASES = [
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 1000, 1000, 0.1, 0.1),
    Case(64, "float16", "bshd", "elu", "global", 64, 64, 1000, 777, 0.2, 0.0),
    Case(128, "float16", "bhsd", "relu", "marginal", 64, 128, 1024, 1024, 0.25, 0.0),
    Case(64, "bfloat16", "bhsd", "softmax", "marginal", 128, 128, 512, 2000, 0.0, 0.3),
    Case(128, "bfloat16", "bshd", "softmax", "marginal", 128, 64, 300, 200, 1.0, 0.0),
    Case(64, "bfloat16", "bshd", "elu", "marginal", 64, 128, 200, 100, 0.5, 0.5),
    Case(128, "bfloat16", "bhsd", "softmax", "marginal", 128, 64, 32760, 32760, 0.05, 0.0,
         batch=1, heads=2),
]


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [s for c in CASES for s in kernels_for(ARCH, c.dim, c.dtype, c.settings)]
    specs += [s for d, bkv, dt, f, lay, _ in KEY_CASES for linear in ("marginal", "global")
              for s in kernels_for(ARCH, d, dt, _key_settings(bkv, f, linear, lay),
                                   backward=False)]
    specs += [s for d, bkv, dt, f, lay, _ in KEY_CASES
              for knobs in kernels.alternatives(ARCH, "key_pass", d, 128, bkv)
              for linear in ("marginal", "global")
              for s in kernels_for(ARCH, d, dt, _key_settings(bkv, f, linear, lay),
                                   backward=False, schedule={"key_pass": knobs})
              if s.kind == "key_pass"]
    specs += [s for d, bkv, dt, f, lay, _ in KEY_CASES for knobs in _key_pass_schedules(d, bkv)
              for s in kernels_for(ARCH, d, dt, _key_settings(bkv, f, "marginal", lay),
                                   backward=False, schedule={"key_pass": knobs})
              if s.kind == "key_pass"]
    specs += [s for c in SCHEDULE_CASES for s in _forward_schedule_specs(c)]
    specs += [s for c in DQ_SCHEDULE_CASES for s in _dq_schedule_specs(c)]
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, generator):
    q, k, v, weight, bias = case_inputs(case, generator)
    s = case.settings
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    poisoned = ForwardOutputs(*(t.fill_(float("nan")) for t in tilelang_backend.forward(
        q, k, v, routing, weight, bias, s)))
    written = tilelang_backend.forward(q, k, v, routing, weight, bias, s,
                                       buffers=poisoned._asdict())
    assert all(a is b for a, b in zip(written, poisoned, strict=True))
    out, lse, o_lin, h_rows, z_rows = poisoned
    torch.cuda.synchronize()

    # Long sequences run the reference on the GPU (still float64), short ones on the CPU.
    device = case.reference_device
    expected = reference.attention_with_routing(
        *(bhsd64(t, case.layout, device) for t in (q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    )
    out, o_lin = (bhsd64(t, case.layout, "cpu") for t in (out, o_lin))
    for name, got in zip(ForwardOutputs._fields, (out, lse, o_lin, h_rows, z_rows), strict=True):
        assert not got.isnan().any(), f"{name} has NaN (unwritten or invalid elements)"
    assert relative_error(out, expected.out) < TOLERANCE
    if expected.linear.abs().sum() > 0:
        assert relative_error(o_lin, expected.linear) < TOLERANCE
    else:
        assert (o_lin == 0).all(), "rows without a marginal block must give O_l = 0"
    assert relative_error(lse, expected.lse) < 1e-4
    expected_h, expected_z = reference.linear_states(
        *(bhsd64(t, case.layout, device) for t in (k, v)),
        Routing(*(t.to(device) for t in routing)), case.block_kv, case.feature, case.linear)
    # H_i, Z_i matter only where a query block has marginal blocks (else O_l = 0).
    n_kv = spec.num_blocks(case.lk, case.block_kv)
    active = (routing.lut_count + routing.neg_count < n_kv).cpu()
    if case.linear == "global":
        active = torch.ones_like(active[..., :1])
    if active.any():
        assert relative_error(h_rows.cpu()[active], expected_h.cpu()[active]) < TOLERANCE
        assert relative_error(z_rows.cpu()[active], expected_z.cpu()[active]) < 1e-3


@pytest.mark.parametrize("case", CASES[:4], ids=str)
def test_route_selects_top_and_bottom_blocks(case, generator):
    q, k, _, _, _ = case_inputs(case, generator)
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    qb, kb = (bhsd64(t, case.layout, "cpu").float() for t in (q, k))
    scores = reference.block_scores(qb, kb, case.block_q, case.block_kv)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(case.topk, n_kv)
    n_neg = spec.num_negligible(case.k_low, n_kv, n_crit)
    lut, neg = routing.lut.long().cpu(), routing.neg_lut.long().cpu()
    assert lut.shape[-1] == n_crit and neg.shape[-1] == n_neg
    assert (routing.lut_count == n_crit).all() and (routing.neg_count == n_neg).all()
    assert (lut.diff(dim=-1) > 0).all() and (neg.diff(dim=-1) > 0).all()
    slack = 1e-3 * scores.abs().amax()
    picked = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, lut, True)
    lowest_picked = torch.where(picked, scores, float("inf")).amin(-1)
    assert (lowest_picked >= torch.where(picked, float("-inf"), scores).amax(-1) - slack).all()
    if n_neg:
        dropped = torch.zeros_like(picked).scatter(-1, neg, True)
        assert not (picked & dropped).any()
        rest = ~(picked | dropped)
        highest_dropped = torch.where(dropped, scores, float("-inf")).amax(-1)
        assert (highest_dropped <= torch.where(rest, scores, float("inf")).amin(-1) + slack).all()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_reference(case, generator):
    q, k, v, weight, bias = case_inputs(case, generator)
    s = case.settings
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    returned = tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                         buffers=dict(dq=dq, dk=dk, dv=dv))
    assert returned[0] is dq and returned[1] is dk and returned[2] is dv
    d_weight, d_bias, d_gate = returned[3:]
    assert d_gate is None
    torch.cuda.synchronize()

    device = case.reference_device
    expected = reference.attention_backward(
        *(bhsd64(t, case.layout, device) for t in (grad, q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    )
    got = [*(bhsd64(t, case.layout, "cpu") for t in (dq, dk, dv)), d_weight, d_bias]
    assert expected[5] is None  # no gate, no gate gradient
    for name, mine, ref in zip(("dq", "dk", "dv", "dweight", "dbias"), got, expected[:5],
                               strict=True):
        assert not mine.isnan().any(), f"{name} has NaN (unwritten or invalid elements)"
        assert relative_error(mine, ref) < TOLERANCE, name


def _key_settings(block_kv: int, feature: str, linear: str, layout: str) -> Settings:
    return Settings(block_q=128, block_kv=block_kv, feature_map=feature, linear=linear,
                    layout=layout)


def _step_outputs(k: torch.Tensor, v: torch.Tensor, s: Settings, step: str,
                  schedule: dict | None = None) -> dict:
    """The tensors one step of the forward's plan leaves, run alone on k and v."""
    b, h, lk, d = k.shape if s.layout == "bhsd" else k.transpose(1, 2).shape
    shape = CallShape(b, h, 1, lk, d, k.dtype, s, False, (1, 0))
    phase = attention_plan(target_of(k.device), shape, schedule or {}).forward
    return phase.run(dict(k=k, v=v), k.device, keep=True, only=[step])


KEY_CASES = [  # dim, block_kv, dtype, feature, layout, lk: several pipelined blocks per CTA
    (64, 128, "bfloat16", "softmax", "bhsd", 2000),
    (64, 64, "bfloat16", "softmax", "bhsd", 2000),
    (128, 128, "float16", "elu", "bshd", 3000),
    (128, 64, "bfloat16", "softmax", "bhsd", 2000),
    (128, 64, "bfloat16", "relu", "bhsd", 64),
]


@pytest.mark.parametrize("dim,block_kv,dtype,feature,layout,lk", KEY_CASES)
def test_key_pass_matches_reference(generator, dim, block_kv, dtype, feature, layout, lk):
    """The default schedule and each alternative (the column sums on the tensor cores)."""
    _, k, v = random_qkv(2, 3, 1, lk, dim, getattr(torch, dtype), generator, device="cuda")
    if layout == "bshd":
        k, v = (t.transpose(1, 2).contiguous() for t in (k, v))
    kb, vb = (bhsd64(t, layout, "cpu") for t in (k, v))
    n_kv = spec.num_blocks(lk, block_kv)
    phi_k = reference.feature_map(kb, feature)
    for knobs in [{}, *kernels.alternatives(ARCH, "key_pass", dim, 128, block_kv)]:
        schedule = {"key_pass": knobs}
        # "marginal" stores h per block, "global" per group of blocks; both store z per block.
        found = _step_outputs(k, v, _key_settings(block_kv, feature, "marginal", layout),
                              "key_pass", schedule)
        h_block, z_block = found["h_block"], found["z_block"]
        for j in range(n_kv):
            rows = slice(j * block_kv, min(lk, (j + 1) * block_kv))
            h_j = phi_k[:, :, rows].transpose(-1, -2) @ vb[:, :, rows]
            assert relative_error(h_block[:, :, j], h_j) < TOLERANCE, (knobs, f"h of block {j}")
            # z_j sums phi rounded to the input dtype (the GEMM's operand): ~1e-4 relative.
            assert relative_error(z_block[:, :, j], phi_k[:, :, rows].sum(dim=2)) < 1e-3, (
                knobs, f"z of block {j}")
        found = _step_outputs(k, v, _key_settings(block_kv, feature, "global", layout),
                              "key_pass", schedule)
        z_block, h_group = found["z_block"], found["h_group"]
        assert relative_error(h_group.sum(dim=2), phi_k.transpose(-1, -2) @ vb) < TOLERANCE, knobs
        assert relative_error(z_block.sum(dim=2), phi_k.sum(dim=2)) < 1e-3, knobs


def _key_pass_schedules(dim: int, block_kv: int) -> list[dict]:
    """Every key-pass schedule the autotuner may pick in "marginal" mode but the default."""
    return kernels.searched_schedules(ARCH, "key_pass", dim, 128, block_kv, "marginal")[1:]


@pytest.mark.parametrize("dim,block_kv,dtype,feature,layout,lk", KEY_CASES)
def test_every_key_pass_schedule_the_tuner_may_pick_gives_the_default_bits(
        generator, dim, block_kv, dtype, feature, layout, lk):
    _, k, v = random_qkv(2, 3, 1, lk, dim, getattr(torch, dtype), generator, device="cuda")
    if layout == "bshd":
        k, v = (t.transpose(1, 2).contiguous() for t in (k, v))
    s = _key_settings(block_kv, feature, "marginal", layout)
    default = _step_outputs(k, v, s, "key_pass")
    schedules = _key_pass_schedules(dim, block_kv)
    assert schedules, "the key pass searches no knob"
    for knobs in schedules:
        found = _step_outputs(k, v, s, "key_pass", {"key_pass": knobs})
        for name in ("h_block", "z_block"):
            assert torch.equal(found[name], default[name]), (name, knobs)


@pytest.mark.parametrize("block,layout,length", [(64, "bhsd", 1000), (128, "bshd", 300)])
def test_pool_kernel_matches_reference(generator, block, layout, length):
    x, _, _ = random_qkv(2, 3, length, 1, 128, torch.bfloat16, generator, device="cuda")
    if layout == "bshd":
        x = x.transpose(1, 2).contiguous()
    b, h, length, d = x.shape if layout == "bhsd" else x.transpose(1, 2).shape
    s = Settings(block_q=block, block_kv=block, layout=layout)
    phase = route_phase(target_of(x.device), CallShape(b, h, length, length, d, x.dtype, s,
                                                       False, (1, 0)))
    pooled = phase.run(dict(q=x, k=x), x.device, keep=True, only=["pool_q"])["pooled_q"]
    expected = reference.mean_pool(bhsd64(x, layout, "cpu"), block)
    assert relative_error(pooled, expected) < 1e-5


def forward_schedules(case: Case) -> list[dict]:
    """Every forward schedule the autotuner may pick for a case (its search space), then the
    alternatives that round differently (candidates for the default)."""
    return kernels.every_schedule(ARCH, "forward", case.dim, case.block_q, case.block_kv)


def _forward_schedule_specs(case: Case) -> list:
    """The forward kernels of every schedule of `forward_schedules`."""
    return [spec for knobs in forward_schedules(case)
            for spec in kernels_for(ARCH, case.dim, case.dtype, case.settings, backward=False,
                                    schedule={"forward": knobs})
            if spec.kind == "forward"]


def _rounding_class(knobs: dict) -> tuple:
    """Schedules of one class must agree bit for bit: they order the work differently but
    do the same arithmetic."""
    return knobs["warp_specialization"] == "auto", knobs.get("entries_per_step", 1)


SCHEDULE_CASES = [c for c in CASES if c.block_q == forward_ws.BLOCK_Q] + [
    # one critical block; all blocks critical; Lq != Lk with a partial key block
    Case(128, "float16", "bhsd", "softmax", "global", 128, 64, 700, 64, 0.05, 0.0),
    Case(128, "bfloat16", "bshd", "relu", "marginal", 128, 64, 129, 1000, 1.0, 0.0),
    Case(64, "float16", "bhsd", "elu", "marginal", 128, 64, 1000, 333, 0.3, 0.2),
]


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=str)
def test_every_forward_schedule_matches_reference(case, generator):
    """Each schedule the tuner may pick, and each alternative, against float64; schedules
    that differ only in how the work is ordered must also agree bit for bit."""
    q, k, v, weight, bias = case_inputs(case, generator)
    s = case.settings
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    schedules = forward_schedules(case)
    device = case.reference_device
    expected = reference.attention_with_routing(
        *(bhsd64(t, case.layout, device) for t in (q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    )
    first_of_class: dict[tuple, tuple] = {}
    for knobs in schedules:
        outputs = ForwardOutputs(*(t.fill_(float("nan")) for t in tilelang_backend.forward(
            q, k, v, routing, weight, bias, s)))
        tilelang_backend.forward(q, k, v, routing, weight, bias, s, {"forward": knobs},
                                 buffers=outputs._asdict())
        torch.cuda.synchronize()
        for name in ("out", "lse", "linear"):
            assert not getattr(outputs, name).isnan().any(), f"{knobs}: {name} has NaN"
        out = bhsd64(outputs.out, case.layout, "cpu")
        assert relative_error(out, expected.out) < TOLERANCE, knobs
        assert relative_error(outputs.lse, expected.lse) < 1e-4, knobs
        first_knobs, first = first_of_class.setdefault(_rounding_class(knobs), (knobs, outputs))
        for name in ("out", "lse", "linear"):
            assert torch.equal(getattr(outputs, name), getattr(first, name)), (
                f"{knobs} and {first_knobs} differ in {name}")


def dq_schedules(case: Case) -> list[dict]:
    """Every dQ schedule the autotuner may pick for a case (its search space), then the
    alternatives (the hand-written kernel, candidates for the default)."""
    return kernels.every_schedule(ARCH, "backward_dq", case.dim, case.block_q, case.block_kv)


def _dq_schedule_specs(case: Case) -> list:
    """The dQ kernels of every schedule of `dq_schedules`."""
    return [spec for knobs in dq_schedules(case)
            for spec in kernels_for(ARCH, case.dim, case.dtype, case.settings,
                                    schedule={"backward_dq": knobs})
            if spec.kind == "backward_dq"]


DQ_SCHEDULE_CASES = SCHEDULE_CASES + [
    # 128-key blocks at D=128 (TileLang's split only), fp16, odd lengths
    Case(128, "float16", "bshd", "softmax", "marginal", 128, 128, 777, 1500, 0.2, 0.1),
]


@pytest.mark.parametrize("case", DQ_SCHEDULE_CASES, ids=str)
def test_every_dq_schedule_matches_reference(case, generator):
    """Each dQ schedule the tuner may pick, and each alternative, against float64 (dq of the
    whole backward, every gradient poisoned first); schedules of one rounding class (the
    automatic split; the hand-written kernel with or without pingpong, at any depth) must
    also agree bit for bit."""
    q, k, v, weight, bias = case_inputs(case, generator)
    s = case.settings
    routing = tilelang_backend.route(q, k, case.topk, case.k_low, case.block_q, case.block_kv,
                                     case.layout)
    saved = tilelang_backend.forward(q, k, v, routing, weight, bias, s)
    grad = torch.randn(q.shape, generator=generator, dtype=torch.float64).to(q)
    schedules = dq_schedules(case)
    device = case.reference_device
    expected = reference.attention_backward(
        *(bhsd64(t, case.layout, device) for t in (grad, q, k, v)),
        Routing(*(t.to(device) for t in routing)), weight.double().to(device),
        bias.double().to(device), case.block_q, case.block_kv, case.feature, case.linear,
    )
    default = kernels.default_knobs(ARCH, "backward_dq", case.dim, case.block_q, case.block_kv)
    first_of_class: dict[bool, tuple] = {}
    for knobs in schedules:
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        tilelang_backend.backward(grad, q, k, v, saved, routing, weight, bias, s,
                                  {"backward_dq": knobs}, buffers=dict(dq=dq, dk=dk, dv=dv))
        torch.cuda.synchronize()
        assert not dq.isnan().any(), f"{knobs}: dq has NaN (unwritten or invalid elements)"
        assert relative_error(bhsd64(dq, case.layout, "cpu"), expected[0]) < TOLERANCE, knobs
        rounding = {**default, **knobs}["warp_specialization"] == "auto"
        first_knobs, first = first_of_class.setdefault(rounding, (knobs, dq))
        assert torch.equal(dq, first), f"{knobs} and {first_knobs} differ in dq"
