"""`sla-tl bench` on the GPU in hand: a small run writes a valid result that passes the
gate against itself."""

from __future__ import annotations

import pytest

from sla_tl.benchmarks import bench, result_file


@pytest.mark.gpu
def test_a_small_bench_run_is_valid_and_gates_against_itself(tmp_path):
    out = tmp_path / "r.json"
    args = ["--shape", "1,2,4100,64", "--sparsity", "0.9", "--systems", "sdpa_cudnn,sla_tl",
            "--budget-s", "0.2"]
    assert bench.main([*args, "--out", str(out)]) == 0
    doc = result_file.load(out)
    assert {(r["system"], r["mode"]) for r in doc["rows"] if "error" not in r} == {
        (s, m) for s in ("sdpa_cudnn", "sla_tl") for m in ("fwd", "fwd+bwd")}
    assert all(r["speedup_vs_cudnn"] > 0 for r in doc["rows"])
    assert bench.main(["--from", str(out), "--check", str(out), "--tolerance", "0.0"]) == 0
