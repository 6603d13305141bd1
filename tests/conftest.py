"""Shared fixtures: GPU tests skip cleanly where there is no GPU."""

from __future__ import annotations

import os

import pytest
import torch

import sla_tl  # noqa: F401  (registers torch.ops.sla)

# The CPU tests run many tiny ops; on a two-core machine intra-op threads only add
# contention (measured: a reference forward took 1.8 ms with one thread, 23 ms with two).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def generator() -> torch.Generator:
    """A freshly seeded generator per test, so every test draws its own random inputs."""
    g = torch.Generator()
    g.manual_seed(torch.seed() % (2**31))
    return g


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With SLA_TL_FAILURE_LOG set, append each failure's report to that file as it happens:
    a GPU run stopped by its time limit still leaves the failures it saw."""
    path = os.environ.get("SLA_TL_FAILURE_LOG")
    if path and report.failed:
        with open(path, "a") as log:
            log.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n")
