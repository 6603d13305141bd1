"""The Optuna studies: schedule knobs by latency, algorithm knobs by latency and error.

Timing, outputs and error are injected (`Timer`, `bit_identity.Outputs`, `ErrorFn`), so the
study logic runs and is tested without a GPU; `autotune.measure` provides the real ones.
"""

from __future__ import annotations

import math
import os
import socket
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import optuna

from sla_tl.config_store import TuneKey

from .bit_identity import IdentityGate, Outputs, Refusal
from .candidates import Candidate, label

Timer = Callable[[dict], float]
"""Milliseconds of one call run with a schedule ({kernel: knobs})."""

ErrorFn = Callable[[dict], float]
"""Relative error against full attention of a call with given algorithm knobs."""

STATES_DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class ScheduleResult(NamedTuple):
    """The outcome of a schedule study."""

    key: TuneKey
    best: dict
    """{kernel: knobs} of the fastest complete trial."""
    best_ms: float
    default_ms: float | None
    """Latency of the all-defaults schedule, timed in the same study (None if it never ran)."""
    complete: int
    pruned: int
    """Trials pruned, refused ones included."""
    failed: int
    refused: list[Refusal]
    """Candidates refused as not bit-identical to the default (by any worker of the study)."""


def _choices(candidates: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    by_kernel: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_kernel.setdefault(c.kernel, []).append(c)
    return by_kernel


def create_study(name: str, storage: optuna.storages.BaseStorage, seed: int | None = 0,
                 directions: Sequence[str] = ("minimize",)) -> optuna.Study:
    """Open the study `name`, or create it (a resumed study keeps its finished trials)."""
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if len(directions) > 1:
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler,
                               directions=list(directions), load_if_exists=True)


_DEFAULT_SCHEDULED = (optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING,
                      *STATES_DONE)


def _default_scheduled(study: optuna.Study) -> bool:
    """Whether the all-defaults trial is done, queued or running (by a live worker)."""
    return any(t.user_attrs.get("default")
               for t in study.get_trials(deepcopy=False, states=_DEFAULT_SCHEDULED))


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=STATES_DONE))


def tune_schedule(key: TuneKey, candidates: Sequence[Candidate], timer: Timer,
                  outputs: Outputs, trials: int, storage: optuna.storages.BaseStorage,
                  seed: int | None = 0, progress: bool = False) -> ScheduleResult:
    """Search schedule knobs for `key` until the study holds `trials` finished trials.

    The first trial of a new study is the all-defaults schedule; a resumed study whose
    default trial was killed times it again. A trial that picks a pruned candidate is
    pruned before anything is timed, and so is one that picks a candidate whose `outputs`
    are not the default schedule's bit for bit (refused, and remembered as such for the
    rest of the run); a trial whose timing raises is recorded as failed and the study goes
    on.
    """
    by_kernel = _choices(candidates)
    study = create_study(key.study_name(), storage, seed)
    # Trials of a killed worker stop sending heartbeats: fail them now (the storage's
    # callback queues each again), so that none stays RUNNING and a killed default is
    # timed again.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if not _default_scheduled(study):
        study.enqueue_trial({kernel: cs[0].label for kernel, cs in by_kernel.items()},
                            user_attrs={"default": True})
    if _finished(study) < trials:
        gate = IdentityGate({kernel: cs[0].knobs for kernel, cs in by_kernel.items()}, outputs)
        _optimize(study, _schedule_objective(by_kernel, gate, timer), trials, progress)
    return _schedule_result(key, study, by_kernel)


def _schedule_objective(by_kernel: Mapping[str, list[Candidate]], gate: IdentityGate,
                        timer: Timer) -> Callable[[optuna.Trial], float]:
    """A trial: pick a candidate per kernel, prune what cannot run or is refused, time."""
    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        schedule = {}
        for kernel, cs in by_kernel.items():
            chosen = trial.suggest_categorical(kernel, [c.label for c in cs])
            candidate = next(c for c in cs if c.label == chosen)
            if candidate.pruned:
                trial.set_user_attr("pruned", f"{kernel}: {candidate.pruned}")
                raise optuna.TrialPruned(f"{kernel} {chosen}: {candidate.pruned}")
            schedule[kernel] = dict(candidate.knobs)
        # Only once every pick compiled: each check runs kernels on the GPU.
        for kernel, knobs in schedule.items():
            reason = gate.refusal(kernel, knobs)
            if reason is not None:
                trial.set_user_attr("pruned", f"{kernel}: {reason}")
                trial.set_user_attr("refused", [kernel, label(knobs), reason])
                raise optuna.TrialPruned(f"{kernel} {label(knobs)}: {reason}")
        latency = timer(schedule)
        if not math.isfinite(latency) or latency <= 0:
            raise ValueError(f"timer returned {latency!r}")
        return latency

    return objective


def _optimize(study: optuna.Study, objective: Callable, trials: int, progress: bool) -> None:
    """Run trials until the study holds `trials` finished ones, counting those of other
    workers on the same study (each worker may overshoot by the trial it is running)."""
    remaining = max(0, trials - _finished(study))
    if remaining:
        stop = optuna.study.MaxTrialsCallback(trials, states=STATES_DONE)
        study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[stop],
                       show_progress_bar=progress)


def _schedule_result(key: TuneKey, study: optuna.Study,
                     by_kernel: Mapping[str, list[Candidate]]) -> ScheduleResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        reasons = sorted({t.user_attrs["pruned"] for t in trials if "pruned" in t.user_attrs})
        raise RuntimeError(f"no trial of study {key.study_name()!r} completed: "
                           f"{len(trials)} trials; pruned for: {reasons or 'none'}; failed "
                           "ones are logged by Optuna and kept in the study storage")
    best = min(complete, key=lambda t: t.value)
    defaults = [t for t in complete if t.user_attrs.get("default")]

    def knobs(kernel: str, chosen: str) -> dict:
        return dict(next(c.knobs for c in by_kernel[kernel] if c.label == chosen))

    return ScheduleResult(
        key=key,
        best={kernel: knobs(kernel, chosen) for kernel, chosen in best.params.items()},
        best_ms=best.value,
        default_ms=defaults[0].value if defaults else None,
        complete=len(complete),
        pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        failed=sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        refused=_refusals(trials),
    )


def _refusals(trials: Sequence[optuna.trial.FrozenTrial]) -> list[Refusal]:
    """Each refused candidate once, with the first reason recorded for it."""
    found: dict[tuple[str, str], Refusal] = {}
    for t in trials:
        if "refused" in t.user_attrs:
            refusal = Refusal(*t.user_attrs["refused"])
            found.setdefault(refusal[:2], refusal)
    return sorted(found.values())


class AlgorithmPoint(NamedTuple):
    """One evaluated setting of the algorithm knobs."""

    knobs: dict
    latency_ms: float
    error: float


class AlgorithmResult(NamedTuple):
    """The Pareto front of (latency, error), and its fastest point within the error budget."""

    front: list[AlgorithmPoint]
    chosen: AlgorithmPoint | None
    """None when no point meets the budget."""


def tune_algorithm(name: str, space: Mapping[str, Sequence], timer: Callable[[dict], float],
                   error_fn: ErrorFn, trials: int, storage: optuna.storages.BaseStorage,
                   error_budget: float, seed: int = 0,
                   progress: bool = False) -> AlgorithmResult:
    """Multi-objective search of algorithm knobs (`space`: knob -> choices), minimising the
    latency `timer(knobs)` and the error `error_fn(knobs)` together."""
    study = create_study(name, storage, seed, directions=("minimize", "minimize"))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        knobs = {n: trial.suggest_categorical(n, list(choices)) for n, choices in space.items()}
        return timer(knobs), error_fn(knobs)

    _optimize(study, objective, trials, progress)
    # A setting sampled twice appears once, with its first measurement.
    unique = {tuple(sorted(t.params.items())): t for t in reversed(study.best_trials)}
    front = sorted((AlgorithmPoint(dict(t.params), *t.values) for t in unique.values()),
                   key=lambda p: (p.latency_ms, p.error))
    within = [p for p in front if p.error <= error_budget]
    return AlgorithmResult(front, within[0] if within else None)


def schedule_label(schedule: Mapping[str, Mapping]) -> str:
    """One line naming a schedule's knobs, kernel by kernel."""
    return "; ".join(f"{kernel}: {label(dict(knobs))}" for kernel, knobs in schedule.items())
