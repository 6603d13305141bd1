"""The tuner refuses a speed-only candidate whose outputs are not the default schedule's bit
for bit: the comparison itself, the study's handling with a fake runner, and the tune and
command line around it (algorithm knobs are never held to bit identity)."""

from __future__ import annotations

import math

import optuna
import pytest
import torch

from sla_tl import cli, tilelang_backend
from sla_tl.autotune import api, measure
from sla_tl.autotune.bit_identity import REFUSED, IdentityGate, difference
from sla_tl.autotune.candidates import Candidate, label
from sla_tl.autotune.measure import ScheduleMeasurement
from sla_tl.autotune.storage import open_storage
from sla_tl.autotune.study import create_study, tune_schedule
from sla_tl.settings import ForwardOutputs, Settings

from .autotune_workers import KEY

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _outputs(seed: int) -> dict[str, torch.Tensor]:
    """Fresh random outputs of a fake call, in the dtypes the kernels write."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "out": torch.randn(2, 3, 70, 64, generator=generator).bfloat16(),
        "lse": torch.randn(2, 3, 70, generator=generator),
        "dq": torch.randn(2, 3, 70, 64, generator=generator).half(),
    }


def _copy(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in outputs.items()}


def _one_ulp_up(t: torch.Tensor) -> torch.Tensor:
    """`t` with every element moved to the next representable value above it."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


# --- the comparison ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_bits_are_identical(seed):
    reference = _outputs(seed)
    assert difference(reference, _copy(reference)) is None


def test_one_last_place_in_one_element_is_found_with_its_size():
    reference = _outputs(3)
    candidate = _copy(reference)
    flat = candidate["out"].view(-1)
    flat[17] = _one_ulp_up(flat[17])
    ulp = (flat[17].double() - reference["out"].view(-1)[17].double()).abs().item()
    found = difference(reference, candidate)
    assert found == (f"out differs, max |diff| {ulp:.3g} in 1 of {flat.numel()} elements")
    assert ulp > 0


def test_the_first_differing_output_is_described_and_the_others_named():
    reference = _outputs(4)
    candidate = _copy(reference)
    candidate["lse"] = _one_ulp_up(candidate["lse"])
    candidate["dq"][0, 0, 0, 0] += 1.0
    found = difference(reference, candidate)
    assert found.startswith("lse differs, max |diff| ")
    assert f"in {reference['lse'].numel()} of {reference['lse'].numel()} elements" in found
    assert found.endswith("; also dq")


def test_bits_not_values_are_compared():
    reference = _outputs(5)
    reference["lse"][0, 0, :4] = math.nan  # an unwritten (poisoned) region, in both runs
    assert difference(reference, _copy(reference)) is None  # torch.equal would say differs

    signed = _copy(reference)
    reference["out"][1, 2, 3, 4] = 0.0
    signed["out"][1, 2, 3, 4] = -0.0  # equal as values, different bits
    assert difference(reference, signed).startswith("out differs, max |diff| 0 in 1 of ")


@pytest.mark.parametrize("change,expected", [
    (lambda o: o.update(out=o["out"].float()), "out differs in shape or dtype"),
    (lambda o: o.update(lse=o["lse"][:, :, :-1]), "lse differs in shape or dtype"),
    (lambda o: o.pop("dq"), "outputs differ by name (missing: ['dq'], unexpected: [])"),
    (lambda o: o.update(dk=o["dq"]), "outputs differ by name (missing: [], unexpected: ['dk'])"),
])
def test_outputs_of_another_shape_dtype_or_name_differ(change, expected):
    reference = _outputs(6)
    candidate = _copy(reference)
    change(candidate)
    assert difference(reference, candidate).startswith(expected)


# --- a call's outputs (the GPU backend faked) ---------------------------------------------

class HalfWritingBackend:
    """Allocates buffers full of stale random bits and writes only the first half of `out`
    and of dk, as a kernel that skips part of its output would."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(9)

    def forward(self, q, k, v, routing, weight, bias, s, schedule, buffers=None):
        def stale(*shape, dtype=torch.bfloat16):
            return torch.randn(*shape, generator=self.generator).to(dtype)
        if buffers is None:
            return ForwardOutputs(stale(*q.shape), stale(*q.shape[:3], dtype=torch.float32),
                                  stale(*q.shape), stale(1, 2, 3, 8, 8), stale(1, 2, 3, 8))
        outputs = ForwardOutputs(**buffers)
        outputs.out[..., :4] = q[..., :4]
        for t in outputs[1:]:
            t.fill_(0.5)
        return outputs

    def backward(self, grad, q, k, v, saved, routing, weight, bias, s, schedule, buffers):
        assert saved.out[..., 4:].isnan().all()  # the backward reads the poisoned buffers
        dq, dk, dv = buffers["dq"], buffers["dk"], buffers["dv"]
        dq.copy_(grad)
        dk[..., :4] = 1.0
        dv.fill_(2.0)
        return dq, dk, dv, torch.ones(8, 8), torch.ones(8), None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_a_calls_outputs_are_every_tensor_in_poisoned_buffers(monkeypatch, mode):
    backend = HalfWritingBackend()
    for name in ("forward", "backward"):
        monkeypatch.setattr(tilelang_backend, name, getattr(backend, name))
    generator = torch.Generator().manual_seed(10)
    q, k, v, grad = (torch.randn(1, 2, 40, 8, generator=generator).bfloat16()
                     for _ in range(4))
    inputs = (q, k, v, grad, None, torch.zeros(8, 8), torch.zeros(8))
    s = Settings(block_q=64, block_kv=64)
    first = measure._call_outputs(inputs, s, mode, {})
    names = ["out", "lse", "linear", "h_rows", "z_rows"]
    if mode == "fwd+bwd":
        names += ["dq", "dk", "dv", "d_weight", "d_bias"]
        assert first["dk"][..., 4:].isnan().all() and torch.equal(first["dq"], grad)
    assert list(first) == names
    assert first["out"][..., 4:].isnan().all() and torch.equal(first["out"][..., :4], q[..., :4])
    # Stale memory would differ from run to run; the poisoned buffers never do.
    assert difference(first, measure._call_outputs(inputs, s, mode, {})) is None


# --- the gate -----------------------------------------------------------------------------

DEFAULT = {"forward": {"num_stages": 2}, "backward_dkdv": {"q_slice": 64}}


class FakeRunner:
    """Outputs of a fake call: the default's bits, except one ulp up in `out` for the
    forward's num_stages=4 and in `dq` for dK/dV's q_slice=16. Records every run."""

    def __init__(self, seed: int = 7) -> None:
        self.reference = _outputs(seed)
        self.runs: list[dict] = []

    def __call__(self, schedule: dict) -> dict[str, torch.Tensor]:
        self.runs.append(schedule)
        outputs = _copy(self.reference)
        if schedule["forward"]["num_stages"] == 4:
            outputs["out"] = _one_ulp_up(outputs["out"])
        if schedule["backward_dkdv"]["q_slice"] == 16:
            outputs["dq"][0, 1, 2, 3] = _one_ulp_up(outputs["dq"][0, 1, 2, 3])
        return outputs


def test_the_gate_refuses_a_differing_candidate_and_checks_each_once():
    runner = FakeRunner()
    gate = IdentityGate(DEFAULT, runner)
    assert runner.runs == [DEFAULT, DEFAULT]  # the reference, and that it reproduces
    assert gate.refusal("forward", {"num_stages": 2}) is None  # the default is never run
    assert gate.refusal("forward", {"num_stages": 1}) is None
    reason = gate.refusal("forward", {"num_stages": 4})
    assert reason.startswith(f"{REFUSED}: out differs, max |diff| ")
    assert gate.refusal("backward_dkdv", {"q_slice": 16}).startswith(
        f"{REFUSED}: dq differs, max |diff| ")
    assert gate.refusal("forward", {"num_stages": 4}) == reason
    assert gate.refusal("forward", {"num_stages": 1}) is None
    # Each candidate ran once, alone, with the other kernel at its default.
    assert runner.runs[2:] == [{**DEFAULT, "forward": {"num_stages": 1}},
                               {**DEFAULT, "forward": {"num_stages": 4}},
                               {**DEFAULT, "backward_dkdv": {"q_slice": 16}}]


def test_a_default_that_does_not_reproduce_itself_is_an_error():
    generator = torch.Generator().manual_seed(8)

    def unstable(schedule: dict) -> dict[str, torch.Tensor]:
        return {"out": torch.randn(64, generator=generator), "lse": torch.zeros(8)}

    with pytest.raises(RuntimeError, match=r"default schedule does not give the same outputs "
                                           r"twice .*\(out differs, max \|diff\|"):
        IdentityGate(DEFAULT, unstable)


# --- the study ----------------------------------------------------------------------------

CANDIDATES = [
    Candidate("forward", {"num_stages": 2}, None),  # the default comes first
    Candidate("forward", {"num_stages": 1}, None),
    Candidate("forward", {"num_stages": 4}, None),  # fastest, but changes `out`
    Candidate("forward", {"num_stages": 3}, "spills registers"),
    Candidate("backward_dkdv", {"q_slice": 64}, None),
    Candidate("backward_dkdv", {"q_slice": 32}, None),
    Candidate("backward_dkdv", {"q_slice": 16}, None),  # fastest, but changes `dq`
]
COSTS = {("forward", 2): 3.0, ("forward", 1): 1.5, ("forward", 4): 0.5,
         ("backward_dkdv", 64): 1.0, ("backward_dkdv", 32): 0.5, ("backward_dkdv", 16): 0.1}


class FakeTimer:
    """Known latencies; records what it times."""

    def __init__(self) -> None:
        self.timed: list[dict] = []

    def __call__(self, schedule: dict) -> float:
        self.timed.append(schedule)
        return (COSTS[("forward", schedule["forward"]["num_stages"])]
                + COSTS[("backward_dkdv", schedule["backward_dkdv"]["q_slice"])])


def _enqueue(storage, *picks: tuple[int, int]) -> None:
    """Queue trials of (num_stages, q_slice) ahead of the study's own."""
    study = create_study(KEY.study_name(), storage)
    for stages, q_slice in picks:
        study.enqueue_trial({"forward": label({"num_stages": stages}),
                             "backward_dkdv": label({"q_slice": q_slice})})


@pytest.fixture
def storage(tmp_path):
    return open_storage(f"sqlite:///{tmp_path / 'studies.db'}")


def test_a_refused_candidate_is_pruned_never_timed_and_reported(storage):
    # Each refused candidate is picked more than once: checked once, and never timed.
    _enqueue(storage, (4, 64), (4, 32), (2, 16), (4, 64), (1, 16), (1, 32))
    timer, runner = FakeTimer(), FakeRunner()
    result = tune_schedule(KEY, CANDIDATES, timer, runner, 20, storage)

    assert all(s["forward"]["num_stages"] != 4 and s["backward_dkdv"]["q_slice"] != 16
               for s in timer.timed)
    assert result.best == {"forward": {"num_stages": 1}, "backward_dkdv": {"q_slice": 32}}
    assert result.best_ms == pytest.approx(2.0)
    assert result.default_ms == pytest.approx(4.0)
    assert result.failed == 0
    assert [(r.kernel, r.candidate) for r in result.refused] == [
        ("backward_dkdv", "q_slice=16"), ("forward", "num_stages=4")]
    assert result.refused[0].reason.startswith(f"{REFUSED}: dq differs, max |diff| ")
    assert result.refused[1].reason.startswith(f"{REFUSED}: out differs, max |diff| ")

    checked = [label(s[kernel]) for s in runner.runs[2:] for kernel in s
               if s[kernel] != DEFAULT[kernel]]
    assert sorted(checked) == ["num_stages=1", "num_stages=4", "q_slice=16", "q_slice=32"]
    assert all(s != {**DEFAULT, "forward": {"num_stages": 3}} for s in runner.runs)

    trials = optuna.load_study(study_name=KEY.study_name(), storage=storage).trials
    refused = [t for t in trials if "refused" in t.user_attrs]
    assert len(refused) >= 4 and all(t.state == optuna.trial.TrialState.PRUNED
                                     for t in refused)
    first = trials[0]  # (4, 64): the forward's candidate is refused
    assert first.user_attrs["pruned"] == f"forward: {result.refused[1].reason}"


def test_a_resumed_study_reports_earlier_refusals_and_checks_again(storage):
    forward_refused = [c for c in CANDIDATES if c.knobs != {"q_slice": 16}]
    _enqueue(storage, (4, 64))
    tune_schedule(KEY, forward_refused, FakeTimer(), FakeRunner(), 3, storage)
    timer, runner = FakeTimer(), FakeRunner()
    _enqueue(storage, (4, 32))
    resumed = tune_schedule(KEY, forward_refused, timer, runner, 5, storage)
    assert [(r.kernel, r.candidate) for r in resumed.refused] == [("forward", "num_stages=4")]
    assert {**DEFAULT, "forward": {"num_stages": 4}} in runner.runs  # a new run checks anew
    assert all(s["forward"]["num_stages"] != 4 for s in timer.timed)


def test_a_finished_study_runs_nothing(storage):
    first = tune_schedule(KEY, CANDIDATES, FakeTimer(), FakeRunner(), 4, storage)

    def must_not_run(schedule: dict) -> float:
        raise AssertionError("a finished study ran a schedule")

    again = tune_schedule(KEY, CANDIDATES, must_not_run, must_not_run, 4, storage)
    assert again.best_ms == first.best_ms and again.complete == first.complete


def test_no_refusal_when_every_candidate_is_identical(storage):
    runner = FakeRunner()
    same = [c for c in CANDIDATES if c.knobs not in ({"num_stages": 4}, {"q_slice": 16})]
    _enqueue(storage, (1, 32))
    result = tune_schedule(KEY, same, FakeTimer(), runner, 12, storage)
    assert result.refused == [] and result.failed == 0
    assert result.best_ms == pytest.approx(2.0)
    assert runner.runs[2:] == [{**DEFAULT, "forward": {"num_stages": 1}},
                               {**DEFAULT, "backward_dkdv": {"q_slice": 32}}]


# --- the tune and the command line --------------------------------------------------------

SHAPE = (1, 2, 256, 64)
FAKE_CANDIDATES = [
    Candidate("key_pass", {"group": 8}, None),
    Candidate("key_pass", {"group": 4}, None),
    Candidate("forward", {"num_stages": 2, "warp_specialization": "auto"}, None),
    Candidate("forward", {"num_stages": 1, "warp_specialization": "auto"}, None),
    Candidate("forward", {"num_stages": 3, "warp_specialization": "auto"}, None),
]
FAST_BUT_DIFFERENT = {"num_stages": 1, "warp_specialization": "auto"}


def _fake_measurement(key, mode="fwd+bwd", seed=0, **_):
    """Outputs that depend on the algorithm knobs (topk) as real ones do; among schedules,
    only the forward's FAST_BUT_DIFFERENT changes them. Faster with a smaller topk."""
    base = _outputs(int(key.topk * 1000))

    def outputs(schedule: dict) -> dict[str, torch.Tensor]:
        got = _copy(base)
        if schedule.get("forward") == FAST_BUT_DIFFERENT:
            got["out"] = _one_ulp_up(got["out"])
        return got

    def timer(schedule: dict) -> float:
        forward = schedule.get("forward", {})
        return key.topk * 10 + (0.1 if forward == FAST_BUT_DIFFERENT else 1.0) + (
            0.5 if forward.get("num_stages") == 3 else 0.0)

    return ScheduleMeasurement(timer, outputs)


@pytest.fixture
def fake_gpu(monkeypatch, tmp_path):
    """`tune` on CPU: a named GPU, fake candidates, measurements and calibration error."""
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(api, "_gpu_for_timing", lambda arch, user_arch: "Test GPU")
    monkeypatch.setattr(api, "build_candidates", lambda *args, **kw: FAKE_CANDIDATES)
    monkeypatch.setattr(api, "schedule_measurement", _fake_measurement)
    monkeypatch.setattr(api, "calibration_inputs", lambda key, seed: (None, None, None))
    # Denser is more accurate: 0.3 / (topk * 100).
    monkeypatch.setattr(api, "error_against_full",
                        lambda q, k, v, key, knobs: 0.3 / (knobs["topk"] * 100))


def test_algorithm_knobs_are_held_to_the_budget_not_to_bit_identity(fake_gpu):
    [report] = api.tune("sm90", shapes=[SHAPE], trials=12, block_q=64, block_kv=64,
                        topk=0.05, mode="fwd", search_algorithm={"topk": [0.02, 0.05, 0.1]},
                        error_budget=0.05, progress=False)
    # Only topk=0.1 meets the budget (errors 0.15, 0.06, 0.03): it is chosen although every
    # output differs from the pinned topk=0.05's.
    assert report.algorithm.chosen.knobs == {"topk": 0.1}
    assert report.key.topk == 0.1
    # The schedule study compares with the default schedule at the chosen knobs: only the
    # schedule that changes the bits there is refused.
    result = report.schedule
    assert [(r.kernel, r.candidate) for r in result.refused] == [
        ("forward", label(FAST_BUT_DIFFERENT))]
    assert result.best["forward"] == {"num_stages": 2, "warp_specialization": "auto"}
    assert result.best_ms == pytest.approx(0.1 * 10 + 1.0)


def test_sla_tl_tune_prints_the_refused_candidates(fake_gpu, capsys):
    assert cli.main(["tune", "--shape", ",".join(map(str, SHAPE)), "--trials", "8",
                     "--block-q", "64", "--block-kv", "64", "--mode", "fwd"]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    refused = [line for line in lines if line.startswith("refused ")]
    assert len(refused) == 1, lines
    assert refused[0].startswith(f"refused forward {label(FAST_BUT_DIFFERENT)}: {REFUSED}: "
                                 "out differs, max |diff| "), refused
