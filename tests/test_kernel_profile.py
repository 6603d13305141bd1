"""On the CPU: how `benchmarks.kernel_profile` splits a profile's kernels into calls, the
fusions it names, and what it refuses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from sla_tl.benchmarks.kernel_profile import every_forward_fusion, kernels_by_call, main
from sla_tl.plan import FUSIONS, CallShape, fusions_serving
from sla_tl.settings import Settings
from sla_tl.targets import Target, arch_named


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


def test_every_forward_fusion_of_a_call_is_named():
    target = Target("", arch_named("sm_90a"))
    shape = CallShape(1, 12, 32760, 32760, 128, torch.bfloat16,
                      Settings(block_q=128, block_kv=64), False, (26, 0))
    named = every_forward_fusion(target, shape)
    assert named == [n for n in fusions_serving(shape, "kernel")
                     if FUSIONS[n].phase == "routed_forward"]
    assert "selection_scores" in named and "key_major_kernel" not in named
    # Past the selection kernel's rows, the sort's fusions.
    long = shape._replace(lk=64 * 4096)
    assert "key_major_flags" in every_forward_fusion(target, long)


def test_all_fusions_needs_a_forward_in_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--all-fusions", "--mode", "fwd+bwd"])
    assert raised.value.code == 2
    assert "--all-fusions profiles a forward: it needs --mode fwd" in capsys.readouterr().err
