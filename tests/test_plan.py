"""A call's plan on the CPU: what it launches, its fusions (kernel variants taking over torch
steps, reachable by name), and the errors for fusions that cannot serve a call."""

from __future__ import annotations

import pytest
import torch

from sla_tl import plan, spec
from sla_tl.plan import (
    DEFAULT_FUSIONS,
    FUSIONS,
    CallShape,
    attention_plan,
    fusions_serving,
    kernels_for,
    resolve_selection,
    routed_plan,
)
from sla_tl.settings import Settings
from sla_tl.targets import Target, arch_named

TARGET = Target("", arch_named("sm_90a"))
SETTINGS = Settings(block_q=128, block_kv=64)


def _shape(settings: Settings = SETTINGS, lq: int = 1000, lk: int = 1500) -> CallShape:
    """A call's shape with the routing widths of topk = k_low = 0.1."""
    n_kv = spec.num_blocks(lk, settings.block_kv)
    n_crit = spec.num_critical(0.1, n_kv)
    return CallShape(2, 3, lq, lk, 64, torch.bfloat16, settings, False,
                     (n_crit, spec.num_negligible(0.1, n_kv, n_crit)))


def _steps(fusions, selection="kernel", settings=SETTINGS) -> list[str]:
    phase = routed_plan(TARGET, _shape(settings), {}, selection, fusions).forward
    return [step.name for step in phase.steps]


def test_the_default_plan_runs_the_default_fusions_that_serve_it():
    assert set(DEFAULT_FUSIONS) <= set(FUSIONS)
    assert _steps(None, "kernel") == _steps(DEFAULT_FUSIONS, "kernel")
    # With the sort the selection kernel's block map cannot serve: the others run.
    assert _steps(None, "sort") == _steps(("pooled_keys",), "sort")
    globally = Settings(block_q=128, block_kv=64, linear="global")
    assert _steps(None, "kernel", globally) == _steps(("pooled_keys",), "kernel", globally)


def test_the_default_selection_is_the_kernel_where_it_takes_the_key_blocks():
    limit = TARGET.arch.kernel("select").limits["key_blocks"]
    fits = _shape(SETTINGS)
    assert resolve_selection(TARGET, fits, None) == "kernel"
    assert resolve_selection(TARGET, fits, "sort") == "sort"
    long = fits._replace(lk=(limit + 1) * SETTINGS.block_kv)
    assert resolve_selection(TARGET, long, None) == "sort"
    steps = [step.name for step in routed_plan(TARGET, long, {}).forward.steps]
    assert "routing_flags" in steps and steps[0] == "key_pass"  # sort, pooled keys


def test_each_fusion_takes_over_its_steps_and_nothing_else():
    plain = _steps(())
    assert plain == ["pool_q", "pool_k", "scores", "select", "key_pass", "routing_flags",
                     "linear_states", "projection_operands", "forward"]
    assert _steps(("pooled_keys",)) == ["key_pass", *(n for n in plain
                                                      if n not in ("key_pass", "pool_k"))]
    assert _steps(("selection_block_map",)) == [n for n in plain if n != "routing_flags"]
    # The float32 copy of the map changes the linear states' step, not the step list.
    assert _steps(("selection_block_map", "selection_float_map")) == _steps(
        ("selection_block_map",))
    assert _steps(("selection_scores",)) == [n for n in plain if n != "scores"]
    # Every fusion that serves the call, applied in FUSIONS' order whatever the order given.
    both = _steps(tuple(reversed(fusions_serving(_shape(), "kernel"))))
    assert both == ["key_pass", "pool_q", "z_total", "select", "linear_states",
                    "projection_operands", "forward"]
    # A sorted routing: the key-major kernel writes the map and flags.
    sorted_plain = _steps((), "sort")
    assert _steps(("key_major_flags",), "sort") == [
        "key_major" if n == "routing_flags" else n for n in sorted_plain]


def test_the_fusions_serving_a_call_are_those_that_do_not_refuse_it():
    glob = _shape(Settings(block_q=128, block_kv=64, linear="global"))
    assert fusions_serving(_shape(), "kernel") == (
        "pooled_keys", "selection_block_map", "selection_float_map", "selection_scores",
        "selection_z_rows", "key_major_kernel", "key_major_float_map")
    assert fusions_serving(glob, "kernel") == ("pooled_keys", "selection_scores",
                                                "key_major_kernel")
    assert fusions_serving(_shape(), "sort") == (
        "pooled_keys", "key_major_flags", "key_major_kernel", "key_major_float_map")
    assert fusions_serving(glob, "sort") == ("pooled_keys", "key_major_kernel")
    # A given routing: the backward's.
    assert fusions_serving(_shape(), None) == ("key_major_kernel", "key_major_float_map")
    for selection in ("kernel", "sort"):
        routed_plan(TARGET, _shape(), {}, selection, fusions_serving(_shape(), selection))


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_the_key_major_kernel_takes_the_reverse_lut_step_of_every_backward(linear):
    settings = Settings(block_q=128, block_kv=64, linear=linear)
    plain = attention_plan(TARGET, _shape(settings), {}, fusions=()).backward
    fused = attention_plan(TARGET, _shape(settings), {}, fusions=("key_major_kernel",)).backward
    names = [step.name for step in plain.steps]
    assert names[0] == "routing_flags"  # the flags the query pass reads come first
    assert [step.name for step in fused.steps] == [
        "key_major", "marginal_t", *(n for n in names[1:] if n != "reverse_lut")]
    kernel = fused.step("key_major")
    marginal = linear == "marginal"
    assert kernel.kernel.args == ((("block_map_dtype", "bfloat16"),) if marginal else ())
    assert kernel.reads == (("lut", "lut_count", "neg_lut", "neg_count") if marginal
                            else ("lut", "lut_count"))
    assert kernel.fills == (
        ("reverse", "reverse_count", "marginal", "active") if marginal
        else ("reverse", "reverse_count", "active"))
    n_kv = _shape().n_kv
    assert fused.buffers["reverse"].shape == (2, 3, n_kv, 8)
    # A routed call's plan runs it in its backward; the forward is untouched.
    routed = routed_plan(TARGET, _shape(settings), {}, "sort", ("key_major_kernel",))
    assert [s.name for s in routed.backward.steps] == [s.name for s in fused.steps]
    assert routed.forward.kernels() == routed_plan(TARGET, _shape(settings), {}, "sort",
                                                   ()).forward.kernels()


def test_the_selection_kernel_scoring_the_pooled_blocks_reads_them_for_the_scores():
    phase = routed_plan(TARGET, _shape(), {}, "kernel", ("selection_scores",)).forward
    select = phase.step("select")
    assert select.reads == ("pooled_q", "pooled_k")
    assert dict(select.kernel.args)["dim"] == 64
    assert "scores" not in phase.buffers
    with pytest.raises(ValueError, match="fusion 'selection_scores' needs selection='kernel'"):
        routed_plan(TARGET, _shape(), {}, "sort", ("selection_scores",))


def test_the_selection_kernels_z_rows_take_over_z_is_gemm_and_the_float_map():
    fusions = ("pooled_keys", "selection_block_map", "selection_float_map", "selection_scores",
               "selection_z_rows")
    phase = routed_plan(TARGET, _shape(), {}, "kernel", fusions).forward
    select = phase.step("select")
    assert select.kernel.args == (("block_map_dtype", "bfloat16"), ("dim", 64),
                                  ("pooled_scores", True), ("z_rows", True))
    assert select.reads == ("pooled_q", "pooled_k", "z_block", "z_total")
    assert select.fills[-3:] == ("marginal", "active", "z_rows")
    assert "marginal_f32" not in phase.buffers
    assert phase.step("linear_states").reads == ("h_block", "marginal")
    assert phase.step("linear_states").fills == ("h_rows",)
    names = [step.name for step in phase.steps]
    assert names.index("key_pass") < names.index("z_total") == names.index("select") - 1
    assert not FUSIONS["selection_z_rows"].exact and FUSIONS["selection_scores"].exact
    with pytest.raises(ValueError, match="fusion 'selection_z_rows' needs 'pooled_keys' too"):
        routed_plan(TARGET, _shape(), {}, "kernel", ("selection_block_map", "selection_z_rows"))
    globally = _shape(Settings(block_q=128, block_kv=64, linear="global"))
    with pytest.raises(ValueError, match="fusion 'selection_z_rows' needs linear='marginal'"):
        routed_plan(TARGET, globally, {}, "kernel", fusions[:1] + fusions[3:])


def test_the_float_map_needs_the_selection_kernels_block_map():
    with pytest.raises(ValueError, match="fusion 'selection_float_map' needs "
                                         "'selection_block_map' too"):
        routed_plan(TARGET, _shape(), {}, "kernel", ("selection_float_map",))


def test_the_key_major_kernels_float_map_feeds_the_key_states_without_a_cast():
    plain = attention_plan(TARGET, _shape(), {}, fusions=("key_major_kernel",)).backward
    fused = attention_plan(TARGET, _shape(), {},
                           fusions=("key_major_kernel", "key_major_float_map")).backward
    assert [s.name for s in fused.steps] == [s.name for s in plain.steps]
    kernel = fused.step("key_major")
    assert kernel.kernel.args == (("block_map_dtype", "bfloat16"), ("float_map", True))
    assert kernel.fills[-1] == "marginal_f32"
    assert fused.buffers["marginal_f32"].dtype == torch.float32
    assert fused.step("marginal_t").makes == ("marginal_t", "marginal_t_f32")
    assert fused.step("key_states").reads == ("g_rows", "gz_rows", "marginal_t",
                                              "marginal_t_f32")
    with pytest.raises(ValueError, match="fusion 'key_major_float_map' needs "
                                         "'key_major_kernel' too"):
        attention_plan(TARGET, _shape(), {}, fusions=("key_major_float_map",))


def test_a_given_routings_plan_refuses_a_routed_forwards_fusion_by_name():
    with pytest.raises(ValueError, match="fusion 'pooled_keys' rewrites the forward of a call "
                                         "that routes"):
        attention_plan(TARGET, _shape(), {}, fusions=("pooled_keys", "key_major_kernel"))
    with pytest.raises(ValueError, match="fusions must be among"):
        attention_plan(TARGET, _shape(), {}, fusions=("reverse_everything",))


def test_a_fused_plans_kernels_are_the_variants_with_their_extra_outputs():
    fused = routed_plan(TARGET, _shape(), {}, "kernel", DEFAULT_FUSIONS).forward
    key_pass, select = fused.step("key_pass"), fused.step("select")
    assert dict(key_pass.kernel.args)["pool_keys"] is True
    assert key_pass.fills[-1] == "pooled_k"
    assert select.kernel.args == (("block_map_dtype", "bfloat16"), ("float_map", True))
    assert select.reads == ("scores",)
    assert select.fills[-3:] == ("marginal", "active", "marginal_f32")
    assert fused.buffers["marginal"].shape == (2, 3, 8, 24)
    assert fused.buffers["marginal_f32"].shape == (2, 3, 8, 24)
    assert fused.buffers["marginal_f32"].dtype == torch.float32
    assert fused.step("linear_states").reads == ("h_block", "z_block", "marginal",
                                                 "marginal_f32")
    plain = kernels_for("sm_90a", 64, "bfloat16", SETTINGS, selection="kernel", fusions=(),
                        routes=True)
    enumerated = kernels_for("sm_90a", 64, "bfloat16", SETTINGS, selection="kernel",
                             fusions=DEFAULT_FUSIONS, routes=True)
    assert [s.kind for s in plain] == ["pool", "pool", "select", "key_pass", "forward",
                                       "backward_query", "backward_dq", "backward_dkdv"]
    assert [s.kind for s in enumerated] == ["key_pass", "pool", "select", "forward",
                                            "key_major", "backward_query", "backward_dq",
                                            "backward_dkdv"]
    assert len(set(enumerated) - set(plain)) == 3  # the two variants and the key-major kernel


def test_warm_and_the_gate_enumerate_both_kinds_of_call_and_the_routing_that_makes_one():
    """A routed call and a call with a given routing launch different key passes (the
    routed one pools K); `kernels_for` lists both, and the routing of `sla::route`."""
    every = kernels_for("sm_90a", 64, "bfloat16", SETTINGS)
    routed = kernels_for("sm_90a", 64, "bfloat16", SETTINGS, routes=True)
    given = kernels_for("sm_90a", 64, "bfloat16", SETTINGS, routes=False)
    assert set(routed) | set(given) <= set(every)
    assert {s.kind for s in set(every) - set(routed) - set(given)} <= {"pool", "select"}
    assert len(every) == len(set(every))
    key_passes = {dict(s.args).get("pool_keys", False) for s in every if s.kind == "key_pass"}
    assert key_passes == {True, False}
    assert {s.kind for s in given} >= {"key_pass", "forward"}
    assert {s.kind for s in every} >= {"pool", "select"}  # sla::route's, for a given routing


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_each_fusions_kernels_build_their_programs(fusion):
    """Each variant a fusion launches is a program its arch builds (no compile: cheap)."""
    selection = "kernel" if fusion in fusions_serving(_shape(), "kernel") else "sort"
    needs = FUSIONS[fusion].needs
    plain = set(routed_plan(TARGET, _shape(), {}, selection, needs).kernels())
    variants = [s for s in routed_plan(TARGET, _shape(), {}, selection,
                                       (*needs, fusion)).kernels() if s not in plain]
    assert len(variants) == 1
    for variant in variants:
        definition = variant.definition()
        knobs = {"knobs": dict(variant.knobs)} if definition.tuning else {}
        assert definition.program(**dict(variant.args), **knobs) is not None


def test_fusions_that_cannot_serve_a_call_are_refused_by_name():
    with pytest.raises(ValueError, match="fusions must be among pooled_keys, selection_block_"):
        routed_plan(TARGET, _shape(), {}, "kernel", ("pooled_everything",))
    with pytest.raises(ValueError, match="fusion 'selection_block_map' needs selection='kernel'"):
        routed_plan(TARGET, _shape(), {}, "sort", ("selection_block_map",))
    with pytest.raises(ValueError, match="needs linear='marginal'"):
        routed_plan(TARGET, _shape(Settings(block_q=128, block_kv=64, linear="global")), {},
                    "kernel", ("selection_block_map",))
    with pytest.raises(ValueError, match="selection must be one of"):
        routed_plan(TARGET, _shape(), {}, "heap")


def test_a_plan_is_resolved_once_per_call_shape():
    first = routed_plan(TARGET, _shape(), {"forward": {"num_stages": 1}})
    assert routed_plan(TARGET, _shape(), {"forward": {"num_stages": 1}}) is first
    assert routed_plan(TARGET, _shape(lq=2000), {"forward": {"num_stages": 1}}) is not first
    assert dict(first.forward.step("forward").kernel.knobs) == {"num_stages": 1}


def test_a_backward_fusion_that_cannot_serve_a_call_is_refused_by_name(monkeypatch):
    refusing = plan.Fusion("takes nothing over", lambda shape, selection: "needs a GPU",
                           lambda steps, buffers, shape: None, phase="backward")
    monkeypatch.setitem(plan.FUSIONS, "refusing", refusing)
    with pytest.raises(ValueError, match="fusion 'refusing' needs a GPU"):
        attention_plan(TARGET, _shape(), {}, fusions=("refusing",))
    with pytest.raises(ValueError, match="fusion 'refusing' needs a GPU"):
        routed_plan(TARGET, _shape(), {}, "sort", ("refusing",))


def test_the_key_major_kernel_refuses_more_query_blocks_than_it_takes():
    limit = TARGET.arch.kernel("key_major").limits["query_blocks"]
    many = _shape(lq=(limit + 1) * SETTINGS.block_q)
    with pytest.raises(ValueError, match=f"at most {limit} query blocks"):
        routed_plan(TARGET, many, {}, "kernel", ("key_major_kernel",))
    enough = _shape(lq=limit * SETTINGS.block_q)
    assert "key_major" in {s.kind for s in
                           routed_plan(TARGET, enough, {}, "kernel", ("key_major_kernel",))
                           .kernels()}
    # By default a call past the limit runs the torch reverse LUT instead.
    assert "key_major" in {s.kind for s in routed_plan(TARGET, enough, {}).kernels()}
    past = [s.name for s in routed_plan(TARGET, many, {}).backward.steps]
    assert "reverse_lut" in past and "key_major" not in past


def test_every_backward_runs_the_key_major_kernel_by_default():
    routed = [s.name for s in routed_plan(TARGET, _shape(), {}).backward.steps]
    given = [s.name for s in attention_plan(TARGET, _shape(), {}).backward.steps]
    assert "key_major" in routed and "reverse_lut" not in routed and given == routed
