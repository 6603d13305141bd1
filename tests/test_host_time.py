"""On the CPU: what `benchmarks.host_time` accepts (the GPU runs its measurements)."""

from __future__ import annotations

import argparse

import pytest

from sla_tl.benchmarks import host_time


def test_a_shape_is_four_positive_ints():
    assert host_time.parse_shape("1,12,9360,128") == (1, 12, 9360, 128)


@pytest.mark.parametrize("text", ["1,12,9360", "1,12,0,128", "1,12,x,128", "1,-2,64,64"])
def test_a_malformed_shape_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected B,H,L,D"):
        host_time.parse_shape(text)


def test_no_calls_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        host_time.main(["--calls", "0"])
    assert raised.value.code == 2
    assert "--calls must be at least 1; got 0" in capsys.readouterr().err


def test_a_negative_profile_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as raised:
        host_time.main(["--profile", "-1"])
    assert raised.value.code == 2
    assert "--profile must be 0 or more; got -1" in capsys.readouterr().err
