"""Schedule choices on CPU (forward, dK/dV): what is default, what is tuned, what only timed.

Building a TileLang program (no compilation) is cheap, so every schedule the tuner or the
benchmark may ask for is built here; the GPU tests run them.
"""

from __future__ import annotations

import pytest

from sla_tl import kernels
from sla_tl.kernels import KernelSpec
from sla_tl.schedules.sm90 import SHARED_MEMORY_BYTES, forward_ws, key_pass, programs
from sla_tl.schedules.sm90 import backward_dkdv_ws as dkdv_ws
from sla_tl.spec import softmax_scale

ARCH = "sm_90a"
SIZES = [(d, bq, bkv) for d in (64, 128) for bq in (64, 128) for bkv in (64, 128)]


@pytest.mark.parametrize("dim,block_q,block_kv", SIZES)
def test_the_default_is_in_the_search_space_and_alternatives_are_not(dim, block_q, block_kv):
    default = kernels.default_knobs(ARCH, "forward", dim, block_q, block_kv)
    space = kernels.search_space(ARCH, "forward", dim, block_q, block_kv)
    assert all(default[name] in choices for name, choices in space.items())
    # Every searched combination keeps the default's rounding class.
    for knobs in kernels.searched_schedules(ARCH, "forward", dim, block_q, block_kv):
        assert (knobs["warp_specialization"] == "auto") == (
            default["warp_specialization"] == "auto")
    for alternative in kernels.alternatives(ARCH, "forward", dim, block_q, block_kv):
        rounding = (alternative["warp_specialization"] == "auto",
                    alternative["entries_per_step"])
        assert rounding != (default["warp_specialization"] == "auto",
                            default["entries_per_step"]), alternative


@pytest.mark.parametrize("dim,block_q,block_kv", SIZES)
def test_hand_written_default_exactly_where_two_stages_fit(dim, block_q, block_kv):
    default = kernels.default_knobs(ARCH, "forward", dim, block_q, block_kv)
    fits = forward_ws.fits(dim, block_q, block_kv, 2)
    assert (default["warp_specialization"] == "manual") == fits
    if fits:
        assert forward_ws.fits(dim, block_q, block_kv, default["num_stages"])


def test_shared_memory_of_the_wan_default_and_its_pair_alternative():
    # 128x64 blocks at D=128: three stages of one entry, or two stages of two, use all of it.
    assert forward_ws.shared_bytes(128, 64, 3) == 230400
    assert forward_ws.shared_bytes(128, 64, 2, entries_per_step=2) == 230400
    assert not forward_ws.fits(128, 128, 64, 3, entries_per_step=2)
    assert not forward_ws.fits(128, 64, 64, 2)


@pytest.mark.parametrize("dim,block_q,block_kv", [(128, 128, 64), (64, 128, 64),
                                                  (64, 128, 128)])
def test_every_tuned_and_alternative_schedule_builds(dim, block_q, block_kv):
    schedules = kernels.every_schedule(ARCH, "forward", dim, block_q, block_kv)
    scale = softmax_scale(dim, None)
    for knobs in schedules:
        # Through the dispatch the kernel getter uses: the default's knobs under the given ones.
        program = programs.sla_forward(dim, block_q, block_kv, "bfloat16", "softmax", "bhsd",
                                       scale, knobs)
        assert program is not None, knobs


def test_a_schedule_that_does_not_fit_is_refused_by_name():
    with pytest.raises(ValueError, match="does not fit"):
        forward_ws.sla_forward_ws(128, 128, "bfloat16", "softmax", "bhsd", 0.1, 2, True)
    with pytest.raises(ValueError, match="entries_per_step"):
        forward_ws.sla_forward_ws(128, 64, "bfloat16", "softmax", "bhsd", 0.1, 2, True, 3)
    with pytest.raises(ValueError, match="needs block_q=128"):
        kernels.compiled(_forward_spec(64, 64, warp_specialization="manual"))
    with pytest.raises(ValueError, match="hand-written forward only"):
        kernels.compiled(_forward_spec(64, 64, entries_per_step=2))
    with pytest.raises(ValueError, match="stores must be one of"):
        key_pass.key_pass(128, 64, "bfloat16", "softmax", "bhsd", True, 8, 256, stores="late",
                          sums="serial")
    with pytest.raises(ValueError, match="sums must be one of"):
        key_pass.key_pass(128, 64, "bfloat16", "softmax", "bhsd", True, 8, 256,
                          stores="waited", sums="atomic")


@pytest.mark.parametrize("dim,block_q", [(64, 64), (64, 128), (128, 64), (128, 128)])
def test_every_dkdv_alternative_builds_and_is_outside_the_search_space(dim, block_q):
    space = kernels.search_space(ARCH, "backward_dkdv", dim, block_q, 64)
    assert "warp_specialization" not in space  # the tuner keeps TileLang's kernel
    found = kernels.alternatives(ARCH, "backward_dkdv", dim, block_q, 64)
    assert found, "64-key blocks have a hand-written dK/dV"
    for knobs in found:
        program = dkdv_ws.backward_dkdv_ws(dim, block_q, "bfloat16", "softmax", "bhsd",
                                           softmax_scale(dim, None), 2 * knobs["num_stages"])
        assert program is not None, knobs
    assert kernels.alternatives(ARCH, "backward_dkdv", dim, block_q, 128) == []


def test_dkdv_shared_memory_and_refusals():
    # D=128: a ring of four slices fills shared memory to the byte; six do not fit.
    assert dkdv_ws.shared_bytes(128, 4) + 1024 == SHARED_MEMORY_BYTES
    assert not dkdv_ws.fits(128, 128, 64, 6)
    assert not dkdv_ws.fits(64, 128, 64, 2)  # the epilogue borrows three ring buffers
    with pytest.raises(ValueError, match="does not fit"):
        dkdv_ws.backward_dkdv_ws(128, 128, "bfloat16", "softmax", "bhsd", 0.1, 6)
    with pytest.raises(ValueError, match="needs block_kv=64"):
        kernels.compiled(_dkdv_spec(128, warp_specialization="manual"))
    with pytest.raises(ValueError, match="linear_first=False"):
        kernels.compiled(_dkdv_spec(64, warp_specialization="manual", linear_first=True))
    with pytest.raises(ValueError, match="warp_specialization must be one of"):
        kernels.compiled(_dkdv_spec(64, warp_specialization="x"))
    with pytest.raises(ValueError, match="unknown schedule knobs for backward_dkdv"):
        kernels.compiled(_dkdv_spec(64, entries_per_step=2))


def _forward_spec(block_q: int, block_kv: int, **knobs) -> KernelSpec:
    return KernelSpec("forward", (("dim", 128), ("block_q", block_q), ("block_kv", block_kv),
                                  ("dtype", "bfloat16"), ("feature", "softmax"),
                                  ("layout", "bhsd"), ("scale", 0.1)), ARCH,
                      kernels.freeze(knobs))


def _dkdv_spec(block_kv: int, **knobs) -> KernelSpec:
    return KernelSpec("backward_dkdv", (("dim", 128), ("block_q", 128), ("block_kv", block_kv),
                                        ("dtype", "bfloat16"), ("feature", "softmax"),
                                        ("layout", "bhsd"), ("scale", 0.1)), ARCH,
                      kernels.freeze(knobs))
