"""The command line: a fast --help, help text and defaults for every option, a progress
line per compiled kernel, TileLang's own logging quiet unless asked."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sla_tl import cli, parallel
from sla_tl.benchmarks import bench
from sla_tl.kernels import KernelSpec

COMMAND = Path(sys.executable).with_name("sla-tl")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = cli.build_parser()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = {name: p for name, p in commands.choices.items() if name != "bench"}
    return {"sla-tl": top, **parsers, "bench": bench._parser()}


@pytest.mark.skipif(not COMMAND.exists(), reason="the sla-tl console script is not installed")
def test_help_imports_neither_torch_nor_tilelang(tmp_path):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run([str(COMMAND), "--help"], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0 and "kernels" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "torch" not in imported and "tilelang" not in imported


@pytest.mark.parametrize("name", sorted(_parsers()))
def test_every_option_has_help_and_shows_its_default(name):
    parser = _parsers()[name]
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        assert action.help, f"{name} {action.option_strings} has no help"
        if action.default is not None and not isinstance(action.default, bool):
            shown = f"(default: {action.default})"
            assert shown in text, f"{name} {action.option_strings} does not show {shown}"


def _square(spec: KernelSpec) -> int:
    return dict(spec.args)["dim"] ** 2


@pytest.mark.parametrize("workers", [1, 2])
def test_one_progress_line_per_kernel_with_its_name(capsys, workers):
    specs = [KernelSpec("pool", (("dim", n), ("block", 64), ("dtype", "bfloat16"),
                                 ("layout", "bhsd")), "sm_90a") for n in (3, 4, 5)]
    assert parallel.map_in_parallel(_square, specs + specs[:1], workers, progress=True) == [
        9, 16, 25]
    lines = capsys.readouterr().err.splitlines()
    assert sorted(line.split()[0] for line in lines) == ["[1/3]", "[2/3]", "[3/3]"]
    assert sorted(line.split()[1] for line in lines) == sorted(s.name for s in specs)


def test_tilelang_logs_warnings_only_unless_asked(monkeypatch):
    from sla_tl import kernels

    tilelang_log = logging.getLogger("tilelang")
    assert tilelang_log.getEffectiveLevel() == logging.WARNING
    monkeypatch.setenv(kernels.TILELANG_LOG_VARIABLE, "WARNING")
    try:
        kernels.show_tilelang_log()
        assert os.environ[kernels.TILELANG_LOG_VARIABLE] == "INFO"
        assert tilelang_log.getEffectiveLevel() == logging.INFO
        monkeypatch.setenv(kernels.TILELANG_LOG_VARIABLE, "chatty")
        with pytest.raises(ValueError, match=kernels.TILELANG_LOG_VARIABLE):
            kernels._apply_tilelang_log_level()
    finally:
        monkeypatch.setenv(kernels.TILELANG_LOG_VARIABLE, "WARNING")
        kernels._apply_tilelang_log_level()


def test_compiling_ahead_returns_the_failures_that_compiling_raises():
    bad = KernelSpec("pool", (("dim", 64), ("block", 64), ("dtype", "bfloat16"),
                              ("layout", "bhsd")), "sm_90a", (("num_stages", 2),))
    [failure] = parallel.compile_ahead([bad, bad], workers=1)
    assert failure.startswith(bad.name) and "pool has no schedule knobs" in failure
    with pytest.raises(RuntimeError, match="kernels failed:\n.*pool has no schedule knobs"):
        parallel.compile_in_parallel([bad], workers=1)


def test_compile_ahead_gathers_every_gpu_test_modules_kernels():
    from tests import compile_ahead, test_gpu_kernels, test_gpu_key_major

    specs, skipped = compile_ahead.gpu_modules_kernels()
    names = {spec.name for spec in specs}
    assert {s.name for s in test_gpu_kernels.kernels_ahead()} <= names
    assert {s.name for s in test_gpu_key_major.kernels_ahead()} <= names
    assert all(line.startswith("test_gpu_") for line in skipped)
    assert all(spec.arch == "sm_90a" for spec in specs)
