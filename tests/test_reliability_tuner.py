"""The tuner checks everything before it compiles, and a killed or failed tune resumes with
nothing stuck and the defaults timed."""

from __future__ import annotations

import math
import multiprocessing
import time

import optuna
import pytest
import torch

from sla_tl.autotune import api
from sla_tl.autotune.storage import open_storage
from sla_tl.autotune.study import tune_schedule

from . import autotune_workers as workers
from .autotune_workers import CANDIDATES, KEY, synthetic_latency, synthetic_outputs

optuna.logging.set_verbosity(optuna.logging.WARNING)

# The all-defaults schedule of CANDIDATES: num_stages=2 (3.0 ms) with q_slice=64 (1.0 ms).
DEFAULT_MS = 4.0


@pytest.fixture
def never_compile(monkeypatch):
    """Tuning must fail before any candidate is compiled."""
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the arguments were checked")

    monkeypatch.setattr(api, "build_candidates", refuse)


BAD_ARGUMENTS = [
    (dict(shapes=[(0, 12, 1024, 128)]), ValueError, r"shapes must hold .* positive ints"),
    (dict(shapes=[(1, 12, -5, 128)]), ValueError, r"shapes must hold"),
    (dict(shapes=[(1, 12, 1024)]), ValueError, r"shapes must hold"),
    (dict(shapes=["1,12,1024,128"]), ValueError, r"shapes must hold"),
    (dict(shapes=[]), ValueError, r"shapes must be a non-empty list"),
    (dict(shapes=[(1, 12, 1024, 96)]), ValueError, r"head dim must be one of \(64, 128\)"),
    (dict(dtype="float99"), ValueError, r"dtype must be one of bfloat16, float16"),
    (dict(topk=5), ValueError, r"topk must be in \[0, 1\]"),
    (dict(topk=True), TypeError, r"topk must be a float"),
    (dict(k_low=-0.1), ValueError, r"k_low must be in \[0, 1\]"),
    (dict(block_q=96), ValueError, r"block_q must be one of \(64, 128\) on CUDA"),
    (dict(block_kv=32), ValueError, r"block_kv must be one of \(64, 128\) on CUDA"),
    (dict(feature_map="bogus"), ValueError, r"feature_map must be one of"),
    (dict(linear="bogus"), ValueError, r"linear must be one of"),
    (dict(layout="sbhd"), ValueError, r"layout must be one of"),
    (dict(mode="bwd"), ValueError, r"mode must be one of fwd, fwd\+bwd"),
    (dict(trials=0), ValueError, r"trials must be at least 1"),
    (dict(trials="30"), TypeError, r"trials must be an int"),
    (dict(workers=0), ValueError, r"workers must be at least 1"),
    (dict(gpu=".."), ValueError, r"gpu must name a GPU model"),
    (dict(storage=3), TypeError, r"storage must be an SQLAlchemy URL"),
    (dict(search_algorithm={"topk": [0.05]}, error_budget=math.nan), ValueError,
     r"error_budget must be a positive finite"),
    (dict(search_algorithm={"topk": [0.05]}), ValueError, r"needs an error_budget"),
    (dict(search_algorithm={"topk": []}, error_budget=0.1), ValueError,
     r"search_algorithm\['topk'\] must be a non-empty list"),
    (dict(search_algorithm={"topk": [0.05, 2.0]}, error_budget=0.1), ValueError,
     r"topk must be in \[0, 1\]"),
    (dict(search_algorithm={"block_kv": [64, 96]}, error_budget=0.1), ValueError,
     r"block_kv must be one of \(64, 128\) on CUDA"),
    (dict(search_algorithm={"feature_map": ["relu", "bogus"]}, error_budget=0.1), ValueError,
     r"feature_map must be one of"),
    (dict(search_algorithm={"threads": [128]}, error_budget=0.1), ValueError,
     r"search_algorithm knobs must be among"),
    (dict(calibration=(torch.zeros(1), torch.zeros(1))), TypeError,
     r"calibration must be a \(q, k, v\) tuple"),
]


@pytest.mark.parametrize("options,error,pattern", BAD_ARGUMENTS,
                         ids=[str(i) for i in range(len(BAD_ARGUMENTS))])
def test_tune_checks_everything_before_compiling(never_compile, options, error, pattern):
    with pytest.raises(error, match=pattern):
        api.tune("sm90", compile_only=True, **options)


@pytest.mark.parametrize("arch", ["sm80", "sm_100a", "hopper", None])
def test_tune_refuses_an_arch_it_has_no_kernels_for(never_compile, arch):
    with pytest.raises(ValueError, match=r"arch must be one of sm90, sm_90, sm_90a"):
        api.tune(arch, compile_only=True)


@pytest.mark.parametrize("arch", ["sm90", "sm_90", "sm_90a"])
def test_every_spelling_of_hopper_is_taken(monkeypatch, arch):
    seen = []
    monkeypatch.setattr(api, "build_candidates", lambda *args, **kw: seen.append(args[3]) or [])
    api.tune(arch, compile_only=True, shapes=[(1, 2, 256, 64)])
    assert seen == ["sm_90a"]


def test_a_tune_killed_inside_its_first_trial_resumes_and_times_the_defaults(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    open_storage(url)
    worker = multiprocessing.get_context("spawn").Process(target=workers.die_in_first_trial,
                                                         args=(url,))
    worker.start()
    worker.join(120)
    assert worker.exitcode == 3
    storage = open_storage(url, workers.HEARTBEAT_S, workers.GRACE_S)
    study = optuna.load_study(study_name=KEY.study_name(), storage=storage)
    [killed] = study.trials
    assert killed.state == optuna.trial.TrialState.RUNNING and killed.user_attrs["default"]
    time.sleep(workers.GRACE_S + 0.5)  # its heartbeat is now older than the grace period

    result = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, 6, storage)
    assert result.default_ms == pytest.approx(DEFAULT_MS)
    trials = optuna.load_study(study_name=KEY.study_name(), storage=storage).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retried) == 1 and retried[0].user_attrs["default"]
    assert retried[0].state == optuna.trial.TrialState.COMPLETE


def test_a_failed_default_trial_is_timed_again_on_resume(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'studies.db'}")

    def fails_on_the_defaults(schedule: dict) -> float:
        if synthetic_latency(schedule) == DEFAULT_MS:
            raise RuntimeError("launch failed")
        return synthetic_latency(schedule)

    first = tune_schedule(KEY, CANDIDATES, fails_on_the_defaults, synthetic_outputs, 4, storage)
    assert first.default_ms is None and first.failed >= 1
    resumed = tune_schedule(KEY, CANDIDATES, synthetic_latency, synthetic_outputs, 6, storage)
    assert resumed.default_ms == pytest.approx(DEFAULT_MS)
