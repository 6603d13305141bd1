"""Runs named scenarios on the ranks of a process group spawned for a test.

The parent starts a TCPStore on a free port (port 0: the OS picks one, so parallel test
runs never collide) and spawns one process per rank. Every rank runs the same scenarios
in the same order and writes what each returned to a JSON file; the parent reads them
back. A hang fails instead of blocking: collectives time out after COLLECTIVE_TIMEOUT_S,
and the parent kills its workers when the whole run passes its deadline.
"""

from __future__ import annotations

import datetime
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 30
NOT_RUN = "not run: an earlier scenario failed on this rank"


def run_on_ranks(
    world_size: int, scenarios: list[str], seed: int, backend: str = "gloo",
    timeout_s: float = 180.0,
) -> dict[str, list[dict]]:
    """Run `scenarios` (names in tests.ulysses_scenarios.SCENARIOS) on `world_size` spawned
    ranks; returns, per scenario, what each rank's run returned (rank order). A scenario
    that raised on a rank returns {"failed": traceback} there; later ones return
    {"failed": NOT_RUN}, since a rank that stopped early would leave the others waiting."""
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main, args=(world_size, store.port, backend, scenarios, seed, out_dir),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline, finished = time.monotonic() + timeout_s, False
        try:
            while not finished and time.monotonic() < deadline:
                finished = context.join(timeout=max(0.1, deadline - time.monotonic()))
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        per_rank = [_read(Path(out_dir, f"rank{rank}.json")) for rank in range(world_size)]
    if not finished:
        done = "; ".join(f"rank {rank}: {', '.join(results) or 'none'}"
                         for rank, results in enumerate(per_rank))
        raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s} s; "
                           f"scenarios done per rank: {done}")
    return {name: [results.get(name, {"failed": NOT_RUN}) for results in per_rank]
            for name in scenarios}


def _read(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.exists() else {}


def _rank_main(rank: int, world_size: int, port: int, backend: str, scenarios: list[str],
               seed: int, out_dir: str) -> None:
    from . import ulysses_scenarios

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results: dict[str, dict] = {}
    path = Path(out_dir, f"rank{rank}.json")
    try:
        for index, name in enumerate(scenarios):
            # The same inputs on every rank, fresh ones for every scenario of every run.
            generator = torch.Generator().manual_seed(seed + index)
            try:
                results[name] = ulysses_scenarios.SCENARIOS[name](dist.group.WORLD, generator)
            except Exception:  # recorded for the test to report; the rank stops here
                results[name] = {"failed": traceback.format_exc()}
                break
            finally:
                # After every scenario, so that what ran is known even if a later one hangs.
                path.write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()
