"""Routing's selection kernel on the GPU against torch's top-k on the same block scores, and
the routed forward's fusions (kernel variants taking over torch steps) against the plan
without them."""

from __future__ import annotations

import pytest
import torch

from sla_tl import kernels, reference, spec, tilelang_backend
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import (
    FUSIONS,
    CallShape,
    fusions_serving,
    kernels_for,
    route_phase,
    routed_plan,
)
from sla_tl.routing import Routing
from sla_tl.settings import Settings
from sla_tl.targets import arch_named, target_of

from .helpers import random_projection, random_qkv, relative_error

pytestmark = pytest.mark.gpu

ARCH = "sm_90a"
MAX_KEY_BLOCKS = arch_named(ARCH).kernel("select").limits["key_blocks"]
FUSED_SETTINGS = Settings(block_q=128, block_kv=64)


def _serving(selection: str) -> tuple[str, ...]:
    """Every fusion that serves a call with FUSED_SETTINGS and `selection`."""
    shape = CallShape(1, 1, 128, 64, 128, torch.bfloat16, FUSED_SETTINGS, False, (1, 0))
    return fusions_serving(shape, selection)


def _exact(fusions: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `fusions` that change no bit of a call's outputs on its routing."""
    return tuple(name for name in fusions if FUSIONS[name].exact)


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [KernelSpec("select", (), ARCH)]
    specs += [KernelSpec("select", args, ARCH) for dim in (64, 128) for args in (
        (("dim", dim), ("pooled_scores", True)),
        (("block_map_dtype", "bfloat16"), ("dim", dim), ("z_rows", True)))]
    specs += [KernelSpec("select", (("block_map_dtype", dtype), *extra), ARCH)
              for dtype in ("bfloat16", "float32") for extra in ((), (("float_map", True),))]
    for selection in ("kernel", "sort"):
        for fusions in ((), _serving(selection), _exact(_serving(selection)),
                        ("selection_scores",) * (selection == "kernel")):
            specs += kernels_for(ARCH, 128, "bfloat16", FUSED_SETTINGS, backward=False,
                                 selection=selection, fusions=fusions)
    for dim, block_kv in ((64, 128), (128, 64)):
        for knobs in [{}, *kernels.alternatives(ARCH, "key_pass", dim, 128, block_kv)]:
            for fusions in ((), ("pooled_keys",)):
                specs += kernels_for(ARCH, dim, "bfloat16",
                                     Settings(block_q=128, block_kv=block_kv), backward=False,
                                     schedule={"key_pass": knobs}, fusions=fusions)
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())

# (block_q, block_kv, lq, lk, topk, k_low): odd lengths, one critical block, all blocks,
# Lq != Lk, more key blocks than a warp has lanes several times over, and the largest row.
CASES = [
    (128, 64, 1000, 1000, 0.1, 0.1),
    (64, 64, 300, 5000, 0.05, 0.3),
    (128, 128, 2000, 129, 1.0, 0.0),
    (128, 64, 700, 64, 0.05, 0.0),
    (64, 128, 4000, 7777, 0.0, 0.5),
    (128, 64, 32760, 32760, 0.05, 0.1),
    (128, 64, 1024, 64 * MAX_KEY_BLOCKS, 0.01, 0.0),
]


def _pooled(q: torch.Tensor, k: torch.Tensor, block_q: int,
            block_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooling kernels' pooled q and k blocks (float32)."""
    b, h, lq, d = q.shape
    shape = CallShape(b, h, lq, k.shape[2], d, q.dtype,
                      Settings(block_q=block_q, block_kv=block_kv), False, (1, 0))
    pooled = route_phase(target_of(q.device), shape).run(
        dict(q=q, k=k), q.device, keep=True, only=["pool_q", "pool_k"])
    return pooled["pooled_q"], pooled["pooled_k"]


def _scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """Block scores of the pooling kernels' pooled q and k (unsmoothed, as the selection
    kernel reads them)."""
    pooled_q, pooled_k = _pooled(q, k, block_q, block_kv)
    return pooled_q @ pooled_k.transpose(-1, -2)


def _expected(scores: torch.Tensor, n_crit: int, n_neg: int) -> tuple[torch.Tensor, ...]:
    """Ascending indices of each row's n_crit largest and, of the rest, n_neg smallest."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    critical = order[..., :n_crit].sort(dim=-1).values
    negligible = order[..., scores.shape[-1] - n_neg:].sort(dim=-1).values
    return critical.int(), negligible.int()


def _poisoned_routing(rows: tuple[int, ...], n_crit: int, n_neg: int) -> Routing:
    """A routing of these widths on the GPU, every entry -7 (for a kernel to overwrite)."""
    return Routing(*(torch.full(shape, -7, dtype=torch.int32, device="cuda") for shape in
                     ((*rows, n_crit), rows, (*rows, n_neg), rows)))


@pytest.mark.parametrize("block_q,block_kv,lq,lk,topk,k_low", CASES)
def test_selection_kernel_matches_top_k_of_the_same_scores(generator, block_q, block_kv, lq,
                                                           lk, topk, k_low):
    q, k, _ = random_qkv(2, 3, lq, lk, 128, torch.bfloat16, generator, device="cuda")
    scores = _scores(q, k, block_q, block_kv)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    got = _poisoned_routing(rows, n_crit, n_neg)
    kernels.compiled(KernelSpec("select", (), target_of(q.device).arch.target))(scores, *got)
    torch.cuda.synchronize()
    critical, negligible = _expected(scores, n_crit, n_neg)
    # Random scores have no ties, so the sets are the same block for block.
    assert torch.equal(got.lut, critical)
    assert torch.equal(got.neg_lut, negligible)
    assert (got.lut_count == n_crit).all() and (got.neg_count == n_neg).all()


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("block_q,block_kv,lq,lk,topk,k_low", CASES)
def test_selection_kernel_scoring_the_pooled_blocks_picks_the_top_blocks(
        generator, dim, block_q, block_kv, lq, lk, topk, k_low):
    """The variant making the scores itself (fusion selection_scores): each row's critical
    blocks are its largest by the exact scores and its negligible ones the smallest of the
    rest, up to float32's rounding of a dot product near a tie; and the same blocks as the
    selection on torch's float32 scores, nearly everywhere."""
    q, k, _ = random_qkv(2, 3, lq, lk, dim, torch.bfloat16, generator, device="cuda")
    pooled_q, pooled_k = _pooled(q, k, block_q, block_kv)
    n_kv = pooled_k.shape[2]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = pooled_q.shape[:-1]
    got = _poisoned_routing(rows, n_crit, n_neg)
    kernels.compiled(KernelSpec("select", (("dim", dim), ("pooled_scores", True)), ARCH))(
        pooled_q, pooled_k, *got)
    torch.cuda.synchronize()
    assert (got.lut_count == n_crit).all() and (got.neg_count == n_neg).all()
    exact = pooled_q.double() @ pooled_k.double().transpose(-1, -2)
    slack = 1e-5 * exact.abs().amax(-1, keepdim=True)
    critical = torch.zeros(exact.shape, dtype=torch.bool, device="cuda")
    critical.scatter_(-1, got.lut.long(), True)
    assert (critical.sum(-1) == n_crit).all()  # distinct blocks
    lowest_picked = exact.masked_fill(~critical, float("inf")).amin(-1, keepdim=True)
    highest_other = exact.masked_fill(critical, float("-inf")).amax(-1, keepdim=True)
    assert (lowest_picked >= highest_other - slack).all()
    if n_neg:
        negligible = torch.zeros_like(critical)
        negligible.scatter_(-1, got.neg_lut.long(), True)
        assert not (negligible & critical).any() and (negligible.sum(-1) == n_neg).all()
        rest = ~(critical | negligible)
        highest_neg = exact.masked_fill(~negligible, float("-inf")).amax(-1, keepdim=True)
        lowest_rest = exact.masked_fill(~rest, float("inf")).amin(-1, keepdim=True)
        assert (highest_neg <= lowest_rest + slack).all()
    on_torch_scores = _poisoned_routing(rows, n_crit, n_neg)
    kernels.compiled(KernelSpec("select", (), ARCH))(
        pooled_q @ pooled_k.transpose(-1, -2), *on_torch_scores)
    assert (on_torch_scores.lut == got.lut).float().mean().item() > 0.999


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("lq,lk,topk,k_low", [(1000, 1000, 0.1, 0.1), (300, 5000, 0.05, 0.3),
                                              (2000, 129, 1.0, 0.0), (700, 64, 0.05, 0.0)])
def test_selection_kernels_z_rows_are_the_marginal_blocks_sums(generator, dim, lq, lk, topk,
                                                               k_low):
    """Fusion selection_z_rows: each row's Z_i, the key blocks' total less its excluded
    blocks' z_j, against the float64 sum of its marginal blocks' z_j (a row with none, all
    blocks critical, is left with the total's rounding: the forward's flags zero it)."""
    q, k, _ = random_qkv(2, 3, lq, lk, dim, torch.bfloat16, generator, device="cuda")
    scores = _scores(q, k, 128, 64)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    z_block = torch.rand((*scores.shape[:2], n_kv, dim), generator=generator).cuda() * 64
    z_total = z_block.sum(dim=2)
    got = _poisoned_routing(rows, n_crit, n_neg)
    marginal = torch.full(scores.shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    active = torch.full(rows, -7, dtype=torch.int32, device="cuda")
    z_rows = torch.full((*rows, dim), float("nan"), device="cuda")
    kernel = kernels.compiled(KernelSpec("select", (("block_map_dtype", "bfloat16"),
                                                    ("dim", dim), ("z_rows", True)), ARCH))
    kernel(scores, z_block, z_total, *got, marginal, active, z_rows)
    torch.cuda.synchronize()
    critical, negligible = _expected(scores, n_crit, n_neg)
    assert torch.equal(got.lut, critical) and torch.equal(got.neg_lut, negligible)
    expected = marginal.double() @ z_block.double()
    live = (active == 1).unsqueeze(-1)
    error = ((z_rows.double() - expected).abs() * live).amax()
    assert error <= 1e-5 * z_total.abs().amax().item(), error
    assert torch.isfinite(z_rows).all()


def test_a_routed_forward_with_the_selection_kernels_z_rows_matches_the_reference(generator):
    """The routed forward with selection_z_rows (Z_i summed in another order: not bit for
    bit the plan without it) against the float64 reference on its routing, and close to the
    forward without it on the same routing."""
    q, k, v = random_qkv(2, 3, 1500, 2100, 128, torch.bfloat16, generator, device="cuda")
    weight, bias = random_projection(128, torch.float32, generator, device="cuda")
    s = FUSED_SETTINGS
    fusions = ("pooled_keys", "selection_block_map", "selection_z_rows")
    fused, routing = tilelang_backend.routed_forward(q, k, v, weight, bias, 0.1, 0.2, s,
                                                     selection="kernel", fusions=fusions)
    plain = tilelang_backend.forward(q, k, v, routing, weight, bias, s, keep_routing=False)
    expected = reference.attention_with_routing(
        *(t.double().cpu() for t in (q, k, v)), Routing(*(t.cpu() for t in routing)),
        weight.double().cpu(), bias.double().cpu(), s.block_q, s.block_kv, s.feature_map,
        s.linear).out
    assert relative_error(fused.out.cpu(), expected) < 1e-2
    assert relative_error(fused.out, plain.out) < 1e-3
    assert relative_error(fused.z_rows, plain.z_rows) < 1e-5
    assert torch.equal(fused.h_rows, plain.h_rows)


def test_route_with_the_selection_kernel_picks_the_same_blocks_as_the_sort(generator):
    q, k, _ = random_qkv(1, 4, 3000, 3000, 64, torch.float16, generator, device="cuda")
    by_sort = tilelang_backend.route(q, k, 0.1, 0.2, 128, 64, "bhsd")
    by_kernel = tilelang_backend.route(q, k, 0.1, 0.2, 128, 64, "bhsd", selection="kernel")
    # The sort ranks smoothed scores, the kernel raw ones: equal up to rounding near ties.
    agree = (by_sort.lut == by_kernel.lut).float().mean().item()
    assert agree > 0.99, agree
    assert torch.equal(by_sort.lut_count, by_kernel.lut_count)
    assert torch.equal(by_sort.neg_count, by_kernel.neg_count)


@pytest.mark.parametrize("block_map_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("topk,k_low", [(0.1, 0.2), (0.3, 0.0), (1.0, 0.0)])
def test_selection_kernel_writes_the_marginal_block_map_and_flags(generator, block_map_dtype,
                                                                  topk, k_low):
    q, k, _ = random_qkv(2, 3, 1500, 2100, 64, torch.float16, generator, device="cuda")
    scores = _scores(q, k, 128, 64)
    n_kv = scores.shape[-1]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = scores.shape[:-1]
    got = _poisoned_routing(rows, n_crit, n_neg)
    dtype = getattr(torch, block_map_dtype)
    marginal = torch.full(scores.shape, float("nan"), dtype=dtype, device="cuda")
    active = torch.full(rows, -7, dtype=torch.int32, device="cuda")
    arch = target_of(q.device).arch.target
    kernel = kernels.compiled(KernelSpec("select", (("block_map_dtype", block_map_dtype),), arch))
    kernel(scores, *got, marginal, active)
    torch.cuda.synchronize()
    excluded = torch.zeros(scores.shape, dtype=torch.bool, device="cuda")
    excluded.scatter_(-1, got.lut.long(), True)
    if n_neg:
        excluded.scatter_(-1, got.neg_lut.long(), True)
    assert torch.equal(marginal, (~excluded).to(dtype))
    assert (active == int(n_crit + n_neg < n_kv)).all()
    # The variant that also writes the map in float32 (fusion selection_float_map).
    again = _poisoned_routing(rows, n_crit, n_neg)
    marginal_f32 = torch.full(scores.shape, float("nan"), device="cuda")
    marginal.fill_(float("nan"))
    active.fill_(-7)
    both = kernels.compiled(KernelSpec("select", (("block_map_dtype", block_map_dtype),
                                                  ("float_map", True)), arch))
    both(scores, *again, marginal, active, marginal_f32)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(again, got, strict=True))
    assert torch.equal(marginal, (~excluded).to(dtype))
    assert torch.equal(marginal_f32, (~excluded).float())
    assert (active == int(n_crit + n_neg < n_kv)).all()


@pytest.mark.parametrize("dim,block_kv,lk", [(128, 64, 2000), (64, 128, 777), (128, 64, 64)])
def test_key_pass_pools_the_keys_it_loads(generator, dim, block_kv, lk):
    """The key pass of the plan with the pooled_keys fusion: the means of the key blocks,
    and the same linear states, bit for bit, as the key pass without it."""
    _, k, v = random_qkv(2, 3, 1, lk, dim, torch.bfloat16, generator, device="cuda")
    shape = CallShape(2, 3, 1, lk, dim, k.dtype, Settings(block_q=128, block_kv=block_kv),
                      False, (1, 0))
    n_kv = spec.num_blocks(lk, block_kv)

    def run(fusions: tuple[str, ...], knobs: dict) -> dict[str, torch.Tensor]:
        phase = routed_plan(target_of(k.device), shape, {"key_pass": knobs},
                            fusions=fusions).forward
        poisoned = dict(h_block=torch.full((2, 3, n_kv, dim, dim), float("nan"),
                                           dtype=torch.bfloat16, device="cuda"),
                        z_block=torch.full((2, 3, n_kv, dim), float("nan"), device="cuda"),
                        pooled_k=torch.full((2, 3, n_kv, dim), float("nan"), device="cuda"))
        found = phase.run(dict(k=k, v=v, **poisoned), k.device, keep=True, only=["key_pass"])
        torch.cuda.synchronize()
        return found

    expected = reference.mean_pool(k.double().cpu(), block_kv)
    # The default schedule and each alternative (the column sums on the tensor cores).
    for knobs in [{}, *kernels.alternatives(ARCH, "key_pass", dim, 128, block_kv)]:
        plain, pooled = run((), knobs), run(("pooled_keys",), knobs)
        assert torch.equal(plain["h_block"], pooled["h_block"]), knobs
        assert torch.equal(plain["z_block"], pooled["z_block"]), knobs
        assert relative_error(pooled["pooled_k"], expected) < 1e-5, knobs


@pytest.mark.parametrize("selection,fusions", [
    ("kernel", ("pooled_keys",)), ("kernel", ("selection_block_map",)),
    ("kernel", ("selection_scores",)), ("kernel", _exact(_serving("kernel"))),
    ("sort", ("key_major_flags",)), ("sort", _exact(_serving("sort")))])
@pytest.mark.parametrize("lq,lk,topk,k_low", [(1500, 2100, 0.1, 0.2), (4096, 4096, 0.05, 0.0),
                                              (700, 64, 0.05, 0.0)])
def test_a_fused_routed_forward_is_the_forward_on_its_routing(generator, selection, fusions,
                                                              lq, lk, topk, k_low):
    """A routed forward with fusions writes, bit for bit, what the forward without them
    writes on the same routing, and routes as the plan without them does (up to rounding
    near ties: the key pass pools K in its own order)."""
    q, k, v = random_qkv(2, 3, lq, lk, 128, torch.bfloat16, generator, device="cuda")
    weight, bias = random_projection(128, torch.float32, generator, device="cuda")
    s = FUSED_SETTINGS
    fused, routing = tilelang_backend.routed_forward(q, k, v, weight, bias, topk, k_low, s,
                                                     selection=selection, fusions=fusions)
    _, plain_routing = tilelang_backend.routed_forward(q, k, v, weight, bias, topk, k_low, s,
                                                       selection=selection, fusions=())
    again = tilelang_backend.forward(q, k, v, routing, weight, bias, s, keep_routing=False)
    for name, a, b in zip(fused._fields, fused, again, strict=True):
        assert torch.equal(a, b), name
    assert (plain_routing.lut == routing.lut).float().mean().item() > 0.99
    assert torch.equal(plain_routing.lut_count, routing.lut_count)
    assert torch.equal(plain_routing.neg_count, routing.neg_count)
