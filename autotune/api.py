"""`sla_tl.tune`: search, store, report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import tilelang
import torch

from sla_tl import config_store, kernel_cache, spec
from sla_tl.config_store import Entry, TuneKey
from sla_tl.schedules import archs
from sla_tl.schedules.archs import Arch
from sla_tl.targets import arch_named, check_kernel_sizes, model_slug
from sla_tl.validation import (
    KERNEL_DTYPE_NAMES,
    check_choice,
    check_positive_int,
    check_qkv,
    check_ratio,
    is_finite_positive,
)

from .candidates import Candidate, build_candidates
from .measure import (
    MODES,
    calibration_inputs,
    error_against_full,
    schedule_measurement,
    settings_of,
)
from .storage import open_storage
from .study import AlgorithmResult, ScheduleResult, tune_algorithm, tune_schedule

ALGORITHM_KNOBS = ("topk", "k_low", "block_q", "block_kv", "feature_map")
WAN_1_3B = (1, 12, 32760, 128)


class TuneReport(NamedTuple):
    """What tuning one shape found."""

    key: TuneKey
    candidates: list[Candidate]
    schedule: ScheduleResult | None
    """None with compile_only, or when no algorithm setting met the error budget."""
    algorithm: AlgorithmResult | None


def _gpu_for_timing(arch: Arch, user_arch: str) -> str:
    """The GPU in hand, which must be of the arch asked for."""
    if not torch.cuda.is_available():
        raise ValueError(f"cannot time kernels for arch={user_arch!r}: no CUDA GPU is visible. "
                         "Pass compile_only=True to compile and prune the search space only.")
    device = torch.device("cuda")
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if archs.for_capability(capability) != arch:
        raise ValueError(f"cannot time kernels for arch={user_arch!r} on {name} "
                         f"(sm_{capability[0]}{capability[1]}); tune on a GPU of that arch, or "
                         "pass compile_only=True")
    return name


def _shape(shape: object) -> tuple[int, int, int, int, int]:
    """(B, H, Lq, Lk, D) from (B, H, L, D) or (B, H, Lq, Lk, D), each a positive int."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or len(shape) not in (
            4, 5) or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError("shapes must hold (B, H, L, D) or (B, H, Lq, Lk, D) of positive ints; "
                         f"got {shape!r}")
    if len(shape) == 4:
        b, h, length, d = shape
        return b, h, length, length, d
    return tuple(shape)


def _listed(name: str, values: object) -> Sequence:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list; got {values!r}")
    return values


def _check_calibration(calibration: object, layout: str) -> None:
    if not isinstance(calibration, Sequence) or len(calibration) != 3:
        raise TypeError("calibration must be a (q, k, v) tuple of tensors; got "
                        f"{type(calibration).__name__}")
    check_qkv(*calibration, layout)


def _check_algorithm_value(arch: Arch, name: str, value: object, dim: int, block_q: int,
                           block_kv: int) -> None:
    """One value of an algorithm knob, checked as the operators would (with the other knobs
    at their pinned values)."""
    if name in ("topk", "k_low"):
        check_ratio(name, value)
    elif name == "feature_map":
        check_choice("feature_map", value, spec.FEATURE_MAPS)
    else:
        sizes = {"block_q": block_q, "block_kv": block_kv, name: value}
        check_kernel_sizes(arch, dim, sizes["block_q"], sizes["block_kv"])


def _check_arguments(arch: Arch, shapes: list[tuple[int, ...]], trials: object,
                     storage: object, error_budget: object, options: dict) -> None:
    """Everything `tune` takes, checked before anything compiles, with the operators'
    messages."""
    check_positive_int("trials", trials)
    if storage is not None and not isinstance(storage, str):
        raise TypeError(f"storage must be an SQLAlchemy URL string or None; got "
                        f"{type(storage).__name__}")
    if error_budget is not None and not is_finite_positive(error_budget):
        raise ValueError(f"error_budget must be a positive finite relative error; got "
                         f"{error_budget!r}")
    check_choice("dtype", options["dtype"], KERNEL_DTYPE_NAMES)
    check_ratio("topk", options["topk"])
    check_ratio("k_low", options["k_low"])
    check_choice("feature_map", options["feature_map"], spec.FEATURE_MAPS)
    check_choice("linear", options["linear"], spec.LINEAR_MODES)
    check_choice("layout", options["layout"], spec.LAYOUTS)
    check_choice("mode", options["mode"], MODES)
    if options["workers"] is not None:
        check_positive_int("workers", options["workers"])
    if isinstance(options["seed"], bool) or not isinstance(options["seed"], int):
        raise TypeError(f"seed must be an int; got {type(options['seed']).__name__}")
    if options["gpu"] is not None:
        if not isinstance(options["gpu"], str):
            raise TypeError(f"gpu must be a GPU model name; got {type(options['gpu']).__name__}")
        model_slug(options["gpu"])  # a name that cannot be a GPU model's is refused
    for *_, d in shapes:
        check_kernel_sizes(arch, d, options["block_q"], options["block_kv"])
    space = options["search_algorithm"]
    if space is None:
        return
    if not isinstance(space, Mapping):
        raise TypeError(f"search_algorithm must map knob names to lists of values; got "
                        f"{type(space).__name__}")
    unknown = set(space) - set(ALGORITHM_KNOBS)
    if unknown:
        raise ValueError(f"search_algorithm knobs must be among {ALGORITHM_KNOBS}; "
                         f"got {sorted(unknown, key=str)}")
    if error_budget is None:
        raise ValueError("search_algorithm needs an error_budget (relative error)")
    for name, values in space.items():
        for value in _listed(f"search_algorithm[{name!r}]", values):
            for *_, d in shapes:
                _check_algorithm_value(arch, name, value, d, options["block_q"],
                                       options["block_kv"])


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
    shared memory. `compile_only=True` stops there: no GPU is needed; `gpu` (a GPU model
    name) names the model the study is for. Kernels land in the arch's kernel cache
    (`sla_tl.kernel_cache`) either way. Before a candidate is
    timed, its outputs on the measurement inputs are compared bit for bit with the default
    schedule's (at the algorithm knobs chosen); one that differs is refused, and the report
    lists it (`ScheduleResult.refused`).

    Studies live in `storage` (an SQLAlchemy URL; default SQLite under the cache
    directory): a study interrupted and run again resumes, and several processes may work
    on one study. Shapes default to Wan2.1-1.3B's attention, (1, 12, 32760, 128).
    """
    declared = arch_named(arch)
    arch_name = declared.target
    given = [WAN_1_3B] if shapes is None else _listed("shapes", shapes)
    problems = [_shape(shape) for shape in given]
    _check_arguments(declared, problems, trials, storage, error_budget, dict(
        dtype=dtype, topk=topk, k_low=k_low, block_q=block_q, block_kv=block_kv,
        feature_map=feature_map, linear=linear, layout=layout, mode=mode, workers=workers,
        seed=seed, gpu=gpu, search_algorithm=search_algorithm))
    if calibration is not None:
        _check_calibration(calibration, layout)
    kernel_cache.require(arch_name)  # refused before anything compiles if it cannot be made
    gpu_name = (gpu or "") if compile_only else _gpu_for_timing(declared, arch)
    study_storage = None if compile_only else open_storage(storage)

    reports = []
    for b, h, lq, lk, d in problems:
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
        measurement = schedule_measurement(key, mode, seed=seed)
        result = tune_schedule(key, candidates, measurement.timer, measurement.outputs, trials,
                               study_storage, seed, progress)
        try:
            config_store.active_store().record(
                Entry(key, result.best, result.best_ms, result.default_ms, result.complete))
        except config_store.StoreError as error:
            raise config_store.StoreError(f"{error}. The trials are kept in the study storage: "
                                          "tune again once it is fixed to store the result"
                                          ) from None
        reports.append(TuneReport(key, candidates, result, algorithm))
    return reports


def _search_algorithm(key: TuneKey, space: Mapping[str, Sequence], mode: str,
                      calibration: tuple | None, trials: int, storage, error_budget: float,
                      seed: int, progress: bool) -> AlgorithmResult:
    q, k, v = calibration if calibration is not None else calibration_inputs(key, seed)
    searched = {name: "searched" for name in space}
    name = "algorithm|" + key._replace(**searched).study_name()

    def timer(knobs: dict) -> float:
        # Algorithm knobs change the numbers: timed (and held to the error budget), never
        # compared with the pinned setting's outputs.
        return schedule_measurement(key._replace(**knobs), mode, seed=seed).timer({})

    def error(knobs: dict) -> float:
        return error_against_full(q, k, v, key, knobs)

    return tune_algorithm(name, space, timer, error, trials, storage, error_budget, seed,
                          progress)
