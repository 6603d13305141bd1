"""On the CPU: the schedule lists the tuner, the benchmarks and the GPU tests share
(`kernels.searched_schedules`, `kernels.every_schedule`), and what a row of the variants
benchmarks says (fake phases and timer: the GPU runs them for real)."""

from __future__ import annotations

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sla_tl import kernels
from sla_tl.benchmarks import key_pass_variants, query_pass_variants, schedule_variants

ARCH = "sm_90a"


@pytest.mark.parametrize("kernel", ["forward", "backward_dq", "backward_dkdv", "backward_query"])
@pytest.mark.parametrize("dim,block_q,block_kv", [(128, 128, 64), (64, 128, 128), (64, 64, 64)])
def test_every_searched_combination_once_the_default_first(kernel, dim, block_q, block_kv):
    found = kernels.searched_schedules(ARCH, kernel, dim, block_q, block_kv)
    default = kernels.default_knobs(ARCH, kernel, dim, block_q, block_kv)
    space = kernels.search_space(ARCH, kernel, dim, block_q, block_kv)
    assert found[0] == {n: default[n] for n in space}
    assert len({tuple(sorted(k.items())) for k in found}) == len(found)
    assert len(found) == math.prod(len(choices) for choices in space.values())
    assert all(knobs[n] in space[n] for knobs in found for n in space)


@pytest.mark.parametrize("kernel", ["forward", "backward_dq", "backward_dkdv"])
def test_every_schedule_is_the_searched_ones_then_the_alternatives(kernel):
    found = kernels.every_schedule(ARCH, kernel, 128, 128, 64)
    searched = kernels.searched_schedules(ARCH, kernel, 128, 128, 64)
    alternatives = kernels.alternatives(ARCH, kernel, 128, 128, 64)
    assert alternatives, "each of these has a hand-written alternative at 128x64"
    assert found == searched + alternatives


class _Phase:
    """A plan's phase whose one step writes `value` to "out" (adding, as dQ does)."""

    def __init__(self, value: float, kernel: str) -> None:
        self.value, self.runs = value, 0
        self._step = SimpleNamespace(kernel=kernel)

    def step(self, name: str) -> SimpleNamespace:
        assert name == "the_step"
        return self._step

    def run_step(self, name: str, env: dict) -> None:
        self.runs += 1
        env["out"] += self.value


def test_each_row_says_its_time_rate_and_distance_from_the_first(capsys):
    phases = [_Phase(1.0, "a"), _Phase(1.0, "b"), _Phase(1.5, "broken"), _Phase(3.0, "c")]
    knobs = [{"n": i} for i in range(4)]
    runs = [{"out": torch.zeros(4)} for _ in range(2)]
    timed = []

    def timer(fn, input_sets, repeats):
        for env, in input_sets:
            fn(env)
        timed.append(repeats)
        return 99.0 if len(timed) == 1 else 2.0  # the first schedule's warm-up: discarded

    def build(kernel):
        if kernel == "broken":
            raise RuntimeError("ptxas error: spills")

    def reset():
        runs[0]["out"].zero_()

    rows = schedule_variants.time_each(knobs, phases, "the_step", "out", runs, 7, 4e9,
                                       before_output=reset, build=build, timer=timer,
                                       rounds=3)
    # The first schedule's warm-up, then three rounds over the three that build.
    assert timed == [7] * (1 + 3 * 3)
    assert [r["knobs"] for r in rows] == knobs
    assert rows[2] == {"knobs": {"n": 2}, "error": "RuntimeError: ptxas error: spills"}
    assert [r["bit_identical_to_first"] for r in rows if "ms" in r] == [True, True, False]
    assert rows[3]["max_abs_diff_to_first"] == 2.0
    assert rows[0]["ms"] == 2.0 and rows[0]["tflops"] == 2.0
    schedule_variants.print_rows(rows, 4.0, "cuDNN")
    out = capsys.readouterr().out.splitlines()
    assert "timing n=0 (kernel ready in" in out[0]
    broken = out[-2].split()
    assert broken[0] == "n=2" and broken[1:] == "RuntimeError: ptxas error: spills".split()
    assert "( 50% of cuDNN) =first (max diff 0.00e+00)" in out[-4]
    assert "~first (max diff 2.00e+00)" in out[-1]


def test_a_bandwidth_report_reads_rates_as_tb_per_s_and_writes_them(capsys, tmp_path):
    rows = [dict(knobs={"loads": "tma"}, ms=0.35, tflops=1.72, bit_identical_to_first=True,
                 max_abs_diff_to_first=0.0),
            dict(knobs={"loads": "staged"}, error="RuntimeError: spills")]
    out = tmp_path / "r.json"
    args = argparse.Namespace(out=str(out), length=1000)
    schedule_variants.bandwidth_report(rows, args, 6e8)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["loads=tma", "0.350", "ms", "1.72", "TB/s", "=first", "(max",
                                "diff", "0.00e+00)"]
    assert lines[1].split() == ["loads=staged", "RuntimeError:", "spills"]
    written = json.loads(out.read_text())
    assert written["bytes_moved"] == 6e8 and written["args"]["length"] == 1000
    assert written["schedules"][0]["tb_per_s"] == 1.72 and "tflops" not in written["schedules"][0]
    assert "environment" in written


def test_query_pass_bytes_count_six_tiles_per_query_block():
    # L=1000 in 128-row blocks: 8 query blocks (the last one partial, moved whole).
    assert query_pass_variants.query_pass_bytes(2, 3, 1000, 64, 128) == 2 * 3 * 8 * 6 * 128 * 64 * 2


def test_key_pass_bytes_count_keys_values_and_each_blocks_states():
    # L=1000 in 64-key blocks: 16 key blocks; h_j only where "marginal" keeps it per block.
    kv = 2 * 2 * 3 * 1000 * 64 * 2
    blocks = 2 * 3 * 16
    assert key_pass_variants.key_pass_bytes(2, 3, 1000, 64, 64, True) == (
        kv + blocks * (64 * 64 * 2 + 64 * 4))
    assert key_pass_variants.key_pass_bytes(2, 3, 1000, 64, 64, False) == kv + blocks * 64 * 4


def test_knob_settings_parse_to_a_schedule():
    settings = [schedule_variants.knob_setting(text) for text in
                ("backward_query.loads=tma", "forward.num_stages=3",
                 "backward_dkdv.linear_first=false")]
    assert schedule_variants.schedule_of(settings) == {
        "backward_query": {"loads": "tma"}, "forward": {"num_stages": 3},
        "backward_dkdv": {"linear_first": False}}


@pytest.mark.parametrize("text", ["loads=tma", "backward_query.loads", "backward_query.=x",
                                  ".loads=tma", "backward_query.loads="])
def test_a_malformed_knob_setting_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="KERNEL.KNOB=VALUE"):
        schedule_variants.knob_setting(text)


def test_schedules_are_timed_in_interleaved_rounds_and_take_their_median():
    phases = [_Phase(1.0, "a"), _Phase(1.0, "b")]
    runs = [{"out": torch.zeros(1)}]
    order, readings = [], iter([9.0, 5.0, 4.0, 1.0, 6.0, 2.0, 5.0])

    def timer(fn, input_sets, repeats):
        before = [p.runs for p in phases]
        fn(*input_sets[0])
        order.append(next(i for i, p in enumerate(phases) if p.runs > before[i]))
        return next(readings)

    rows = schedule_variants.time_each([{"n": 0}, {"n": 1}], phases, "the_step", "out", runs,
                                       3, 1e9, build=lambda kernel: None, timer=timer,
                                       rounds=3)
    assert order == [0, 0, 1, 0, 1, 0, 1]  # a warm-up, then rounds of both
    assert [r["ms"] for r in rows] == [2.0, 5.0]  # medians of (5, 1, 2) and (4, 6, 5)
