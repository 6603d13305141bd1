"""How `benchmarks.kernel_profile` splits a profile's kernels into calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from sla_tl.benchmarks.kernel_profile import kernels_by_call


def _event(name: str, start: int, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device,
                           time_range=SimpleNamespace(start=start, end=start + 1))


def test_kernels_are_split_in_launch_order_and_host_events_left_out():
    events = [_event("b", 30), _event("a", 10), _event("host", 15, DeviceType.CPU),
              _event("b", 50), _event("a", 40)]
    calls = kernels_by_call(events, 2)
    assert [[e.name for e in call] for call in calls] == [["a", "b"], ["a", "b"]]
    assert [e.time_range.start for e in calls[1]] == [40, 50]


def test_an_uneven_count_is_refused():
    with pytest.raises(ValueError, match="3 kernels do not split into 2 equal calls"):
        kernels_by_call([_event("a", 1), _event("a", 2), _event("a", 3)], 2)
