"""`sla_tl.tune`: search, store, report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import tilelang
import torch

from sla_tl import config_store, kernel_cache, kernels, spec
from sla_tl.config_store import Entry, TuneKey

from .candidates import Candidate, build_candidates
from .measure import calibration_inputs, error_against_full, schedule_timer, settings_of
from .storage import open_storage
from .study import AlgorithmResult, ScheduleResult, tune_algorithm, tune_schedule

ARCH_NAMES = {"sm90": "sm_90a", "sm_90": "sm_90a", "sm_90a": "sm_90a"}
ALGORITHM_KNOBS = ("topk", "k_low", "block_q", "block_kv", "feature_map")
WAN_1_3B = (1, 12, 32760, 128)


class TuneReport(NamedTuple):
    """What tuning one shape found."""

    key: TuneKey
    candidates: list[Candidate]
    schedule: ScheduleResult | None
    """None with compile_only, or when no algorithm setting met the error budget."""
    algorithm: AlgorithmResult | None


def normalise_arch(arch: str) -> str:
    """TileLang's arch for a user's arch name ("sm90" -> "sm_90a")."""
    if arch not in ARCH_NAMES:
        raise ValueError(f"arch must be one of {sorted(ARCH_NAMES)} (Hopper); got {arch!r}")
    return ARCH_NAMES[arch]


def _gpu_for_timing(arch: str, user_arch: str) -> str:
    """The GPU in hand, which must be the arch asked for."""
    if not torch.cuda.is_available():
        raise ValueError(f"cannot time kernels for arch={user_arch!r}: no CUDA GPU is visible. "
                         "Pass compile_only=True to compile and prune the search space only.")
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if kernels.SUPPORTED_ARCHS.get(capability) != arch:
        raise ValueError(f"cannot time kernels for arch={user_arch!r} on {name} "
                         f"(sm_{capability[0]}{capability[1]}); tune on a GPU of that arch, or "
                         "pass compile_only=True")
    kernel_cache.prepare(device)
    return name


def _shape(shape: Sequence[int]) -> tuple[int, int, int, int, int]:
    """(B, H, Lq, Lk, D) from (B, H, L, D) or (B, H, Lq, Lk, D)."""
    if len(shape) == 4:
        b, h, length, d = shape
        return b, h, length, length, d
    if len(shape) == 5:
        return tuple(shape)
    raise ValueError(f"a shape is (B, H, L, D) or (B, H, Lq, Lk, D); got {tuple(shape)}")


def tune(
    arch: str = "sm90",
    shapes: Sequence[Sequence[int]] | None = None,
    trials: int = 30,
    storage: str | None = None,
    error_budget: float | None = None,
    *,
    dtype: str = "bfloat16",
    topk: float = 0.05,
    k_low: float = 0.0,
    block_q: int = 128,
    block_kv: int = 64,
    feature_map: str = "softmax",
    linear: str = "marginal",
    layout: str = "bhsd",
    mode: str = "fwd+bwd",
    search_algorithm: Mapping[str, Sequence] | None = None,
    calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    compile_only: bool = False,
    gpu: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    seed: int = 0,
) -> list[TuneReport]:
    """Tune the kernels for each shape and store the best schedules for the operators.

    Schedule knobs (stages, threads, tiles inside a block, ...) are searched by measured
    latency of `mode` ("fwd" or "fwd+bwd") with the algorithm knobs pinned as given.
    With `search_algorithm` (e.g. {"topk": [0.03, 0.05, 0.1], "block_kv": [64, 128]}) the
    algorithm knobs named there are first searched as a two-objective study (latency, error
    against full attention on `calibration` q, k, v or on structured synthetic ones), and
    the fastest point of the Pareto front within `error_budget` is then schedule-tuned.

    Every candidate schedule is compiled first and pruned if it fails, spills or overflows
    shared memory. `compile_only=True` stops there: no GPU is needed, and the kernels land
    in the kernel cache of `gpu` (a GPU model name) when given.

    Studies live in `storage` (an SQLAlchemy URL; default SQLite under the cache
    directory): a study interrupted and run again resumes, and several processes may work
    on one study. Shapes default to Wan2.1-1.3B's attention, (1, 12, 32760, 128).
    """
    arch_name = normalise_arch(arch)
    if search_algorithm is not None:
        unknown = set(search_algorithm) - set(ALGORITHM_KNOBS)
        if unknown:
            raise ValueError(f"search_algorithm knobs must be among {ALGORITHM_KNOBS}; "
                             f"got {sorted(unknown)}")
        if error_budget is None:
            raise ValueError("search_algorithm needs an error_budget (relative error)")
    if trials < 1:
        raise ValueError(f"trials must be >= 1; got {trials}")
    if compile_only:
        if gpu:
            kernel_cache.use_gpu_model(gpu)
        gpu_name = gpu or ""
    else:
        gpu_name = _gpu_for_timing(arch_name, arch)
    study_storage = None if compile_only else open_storage(storage)

    reports = []
    for shape in shapes or [WAN_1_3B]:
        b, h, lq, lk, d = _shape(shape)
        if d not in spec.HEAD_DIMS:
            raise ValueError(f"head dim must be one of {spec.HEAD_DIMS}; got {d}")
        key = TuneKey(gpu_name, arch_name, tilelang.__version__, b, h, lq, lk, d, dtype,
                      block_q, block_kv, topk, k_low, feature_map, linear, layout)
        algorithm = None
        if search_algorithm is not None and not compile_only:
            algorithm = _search_algorithm(key, search_algorithm, mode, calibration, trials,
                                          study_storage, error_budget, seed, progress)
            if algorithm.chosen is None:
                reports.append(TuneReport(key, [], None, algorithm))
                continue
            key = key._replace(**algorithm.chosen.knobs)
        candidates = build_candidates(d, dtype, settings_of(key), arch_name,
                                      backward=mode == "fwd+bwd", workers=workers,
                                      progress=progress)
        if compile_only:
            reports.append(TuneReport(key, candidates, None, algorithm))
            continue
        result = tune_schedule(key, candidates, schedule_timer(key, mode, seed=seed), trials,
                               study_storage, seed, progress)
        config_store.active_store().record(
            Entry(key, result.best, result.best_ms, result.default_ms, result.complete))
        reports.append(TuneReport(key, candidates, result, algorithm))
    return reports


def _search_algorithm(key: TuneKey, space: Mapping[str, Sequence], mode: str,
                      calibration: tuple | None, trials: int, storage, error_budget: float,
                      seed: int, progress: bool) -> AlgorithmResult:
    q, k, v = calibration if calibration is not None else calibration_inputs(key, seed)
    searched = {name: "searched" for name in space}
    name = "algorithm|" + key._replace(**searched).study_name()

    def timer(knobs: dict) -> float:
        return schedule_timer(key._replace(**knobs), mode, seed=seed)({})

    def error(knobs: dict) -> float:
        return error_against_full(q, k, v, key, knobs)

    return tune_algorithm(name, space, timer, error, trials, storage, error_budget, seed,
                          progress)
