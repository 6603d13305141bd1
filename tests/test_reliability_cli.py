"""The command line: bad input is one line on stderr and exit status 2 for every
subcommand, the throughput gate cannot be passed by bad numbers, and `sla-tl warm` fills
the arch's kernel cache with the shipped and every model's tuned kernels."""

from __future__ import annotations

import copy
import json
import math

import pytest

from sla_tl import cli, config_store, kernel_cache, static_check
from sla_tl.autotune import api as tune_api
from sla_tl.benchmarks import bench, gate, suite
from sla_tl.config_store import ConfigStore, Entry, TuneKey
from sla_tl.kernels import KernelSpec

from .test_bench import gated_row, make_doc, write

BAD_COMMANDS = [
    ["demo", "--heads", "0"],
    ["demo", "--length", "0"],
    ["demo", "--length", "1000000"],
    ["demo", "--length", "many"],
    ["demo", "--dim", "96"],
    ["kernels", "--arch", "sm_80"],
    ["kernels", "--arch", "sm_100a"],
    ["kernels", "--workers", "0"],
    ["tune", "--feature-map", "bogus", "--compile-only"],
    ["tune", "--linear", "bogus", "--compile-only"],
    ["tune", "--trials", "0", "--compile-only"],
    ["tune", "--topk", "5", "--compile-only"],
    ["tune", "--k-low", "nan", "--compile-only"],
    ["tune", "--block-q", "96", "--compile-only"],
    ["tune", "--shape", "1,12,x,128", "--compile-only"],
    ["tune", "--shape", "0,12,1024,128", "--compile-only"],
    ["tune", "--gpu", "..", "--compile-only"],
    ["tune", "--arch", "sm_80", "--compile-only"],
    ["tune", "--workers", "0", "--compile-only"],
    ["tune", "--mode", "bwd"],
    ["warm", "--gpu", ".."],
    ["warm", "--arch", "sm80"],
    ["warm", "--gpu", "NVIDIA H200", "--workers", "-1"],
    ["bench", "--from", "/nonexistent/result.json"],
    ["bench", "--from", "/"],
    ["bench", "--tolerance", "nan", "--from", "/nonexistent/result.json"],
    ["bench", "--tolerance", "1.5", "--sections", "shapes"],
    ["bench", "--budget-s", "-1"],
    ["bench", "--most-repeats", "0"],
    ["bench", "--shape", "0,12,1024,128"],
    ["bench", "--shape", "1,12,1024,128", "--sparsity", "1.5"],
    ["bench", "--shape", "1,12,1024,128", "--sparsity", "high"],
    ["bench", "--check", "/nonexistent/baseline.json", "--from", "/nonexistent/r.json"],
    ["no-such-command"],
    [],
]


@pytest.fixture
def nothing_compiles(monkeypatch, tmp_path):
    """Bad input must be refused before anything is compiled or measured."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(tune_api, "build_candidates", refuse)
    monkeypatch.setattr(static_check, "collect", refuse)
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))


def _exit_status(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return exit_.code


@pytest.mark.parametrize("argv", BAD_COMMANDS, ids=" ".join)
def test_bad_input_is_one_line_on_stderr_and_exit_2(nothing_compiles, capsys, argv):
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("sla-tl") and "error:" in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_kernels_takes_the_arch_spelling_tune_and_warm_take(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(static_check, "shipped_kernels", lambda arch: seen.append(arch) or [])
    monkeypatch.setattr(static_check, "collect", lambda specs, workers, progress=False: [])
    for spelling in ("sm90", "sm_90", "sm_90a"):
        assert cli.main(["kernels", "--arch", spelling]) == 0
    assert seen == ["sm_90a"] * 3
    assert "static check passed" in capsys.readouterr().out


def test_a_failure_after_the_checks_is_one_line_and_exit_1(monkeypatch, capsys):
    def failing(specs, workers, progress=False):
        raise RuntimeError("kernels failed:\nforward: ptxas error\nbackward_dq: ptxas error")

    monkeypatch.setattr(static_check, "collect", failing)
    assert cli.main(["kernels"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "forward: ptxas error backward_dq: ptxas error" in err


# The throughput gate


def _gate(tmp_path, capsys, baseline: dict, result: dict) -> tuple[int, str]:
    args = ["--from", write(result, tmp_path / "result.json"),
            "--check", write(baseline, tmp_path / "baseline.json")]
    status = bench.main(args)
    return status, capsys.readouterr().err


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -2.0])
def test_a_non_finite_or_non_positive_speedup_never_passes(tmp_path, capsys, bad):
    base = make_doc()
    result = copy.deepcopy(base)
    gated_row(result)["speedup_vs_cudnn"] = bad
    status, err = _gate(tmp_path, capsys, base, result)
    assert status == 2
    assert "result.json is not a bench result: row" in err and "speedup_vs_cudnn" in err
    # A result that never went through a file is caught by the gate itself.
    verdicts = gate.check(base, result, 0.05)
    [failed] = [v for v in verdicts if v.failure]
    assert "not a finite positive number" in failed.failure


@pytest.mark.parametrize("bad", [0.0, math.nan])
def test_a_baseline_speedup_of_zero_or_nan_is_refused(tmp_path, capsys, bad):
    base = make_doc()
    broken = copy.deepcopy(base)
    gated_row(broken)["speedup_vs_cudnn"] = bad
    status, err = _gate(tmp_path, capsys, broken, base)
    assert status == 2 and "baseline.json is not a bench result" in err
    with pytest.raises(ValueError, match=r"baseline's speedup is not a finite positive number"):
        gate.check(broken, base, 0.05)


def test_results_timed_two_ways_cannot_be_merged(tmp_path, capsys):
    kernels = make_doc(suite.section_cases("shapes"))
    called = make_doc(suite.section_cases("sparsity"))
    called["settings"]["timing"] = "call"
    parts = [write(kernels, tmp_path / "a.json"), write(called, tmp_path / "b.json")]
    baseline = write(make_doc(), tmp_path / "base.json")
    assert bench.main(["--from", *parts, "--check", baseline]) == 2
    assert "cannot merge results timed different ways: 'kernels' and 'call'" in \
        capsys.readouterr().err


def test_an_unreadable_or_binary_result_is_named(tmp_path, capsys):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert bench.main(["--from", str(binary)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{binary} is not JSON" in err
    assert bench.main(["--from", str(tmp_path)]) == 2
    assert f"cannot read {tmp_path}" in capsys.readouterr().err


# sla-tl warm


def _pool(block: int) -> KernelSpec:
    """A small real kernel (routing's pooling)."""
    return KernelSpec("pool", (("dim", 64), ("block", block), ("dtype", "bfloat16"),
                               ("layout", "bhsd")), "sm_90a")


def test_warm_compiles_the_shipped_and_every_models_tuned_kernels_into_one_directory(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TILELANG_CACHE_DIR", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(static_check, "shipped_kernels", lambda arch: [_pool(64)])
    # A tuned entry's kernels, one per entry here: 80 rows for model A, 144 for model B.
    monkeypatch.setattr("sla_tl.tune_cli.kernels_for",
                        lambda arch, dim, dtype, s, schedule: [_pool(s.block_q + 16)])
    store = ConfigStore(tmp_path / config_store.STORE_FILE)
    for gpu, block_q in (("Test GPU A", 64), ("Test GPU B", 128)):
        key = TuneKey(gpu, "sm_90a", "0.1.15", 1, 2, 256, 256, 64, "bfloat16", block_q, 64,
                      0.25, 0.0, "softmax", "marginal", "bhsd")
        store.record(Entry(key, {}, 1.0, 1.0, 1))
    config_store.active_store().reload()
    assert cli.main(["warm", "--workers", "1"]) == 0
    directory = kernel_cache.kernel_directory("sm_90a")
    assert directory == tmp_path / "kernels" / "sm_90a"
    out = capsys.readouterr().out
    assert f"3 kernels (2 tuned schedules of Test GPU A, Test GPU B) in {directory}" in out
    assert len(list(directory.rglob("*.so"))) >= 3, f"not compiled into {directory}"
    assert json.loads((tmp_path / config_store.STORE_FILE).read_text())["entries"]
    capsys.readouterr()
    assert cli.main(["warm", "--gpu", "Test GPU B", "--workers", "1"]) == 0
    assert "2 kernels (1 tuned schedules of Test GPU B)" in capsys.readouterr().out


def test_a_warning_is_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    (tmp_path / config_store.STORE_FILE).write_text("garbage")
    config_store.active_store().reload()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr(static_check, "shipped_kernels", lambda arch: [])
    assert cli.main(["warm"]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"sla-tl warm: warning: {tmp_path / config_store.STORE_FILE}: is "
                               "not JSON")
