"""The autotuner on CPU: study logic with an injected timer, storage, pruning, resuming,
concurrent workers on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os

import optuna
import pytest

from sla_tl.autotune import candidates as candidates_module
from sla_tl.autotune.api import tune
from sla_tl.autotune.candidates import build_candidates, enumerate_candidates, prune_reason
from sla_tl.autotune.storage import open_storage
from sla_tl.autotune.study import tune_algorithm, tune_schedule
from sla_tl.schedules.sm90 import SHARED_MEMORY_BYTES
from sla_tl.settings import Settings
from sla_tl.targets import normalise_arch

from . import autotune_workers as workers
from .autotune_workers import CANDIDATES, KEY, synthetic_latency, synthetic_outputs

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


def test_schedule_study_finds_the_optimum_and_times_the_default(sqlite_url):
    result = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, 20,
                           open_storage(sqlite_url))
    assert result.best == {"forward": {"num_stages": 1}, "backward_dkdv": {"q_slice": 32}}
    assert result.best_ms == pytest.approx(2.0)
    assert result.default_ms == pytest.approx(4.0)  # num_stages=2, q_slice=64
    assert result.complete + result.pruned + result.failed == 20
    assert result.pruned >= 1  # pruned picks were reached, and never timed
    assert result.failed == 0


def test_a_failing_trial_does_not_end_the_study(sqlite_url):
    calls = []

    def flaky(schedule: dict) -> float:
        calls.append(schedule)
        if len(calls) == 2:
            raise RuntimeError("launch failed")
        return synthetic_latency(schedule)

    result = tune_schedule(KEY, CANDIDATES, flaky, synthetic_outputs, 10,
                           open_storage(sqlite_url))
    assert result.failed == 1
    assert result.complete + result.pruned == 9  # failed trials do not count as finished


def test_study_round_trips_through_sqlite(sqlite_url):
    result = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, 8,
                           open_storage(sqlite_url))
    loaded = optuna.load_study(study_name=KEY.study_name(), storage=open_storage(sqlite_url))
    complete = [t for t in loaded.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == result.complete
    assert min(t.value for t in complete) == result.best_ms
    assert loaded.trials[0].user_attrs["default"] is True
    assert loaded.trials[0].params == {"forward": "num_stages=2", "backward_dkdv": "q_slice=64"}


def test_interrupted_study_resumes_without_losing_trials(sqlite_url):
    seen = []

    def interrupted(schedule: dict) -> float:
        if len(seen) == 3:
            raise KeyboardInterrupt
        seen.append(schedule)
        return synthetic_latency(schedule)

    with pytest.raises(KeyboardInterrupt):
        tune_schedule(KEY, CANDIDATES, interrupted, synthetic_outputs, 12,
                      open_storage(sqlite_url))
    storage = open_storage(sqlite_url)
    before = optuna.load_study(study_name=KEY.study_name(), storage=storage)
    kept = [(t.number, t.value) for t in before.trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(kept) == 3

    result = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, 12, storage)
    after = optuna.load_study(study_name=KEY.study_name(), storage=storage)
    assert [(t.number, t.value) for t in after.trials
            if t.state == optuna.trial.TrialState.COMPLETE][:3] == kept
    assert result.complete + result.pruned == 12


def _two_workers(url: str, trials: int, rendezvous: str) -> None:
    open_storage(url)  # the schema exists before the workers start
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        totals = pool.starmap(workers.run_worker, [(url, trials, rendezvous, 2)] * 2)
    study = optuna.load_study(study_name=KEY.study_name(), storage=open_storage(url))
    finished = [t for t in study.trials if t.state.is_finished()]
    # Each worker stops once the study holds `trials` finished trials; one may overshoot
    # by the trial it was running.
    assert trials <= len(finished) <= trials + 1, totals
    assert len({t.user_attrs["worker"] for t in finished if "worker" in t.user_attrs}) == 2
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    # The worker that read the study last saw every finished trial, the other's included.
    assert max(totals) == len(finished), totals
    # Each trial holds its own schedule's time (none took another's), and the result read
    # from the shared study is the best of both workers' trials. (Whether 16 sampled trials
    # reach the optimum depends on how the workers interleave: the single-process test
    # checks the search itself.)
    knobs = {(c.kernel, c.label): c.knobs for c in CANDIDATES}
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        schedule = {kernel: knobs[(kernel, chosen)] for kernel, chosen in t.params.items()}
        assert t.value == synthetic_latency(schedule)
    result = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, trials,
                           open_storage(url))
    assert result.complete == len(complete)
    assert result.best_ms == min(t.value for t in complete)


def test_two_processes_share_one_sqlite_study(sqlite_url, tmp_path):
    _two_workers(sqlite_url, 16, str(tmp_path / "rendezvous"))


POSTGRES_ENV = "SLA_TL_TEST_POSTGRES_URL"


def _postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL server: {POSTGRES_ENV} is not set (.ci/run starts one)")
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(url).connect():
            pass
    except Exception as error:  # noqa: BLE001  (any failure to connect means: skip, saying why)
        pytest.skip(f"cannot connect to PostgreSQL at {POSTGRES_ENV}: {error}")
    return url


def test_two_processes_share_one_postgresql_study(tmp_path):
    url = _postgres_url()
    storage = open_storage(url)
    try:
        optuna.delete_study(study_name=KEY.study_name(), storage=storage)
    except KeyError:
        pass
    _two_workers(url, 16, str(tmp_path / "rendezvous"))


def test_algorithm_study_returns_front_and_fastest_point_within_budget(sqlite_url):
    space = {"topk": [0.02, 0.05, 0.1, 0.2], "block_kv": [64, 128]}

    def latency(knobs: dict) -> float:  # denser is slower; bigger blocks are faster
        return knobs["topk"] * 10 / (knobs["block_kv"] / 64)

    def error(knobs: dict) -> float:  # denser is more accurate; bigger blocks are coarser
        return 0.2 / (knobs["topk"] * 100) * (knobs["block_kv"] / 64)

    result = tune_algorithm("algorithm-test", space, latency, error, 30,
                            open_storage(sqlite_url), error_budget=0.05)
    assert result.front, "the Pareto front is never empty"
    for p in result.front:  # no point of the front is dominated by another
        assert not any(o.latency_ms <= p.latency_ms and o.error <= p.error
                       and (o.latency_ms, o.error) != (p.latency_ms, p.error)
                       for o in result.front)
    assert len({tuple(sorted(p.knobs.items())) for p in result.front}) == len(result.front)
    assert result.chosen is not None and result.chosen.error <= 0.05
    within = [p for p in result.front if p.error <= 0.05]
    assert result.chosen.latency_ms == min(p.latency_ms for p in within)


def _fake_compiler(spec) -> tuple[str | None, int | None]:
    knobs = dict(spec.knobs)
    if knobs.get("num_stages") == 3:
        return "RuntimeError: ptxas error: Registers are spilled to local memory", None
    if knobs.get("q_slice") == 32:
        return None, 300 * 1024
    if knobs.get("group") == 16:
        return "RuntimeError: No valid warp partition for T.gemm", None
    return None, 100 * 1024


def test_pruning_marks_failures_before_anything_is_timed():
    s = Settings(block_q=128, block_kv=64)
    found = build_candidates(128, "bfloat16", s, "sm_90a", backward=True,
                             compiler=_fake_compiler, workers=1)
    reasons = {(c.kernel, c.label): c.pruned for c in found}
    assert reasons[("forward", "num_stages=2,warp_specialization=pingpong")] is None
    assert reasons[("forward", "num_stages=3,warp_specialization=pingpong")] == "spills registers"
    assert reasons[("backward_dq", "num_stages=3,warp_specialization=pingpong")] == (
        "spills registers")
    assert reasons[("key_pass", "group=16,stores=overlapped")].startswith("fails to compile")
    # The first candidate of each kernel is its default schedule.
    firsts = {c.kernel: c.knobs for c in reversed(found)}
    assert firsts["forward"] == {"num_stages": 3, "warp_specialization": "manual"}
    assert firsts["backward_dkdv"] == {"num_stages": 2}
    # 128-key blocks keep TileLang's dK/dV, whose 32-row slices the fake compiler overflows.
    wide = build_candidates(128, "bfloat16", Settings(block_q=128, block_kv=128), "sm_90a",
                            backward=True, compiler=_fake_compiler, workers=1)
    reasons = {(c.kernel, c.label): c.pruned for c in wide}
    assert reasons[("backward_dkdv", "linear_first=False,num_stages=2,q_slice=32")].startswith(
        "overflows shared memory")


def test_prune_reasons():
    limit = SHARED_MEMORY_BYTES
    assert prune_reason(None, 1000, limit) is None
    assert prune_reason(None, 228 * 1024, limit).startswith("overflows shared memory")
    assert prune_reason("ptxas: 40 bytes spill stores", None, limit) == "spills registers"
    assert prune_reason("too much shared memory requested", None,
                        limit) == "overflows shared memory"


def test_candidates_cover_the_search_space():
    s = Settings(block_q=128, block_kv=128)
    dkdv = enumerate_candidates("sm_90a", "backward_dkdv", 128, s)
    assert len(dkdv) == len({tuple(sorted(c.items())) for c in dkdv}) == 2 * 2
    assert {c["q_slice"] for c in dkdv} == {32, 64}  # 128-row slices spill at D=128
    # The hand-written dK/dV at D=128 fits one ring (of 4 slices) only.
    hand = enumerate_candidates("sm_90a", "backward_dkdv", 128, Settings(block_q=128, block_kv=64))
    assert hand == [{"num_stages": 2}]
    wide = enumerate_candidates("sm_90a", "backward_dkdv", 64, Settings(block_q=128, block_kv=128))
    assert {c["linear_first"] for c in wide} == {False}
    assert {c["q_slice"] for c in wide} == {32, 64, 128}


def test_real_compile_prunes_a_schedule_that_cannot_be_built():
    """One real candidate, compiled for sm_90a here: with 128-key blocks, dK/dV's linear part
    cannot run before the loop (code there runs on every warp, and 12 warps cannot split
    its 128x128 GEMM)."""
    s = Settings(block_q=64, block_kv=128)
    knobs = {"linear_first": True, "num_stages": 2, "q_slice": 64}
    spec = candidates_module.kernel_spec("backward_dkdv", knobs, 128, "bfloat16", s, "sm_90a")
    reason = prune_reason(*candidates_module._compile_one(spec), SHARED_MEMORY_BYTES)
    assert reason is not None and "No valid warp partition" in reason, reason


def test_real_compile_keeps_a_schedule_that_builds():
    """A small real candidate (the key pass at D=64) compiles and is not pruned."""
    s = Settings(block_q=64, block_kv=64)
    spec = candidates_module.kernel_spec("key_pass", {"group": 4}, 64, "bfloat16", s, "sm_90a")
    error, shared_bytes = candidates_module._compile_one(spec)
    assert error is None and shared_bytes > 0
    assert prune_reason(error, shared_bytes, SHARED_MEMORY_BYTES) is None


def test_tune_refuses_to_time_without_the_gpu_in_hand():
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        tune("sm90", trials=1)
    with pytest.raises(ValueError, match="arch must be one of"):
        normalise_arch("sm80")
    with pytest.raises(ValueError, match="error_budget"):
        tune("sm90", search_algorithm={"topk": [0.05]}, compile_only=True)


def test_a_kernel_with_no_knob_searched_in_the_calls_linear_mode_is_not_tuned():
    """In global mode the key pass's `group` changes rounding (it orders the sum of H), so the
    key pass has nothing to search there; in marginal mode its groups are candidates."""
    marginal = Settings(block_q=128, block_kv=64)
    glob = Settings(block_q=128, block_kv=64, linear="global")
    assert "key_pass" in candidates_module.kernels_searched("sm_90a", 128, "bfloat16", marginal,
                                                            backward=False)
    assert {c["group"] for c in enumerate_candidates("sm_90a", "key_pass", 128, marginal)} == {
        4, 8, 16}
    searched = candidates_module.kernels_searched("sm_90a", 128, "bfloat16", glob,
                                                  backward=False)
    assert "key_pass" not in searched and "forward" in searched
