"""Pieces the autotuner tests run in other processes (spawned processes import them by name)."""

from __future__ import annotations

import os
import time

import torch

from sla_tl.autotune.candidates import Candidate
from sla_tl.autotune.storage import open_storage
from sla_tl.autotune.study import tune_schedule
from sla_tl.config_store import TuneKey

KEY = TuneKey("Test GPU", "sm_90a", "0.0", 1, 2, 256, 256, 64, "bfloat16", 64, 64, 0.25, 0.0,
              "softmax", "marginal", "bhsd")

CANDIDATES = [
    Candidate("forward", {"num_stages": 2}, None),  # the default comes first
    Candidate("forward", {"num_stages": 1}, None),
    Candidate("forward", {"num_stages": 3}, "spills registers"),
    Candidate("backward_dkdv", {"q_slice": 64}, None),
    Candidate("backward_dkdv", {"q_slice": 32}, None),
    Candidate("backward_dkdv", {"q_slice": 128}, "overflows shared memory"),
]

# Milliseconds per knob value: the optimum is num_stages=1 with q_slice=32 (2.0 ms).
COSTS = {("forward", 2): 3.0, ("forward", 1): 1.5, ("backward_dkdv", 64): 1.0,
         ("backward_dkdv", 32): 0.5}


def synthetic_latency(schedule: dict) -> float:
    """A timer with a known optimum; refuses pruned candidates (they must never be timed)."""
    stages = schedule["forward"]["num_stages"]
    q_slice = schedule["backward_dkdv"]["q_slice"]
    if stages == 3 or q_slice == 128:
        raise AssertionError("a pruned candidate was timed")
    return COSTS[("forward", stages)] + COSTS[("backward_dkdv", q_slice)]


def synthetic_outputs(schedule: dict) -> dict[str, torch.Tensor]:
    """A fake call's outputs: the same bits for every schedule of CANDIDATES; refuses pruned
    candidates (they must never run)."""
    synthetic_latency(schedule)
    generator = torch.Generator().manual_seed(0)
    return {"out": torch.randn(4, 8, generator=generator).bfloat16(),
            "dq": torch.randn(4, 8, generator=generator).bfloat16()}


def _wait_for_each_other(rendezvous: str, workers: int, timeout_s: float = 120.0) -> None:
    """Marks this worker as timing its first trial and waits until `workers` have done so.

    Spawned workers start at very different times on a loaded machine (each imports torch and
    optuna); without this, the first could finish every trial before the second reads the study.
    """
    os.makedirs(rendezvous, exist_ok=True)
    open(os.path.join(rendezvous, str(os.getpid())), "w").close()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(rendezvous)) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other workers never reached {rendezvous}")
        time.sleep(0.01)


def run_worker(url: str, trials: int, rendezvous: str, workers: int) -> int:
    """One of `workers` workers on the shared study; returns how many trials the study then holds.

    Each worker holds its first trial until every worker is timing one, so each records some.
    """
    first = [True]

    def slow_latency(schedule: dict) -> float:
        if first[0]:
            first[0] = False
            _wait_for_each_other(rendezvous, workers)
        time.sleep(0.05)  # slow enough that the workers overlap
        return synthetic_latency(schedule)

    result = tune_schedule(KEY, CANDIDATES, slow_latency, synthetic_outputs, trials,
                           open_storage(url), seed=None)
    return result.complete + result.pruned + result.failed


# Heartbeats of the killed-worker test: a trial silent for GRACE_S seconds is stale.
HEARTBEAT_S, GRACE_S = 1, 2


def die_in_first_trial(url: str) -> None:
    """A worker killed (no cleanup, as by SIGKILL) while timing its first trial."""
    def killed(schedule: dict) -> float:
        time.sleep(1.5 * HEARTBEAT_S)  # the trial's heartbeat is recorded meanwhile
        os._exit(3)

    tune_schedule(KEY, CANDIDATES, killed, synthetic_outputs, 4,
                  open_storage(url, HEARTBEAT_S, GRACE_S))
