"""The schedule-variants benchmarks' shared part on the CPU: which schedules they time, in
which order, and what a row says (fake phases and timer: the GPU runs them for real)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from sla_tl import kernels
from sla_tl.benchmarks import schedule_variants

ARCH = "sm_90a"


def _combos(space: dict) -> list[dict]:
    names = sorted(space)
    return [dict(zip(names, values, strict=True))
            for values in itertools.product(*(space[n] for n in names))]


@pytest.mark.parametrize("kernel", ["forward", "backward_dq"])
@pytest.mark.parametrize("dim,block_q,block_kv", [(128, 128, 64), (64, 128, 128), (64, 64, 64)])
def test_the_default_first_then_every_choice_once_then_the_alternatives(kernel, dim, block_q,
                                                                       block_kv):
    found = schedule_variants.schedules(ARCH, kernel, dim, block_q, block_kv)
    default = kernels.default_knobs(ARCH, kernel, dim, block_q, block_kv)
    assert found[0] == {n: default[n] for n in found[0]}
    assert len({tuple(sorted(k.items())) for k in found}) == len(found)
    space = kernels.search_space(ARCH, kernel, dim, block_q, block_kv)
    alternatives = kernels.alternatives(ARCH, kernel, dim, block_q, block_kv)
    assert len(found) == len(_combos(space)) + len(alternatives)
    assert found[len(found) - len(alternatives):] == alternatives


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
        return 2.0

    def build(kernel):
        if kernel == "broken":
            raise RuntimeError("ptxas error: spills")

    def reset():
        runs[0]["out"].zero_()

    rows = schedule_variants.time_each(knobs, phases, "the_step", "out", runs, 7, 4e9,
                                       before_output=reset, build=build, timer=timer)
    assert timed == [7, 7, 7]
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
