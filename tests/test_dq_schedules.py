"""dQ's schedule choices, on CPU: what is default, what is tuned, what only timed, and which
knobs are refused.

Building a TileLang program (no compilation) is cheap, so every schedule the tuner or the
benchmark may ask for is built here; one hand-written variant is also compiled for sm_90a
(no GPU needed). The GPU tests run them all against float64.
"""

from __future__ import annotations

import pytest

from sla_tl import kernels, static_check
from sla_tl.benchmarks import dq_variants
from sla_tl.kernels import KernelSpec
from sla_tl.schedules.sm90 import backward_dq, backward_dq_ws
from sla_tl.spec import softmax_scale

ARCH = "sm_90a"
SIZES = [(d, bq, bkv) for d in (64, 128) for bq in (64, 128) for bkv in (64, 128)]


@pytest.mark.parametrize("dim,block_q,block_kv", SIZES)
def test_the_default_is_hand_written_where_it_fits_and_tuned_choices_keep_its_class(
        dim, block_q, block_kv):
    default = kernels.default_knobs(ARCH, "backward_dq", dim, block_q, block_kv)
    space = kernels.search_space(ARCH, "backward_dq", dim, block_q, block_kv)
    fitting = [n for n in (2, 3) if backward_dq_ws.fits(dim, block_q, block_kv, n)]
    hand_written = ("manual", "pingpong")
    if fitting:
        assert (default["warp_specialization"], default["num_stages"]) == ("manual",
                                                                           max(fitting))
    else:
        assert default["warp_specialization"] == "auto"
    assert all(default[name] in choices for name, choices in space.items())
    # Tuned choices never cross between the two kernels (they round differently).
    for knobs in kernels.searched_schedules(ARCH, "backward_dq", dim, block_q, block_kv):
        merged = {**default, **knobs}
        assert (merged["warp_specialization"] in hand_written) == bool(fitting), knobs
        if fitting:
            assert backward_dq_ws.fits(dim, block_q, block_kv, merged["num_stages"])


@pytest.mark.parametrize("dim,block_q,block_kv", SIZES)
def test_the_automatic_split_is_the_alternative_where_the_default_is_hand_written(
        dim, block_q, block_kv):
    found = kernels.alternatives(ARCH, "backward_dq", dim, block_q, block_kv)
    serves = block_q == backward_dq_ws.BLOCK_Q and dim * block_kv <= backward_dq_ws.MAX_TILE
    assert bool(found) == serves
    assert all(a["warp_specialization"] == "auto" and a["threads"] == 2 * block_q
               for a in found)


def test_no_schedule_asks_for_more_shared_memory_than_the_gpu_allows():
    # Measured on the H200: TileLang's dQ at D=128 with 128x128 blocks and 3 stages asks
    # for 256 KiB and fails at launch.
    schedules = kernels.every_schedule(ARCH, "backward_dq", 128, 128, 128)
    default = kernels.default_knobs(ARCH, "backward_dq", 128, 128, 128)
    assert {{**default, **s}["num_stages"] for s in schedules} == {1, 2}
    # With 64-row query blocks the same keys fit three stages (224 KiB).
    assert kernels.search_space(ARCH, "backward_dq", 128, 64, 128)["num_stages"] == (1, 2, 3)
    space = kernels.search_space(ARCH, "backward_dq", 64, 128, 128)
    assert space["num_stages"] == (2, 3)  # the hand-written kernel's: it fits D=64


def test_sizes_the_hand_written_dq_serves():
    # Q, dO and the DQ tile (3 x 32 KiB) and 2 x 16 KiB a stage at D=128 with 64-key blocks.
    assert backward_dq_ws.shared_bytes(128, 64, 3) == 3 * 32768 + 3 * 32768
    assert backward_dq_ws.fits(128, 128, 64, 3)
    assert not backward_dq_ws.fits(128, 128, 64, 5)  # shared memory
    assert backward_dq_ws.fits(64, 128, 128, 3)
    # 128-key blocks at D=128: the consumers' accumulators do not fit in registers.
    assert not backward_dq_ws.fits(128, 128, 128, 2)
    # One stage would deadlock (K_t is held until dQ(t) runs, after S(t+1)); 64-row blocks
    # are not this kernel's.
    assert not backward_dq_ws.fits(64, 128, 64, 1)
    assert not backward_dq_ws.fits(64, 64, 64, 2)


@pytest.mark.parametrize("dim,block_kv", [(128, 64), (128, 128), (64, 64), (64, 128)])
@pytest.mark.parametrize("dtype,layout", [("bfloat16", "bhsd"), ("float16", "bshd")])
def test_every_tuned_and_alternative_schedule_builds(dim, block_kv, dtype, layout):
    block_q = backward_dq_ws.BLOCK_Q
    schedules = kernels.every_schedule(ARCH, "backward_dq", dim, block_q, block_kv)
    default = kernels.default_knobs(ARCH, "backward_dq", dim, block_q, block_kv)
    assert any({**default, **s}["warp_specialization"] != "auto" for s in schedules) == (
        dim * block_kv <= backward_dq_ws.MAX_TILE)
    scale = softmax_scale(dim, None)
    for knobs in schedules:
        merged = {**default, **knobs}
        if merged["warp_specialization"] == "auto":
            program = backward_dq.backward_dq(dim, block_q, block_kv, dtype, layout, scale,
                                              merged["threads"], merged["num_stages"])
        else:
            program = backward_dq_ws.backward_dq_ws(
                dim, block_kv, dtype, layout, scale, merged["num_stages"],
                merged["warp_specialization"] == "pingpong")
        assert program is not None, knobs


def _dq_kernel(block_q: int, block_kv: int, **knobs):
    return kernels.compiled(_dq_spec(block_q, block_kv, **knobs))


def _dq_spec(block_q: int, block_kv: int, **knobs) -> KernelSpec:
    return KernelSpec("backward_dq", (("dim", 128), ("block_q", block_q), ("block_kv", block_kv),
                                      ("dtype", "bfloat16"), ("layout", "bhsd"),
                                      ("scale", softmax_scale(128, None))), ARCH,
                      kernels.freeze(knobs))


def test_bad_dq_knobs_are_refused_by_name():
    with pytest.raises(ValueError, match="warp_specialization must be one of"):
        _dq_kernel(128, 64, warp_specialization="fa3")
    with pytest.raises(ValueError, match="needs block_q=128"):
        _dq_kernel(64, 64, warp_specialization="pingpong")
    with pytest.raises(ValueError, match="runs 384 threads; got threads=256"):
        _dq_kernel(128, 64, warp_specialization="manual", threads=256)
    with pytest.raises(ValueError, match="unknown schedule knobs for backward_dq"):
        _dq_kernel(128, 64, warp_specialization="manual", entries_per_step=2)
    with pytest.raises(ValueError, match="num_stages of the warp-specialised dQ"):
        _dq_kernel(128, 64, warp_specialization="manual", num_stages=1)
    with pytest.raises(ValueError, match="num_stages of the warp-specialised dQ"):
        _dq_kernel(128, 64, warp_specialization="manual", num_stages=True)
    with pytest.raises(ValueError, match="does not fit D=128, block_kv=128, num_stages=2"):
        _dq_kernel(128, 128, warp_specialization="manual", num_stages=2)
    with pytest.raises(ValueError, match="does not fit D=128, block_kv=64, num_stages=5"):
        _dq_kernel(128, 64, warp_specialization="manual", num_stages=5)


def test_the_wan_shapes_hand_written_dq_compiles_for_sm90a_without_spills():
    """The Wan2.1 shape's alternative (D=128, 128x64 blocks, pingpong), compiled for sm_90a
    here: ptxas refuses a spill, so this fails if the consumers' registers overflow."""
    spec = _dq_spec(128, 64, warp_specialization="pingpong", num_stages=3)
    facts = static_check.kernel_facts(spec)
    assert facts.spill_bytes == 0
    assert facts.threads == backward_dq_ws.THREADS
    assert facts.wgmma and facts.tma
    # 65536 registers over 384 threads at launch; setmaxnreg gives the consumers 240.
    assert facts.registers <= 168
    assert facts.shared_bytes >= backward_dq_ws.shared_bytes(128, 64, 3)


def test_dq_flops_count_three_gemms_per_computed_block_pair():
    # L=1024 in 128x64 blocks: 8 query blocks, 4 of 16 key blocks computed each.
    pairs = 8 * 4
    assert dq_variants.dq_flops(1, 1, 1024, 64, 4 / 16) == pairs * 3 * 2 * 128 * 64 * 64
