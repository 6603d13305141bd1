"""`sla-tl bench` without a GPU: the suite, the measuring loop with an injected timer, the
result schema, the plot and the throughput gate on synthetic result files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sla_tl import spec
from sla_tl.benchmarks import bench, gate, plot, result_file, runner, suite, systems
from sla_tl.benchmarks.suite import Case

H200 = "NVIDIA H200"
# Made-up medians: sla-tl gets faster as sparsity rises; dense systems are flat.
DENSE_MS = {"sdpa_cudnn": 11.0, "sdpa_flash": 16.0}


def fake_ms(m: runner.Measurement) -> float:
    scale = m.case.shape.dense_flops(m.mode) / suite.WAN_1_3B.dense_flops("fwd")
    if m.system in DENSE_MS:
        return DENSE_MS[m.system] * scale
    return (1.0 - m.case.sparsity) * 30.0 * scale + (0.2 if m.system == "flex_sparse" else 0.5)


def fake_prepare(m: runner.Measurement, inputs: list) -> runner.Timed:
    assert inputs == ["inputs", m.case.shape, m.mode]  # the group's inputs are passed on
    return runner.Timed(lambda count: [fake_ms(m)] * count, 50, 100.0 + m.case.shape.heads)


def environment(gpu: str = H200) -> dict:
    return dict(gpu=gpu, driver="580.00", torch="2.11.0", tilelang="0.1.15",
                git_commit="0" * 40, date_utc="2026-11-23T00:00:00+00:00")


def make_doc(cases: list[Case] | None = None, gpu: str = H200,
             systems: tuple[str, ...] = ("sdpa_cudnn", "sdpa_flash", "flex_sparse", "sla_tl"),
             prepare=fake_prepare) -> dict:
    rows = runner.run(cases or suite.cases_of(list(suite.SECTIONS)), systems, suite.MODES,
                      prepare, make_inputs=lambda shape, mode: ["inputs", shape, mode],
                      log=lambda line: None)
    return result_file.make_result(environment(gpu), {"timing": "kernels", "budget_s": 1.0}, {},
                                   rows)


def write(doc: dict, path: Path) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def gated_row(doc: dict, label: str = "wan2.1-1.3b-480p", mode: str = "fwd+bwd",
              sparsity: float = 0.95) -> dict:
    [row] = [r for r in doc["rows"] if r["system"] == "sla_tl" and r["shape"] == label
             and r["mode"] == mode and r["sparsity"] == sparsity]
    return row


# The suite


def test_suite_holds_the_shapes_sweep_and_lengths_asked_for():
    dims = {(s.batch, s.heads, s.length, s.dim) for s in suite.SHAPES}
    assert {(1, 12, 32760, 128), (1, 40, 75600, 128), (2, 16, 32760, 128)} <= dims
    assert any(s.dim == 64 for s in suite.SHAPES)
    assert min(suite.SPARSITIES) == 0.80 and max(suite.SPARSITIES) == 0.97
    assert len({c.shape.length for c in suite.section_cases("length")}) >= 4
    with pytest.raises(ValueError, match="unknown section"):
        suite.section_cases("everything")


def test_case_sparsity_is_one_minus_topk_in_whole_blocks():
    case = Case(suite.WAN_1_3B, 0.95)
    n_kv = spec.num_blocks(32760, 64)
    assert case.topk == 0.05
    assert case.density == spec.num_critical(0.05, n_kv) / n_kv == 25 / 512
    assert Case(suite.WAN_1_3B, 0.97).density == 15 / 512


def test_cases_are_distinct_across_sections():
    cases = suite.cases_of(["shapes", "sparsity", "length"])
    assert len(cases) == len(set(cases))
    assert cases.count(Case(suite.WAN_1_3B, 0.95)) == 1


# The measuring loop


def test_plan_times_dense_systems_once_per_shape_and_mode():
    cases = [Case(suite.WAN_1_3B, s) for s in (0.9, 0.95)] + [Case(suite.THU_SLA, 0.95)]
    groups = runner.plan(cases, ["sla_tl", "sdpa_flash", "sdpa_cudnn"], ["fwd", "fwd+bwd"])
    assert len(groups) == 4
    first = groups[0]
    assert [m.system for m in first] == ["sdpa_cudnn", "sdpa_flash", "sla_tl", "sla_tl"]
    assert [m.case.sparsity for m in first[2:]] == [0.9, 0.95]
    assert {m.mode for m in first} == {"fwd"}


def test_speedups_come_from_cudnn_of_the_same_shape_and_mode():
    doc = make_doc()
    for row in doc["rows"]:
        cudnn = next(r for r in doc["rows"] if r["system"] == "sdpa_cudnn"
                     and r["shape"] == row["shape"] and r["mode"] == row["mode"])
        assert row["speedup_vs_cudnn"] == pytest.approx(cudnn["median_ms"] / row["median_ms"])
        flops = suite.Shape(row["shape"], row["batch"], row["heads"], row["length"],
                            row["dim"]).dense_flops(row["mode"])
        assert row["tflops_dense_equiv"] == pytest.approx(flops / row["median_ms"] / 1e9)
        assert row["tflops_per_computed_block"] == pytest.approx(
            row["density"] * row["tflops_dense_equiv"])
    dense = [r for r in doc["rows"] if r["system"] == "sdpa_flash"]
    assert all(r["sparsity"] is None and r["density"] == 1.0 for r in dense)


def test_systems_are_timed_in_interleaved_rounds():
    order = []

    def prepare(m, inputs):
        def sample(count):
            order.append((m.system, m.case.sparsity))
            return [fake_ms(m)] * count
        return runner.Timed(sample, 10, 1.0)

    cases = [Case(suite.WAN_1_3B, s) for s in (0.9, 0.95)]
    rows = runner.run(cases, ["sdpa_cudnn", "sla_tl"], ["fwd"], prepare,
                      make_inputs=lambda s, m: ["inputs", s, m], log=lambda line: None)
    one_round = [("sdpa_cudnn", 0.9), ("sla_tl", 0.9), ("sla_tl", 0.95)]
    assert order == one_round * runner.ROUNDS
    assert all(r["repeats"] == 10 for r in rows)


def test_a_failing_system_is_reported_and_the_rest_still_run():
    def prepare(m, inputs):
        if m.system == "flex_sparse" and m.mode == "fwd+bwd":
            raise RuntimeError("out of shared memory")
        if m.system == "sla_tl" and m.mode == "fwd":
            def sample(count):
                raise RuntimeError("illegal memory access")
            return runner.Timed(sample, 10, 1.0)
        return fake_prepare(m, inputs)

    lines, checkpoints = [], []
    rows = runner.run([Case(suite.WAN_1_3B, 0.95)], ["sdpa_cudnn", "flex_sparse", "sla_tl"],
                      suite.MODES, prepare, make_inputs=lambda s, m: ["inputs", s, m],
                      log=lines.append, checkpoint=lambda rows: checkpoints.append(len(rows)))
    failed = [r for r in rows if "error" in r]
    assert [(r["system"], r["mode"]) for r in failed] == [("sla_tl", "fwd"),
                                                           ("flex_sparse", "fwd+bwd")]
    assert "illegal memory access" in failed[0]["error"]
    assert "out of shared memory" in failed[1]["error"]
    assert len(rows) == 6 and checkpoints == [3, 6]
    assert lines[0].startswith("6 measurements") and "[  6/6" in lines[-1]
    assert lines[1] == "wan2.1-1.3b-480p fwd: preparing 3 measurements, then 5 rounds"
    assert sum(line.startswith("  round ") for line in lines) == 2 * runner.ROUNDS
    assert any("failed: RuntimeError: out of shared memory" in line for line in lines)


def test_without_cudnn_there_is_no_speedup():
    rows = runner.run([Case(suite.WAN_1_3B, 0.95)], ["sla_tl"], ["fwd"], fake_prepare,
                      make_inputs=lambda s, m: ["inputs", s, m], log=lambda line: None)
    assert "speedup_vs_cudnn" not in rows[0] and "median_ms" in rows[0]


# The result file


def test_a_measured_result_validates_and_round_trips(tmp_path):
    doc = make_doc()
    assert result_file.validate(doc) == []
    result_file.save(doc, tmp_path / "r.json")
    assert result_file.load(tmp_path / "r.json") == doc


@pytest.mark.parametrize("break_it, complaint", [
    (lambda d: d["environment"].pop("gpu"), "environment: missing 'gpu'"),
    (lambda d: d["rows"][0].update(median_ms="fast"), "'median_ms' is str"),
    (lambda d: d["rows"][0].update(median_ms=-1.0), "median_ms -1.0 is not positive"),
    (lambda d: d["rows"][0].update(repeats=True), "'repeats' is bool"),
    (lambda d: d["rows"][0].update(mode="bwd"), "mode 'bwd' is not one of"),
    (lambda d: d["rows"][1].pop("tflops_dense_equiv"), "row 1: missing 'tflops_dense_equiv'"),
    (lambda d: d.update(schema_version=2), "schema_version is 2"),
    (lambda d: d["settings"].pop("timing"), "settings: timing None is not one of"),
    (lambda d: d.update(rows={}), "'rows' is missing or not a list"),
])
def test_schema_violations_are_named(break_it, complaint, tmp_path):
    doc = make_doc([Case(suite.WAN_1_3B, 0.95)])
    break_it(doc)
    assert any(complaint in p for p in result_file.validate(doc)), result_file.validate(doc)
    with pytest.raises(ValueError, match="refusing to write"):
        result_file.save(doc, tmp_path / "r.json")
    path = write(doc, tmp_path / "broken.json")
    with pytest.raises(ValueError, match="broken.json is not a bench result"):
        result_file.load(path)


def test_error_rows_need_no_figures():
    doc = make_doc([Case(suite.WAN_1_3B, 0.95)])
    row = doc["rows"][0]
    for field in result_file.FIGURE_FIELDS:
        row.pop(field)
    row.pop("speedup_vs_cudnn")
    row.pop("memory_vs_cudnn")
    row["error"] = "RuntimeError: boom"
    assert result_file.validate(doc) == []


def test_merge_joins_parts_of_one_gpu_and_refuses_two():
    shapes = make_doc(suite.section_cases("shapes"))
    sweep = make_doc(suite.section_cases("sparsity"))
    merged = result_file.merge([shapes, sweep])
    keys = [result_file.row_key(r) for r in merged["rows"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {result_file.row_key(r) for r in shapes["rows"] + sweep["rows"]}
    with pytest.raises(ValueError, match="different gpu"):
        result_file.merge([shapes, make_doc(suite.section_cases("sparsity"), gpu="NVIDIA B200")])


# The plot


def test_plot_series_pick_the_sweep_and_the_length_family():
    doc = make_doc()
    by_sparsity = plot.sparsity_series(doc)
    assert [x for x, _ in by_sparsity[("sla_tl", "fwd")]] == list(suite.SPARSITIES)
    assert ("sdpa_flash", "fwd") not in by_sparsity
    by_length = plot.length_series(doc)
    assert [x for x, _ in by_length[("sla_tl", "fwd+bwd")]] == list(suite.LENGTHS)
    assert [x for x, _ in by_length[("sdpa_flash", "fwd")]] == list(suite.LENGTHS)


def test_plot_file_is_a_png(tmp_path):
    path = tmp_path / "bench.png"
    plot.write_plot(make_doc(), path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_new_system_is_one_record_and_the_plot_draws_it(tmp_path, monkeypatch):
    extra = systems.System("made_up", False, lambda case: None, lambda: None, "tab:brown")
    monkeypatch.setitem(systems.SYSTEMS, extra.name, extra)
    doc = make_doc()
    doc["rows"] += [dict(row, system="made_up") for row in doc["rows"]
                    if row["system"] == "sla_tl"]
    path = tmp_path / "bench.png"
    plot.write_plot(doc, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len({s.color for s in systems.SYSTEMS.values()}) == len(systems.SYSTEMS)
    assert systems.DENSE == {"sdpa_cudnn", "sdpa_flash"}


# The gate


def slower(doc: dict, factor: float, **where) -> dict:
    doc = copy.deepcopy(doc)
    row = gated_row(doc, **where)
    row["median_ms"] /= factor
    row["speedup_vs_cudnn"] *= factor
    return doc


def test_a_drop_just_over_the_tolerance_fails_naming_kernel_and_shape():
    base = make_doc()
    verdicts = gate.check(base, slower(base, 1 - 0.051), 0.05)
    failed = [v for v in verdicts if v.failure]
    assert len(failed) == 1
    assert failed[0].name.startswith("sla_tl forward+backward on wan2.1-1.3b-480p "
                                     "(B=1 H=12 L=32760 D=128 bf16, sparsity 0.95")
    assert "fell 5.1%" in failed[0].failure


def test_a_drop_just_under_the_tolerance_and_a_rise_pass():
    base = make_doc()
    assert not any(v.failure for v in gate.check(base, slower(base, 1 - 0.049), 0.05))
    assert not any(v.failure for v in gate.check(base, slower(base, 1.3), 0.05))


def test_only_sla_tl_rows_are_gated():
    base = make_doc()
    verdicts = gate.check(base, base, 0.05)
    assert len(verdicts) == len(gate.gated_rows(base)) == sum(
        r["system"] == "sla_tl" for r in base["rows"])
    flex_slower = copy.deepcopy(base)
    for row in flex_slower["rows"]:
        if row["system"] == "flex_sparse":
            row["speedup_vs_cudnn"] /= 2
    assert not any(v.failure for v in gate.check(base, flex_slower, 0.05))


def test_a_missing_or_failed_kernel_fails():
    base = make_doc()
    result = copy.deepcopy(base)
    result["rows"].remove(gated_row(result, label="wan2.1-14b-720p", mode="fwd"))
    crashed = gated_row(result, sparsity=0.80)
    for field in (*result_file.FIGURE_FIELDS, "speedup_vs_cudnn", "memory_vs_cudnn"):
        crashed.pop(field)
    crashed["error"] = "RuntimeError: CUDA error"
    failures = {v.name.split(" (")[0]: v.failure for v in gate.check(base, result, 0.05)
                if v.failure}
    assert failures == {
        "sla_tl forward on wan2.1-14b-720p": "missing: not measured in this run",
        "sla_tl forward+backward on wan2.1-1.3b-480p":
            "missing: failed with RuntimeError: CUDA error",
    }


def test_a_baseline_of_another_gpu_model_is_refused():
    with pytest.raises(gate.WrongGPUError, match="'NVIDIA B200'.*'NVIDIA H200'"):
        gate.check(make_doc(gpu="NVIDIA B200"), make_doc(), 0.05)


def test_a_baseline_timed_another_way_is_refused():
    base = make_doc()
    base["settings"]["timing"] = "call"
    with pytest.raises(ValueError, match="timed 'call', this result 'kernels'"):
        gate.check(base, make_doc(), 0.05)


def test_gated_cases_rebuild_the_baseline_cases():
    base = make_doc()
    cases, modes = gate.gated_cases(base)
    assert set(cases) == set(suite.cases_of(list(suite.SECTIONS)))
    assert modes == list(suite.MODES)


# The command line


def test_cli_gate_exit_status_names_the_regression(tmp_path, capsys):
    base = make_doc()
    baseline = write(base, tmp_path / "base.json")
    ok = write(slower(base, 0.96), tmp_path / "ok.json")
    bad = write(slower(base, 0.90, label="wan2.1-14b-720p", mode="fwd"), tmp_path / "bad.json")
    assert bench.main(["--from", ok, "--check", baseline, "--tolerance", "0.05"]) == 0
    assert "0 failed" in capsys.readouterr().out
    assert bench.main(["--from", bad, "--check", baseline, "--tolerance", "0.05"]) == 1
    out = capsys.readouterr().out
    assert "FAIL sla_tl forward on wan2.1-14b-720p (B=1 H=40 L=75600 D=128 bf16" in out
    assert "1 failed" in out


def test_cli_picks_the_baseline_of_the_gpu_model_from_a_directory(tmp_path, capsys):
    baselines = tmp_path / "baselines"
    baselines.mkdir()
    write(make_doc(), baselines / "NVIDIA-H200.json")
    result = write(make_doc(), tmp_path / "r.json")
    assert bench.main(["--from", result, "--check", str(baselines)]) == 0
    other = write(make_doc(gpu="NVIDIA B200"), tmp_path / "b200.json")
    assert bench.main(["--from", other, "--check", str(baselines)]) == 2
    assert "no baseline for NVIDIA B200" in capsys.readouterr().err
    write(make_doc(gpu="NVIDIA B200"), baselines / "NVIDIA-B200.json")
    assert bench.main(["--from", result, "--check", str(baselines / "NVIDIA-B200.json")]) == 2
    assert "not comparable" in capsys.readouterr().err


def test_cli_merges_reports_and_plots_results_made_elsewhere(tmp_path, capsys):
    parts = [write(make_doc(suite.section_cases(s)), tmp_path / f"{s}.json")
             for s in suite.SECTIONS]
    out, png = tmp_path / "all.json", tmp_path / "all.png"
    assert bench.main(["--from", *parts, "--out", str(out), "--plot", str(png)]) == 0
    assert result_file.validate(json.loads(out.read_text())) == []
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "wan2.1-14b-720p: B=1 H=40 L=75600 D=128 bf16, forward+backward" in table


def test_check_refuses_options_the_baseline_sets(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--check", "--shape", "1,2,4096,64", "--timing", "kernels"])
    assert exit_.value.code == 2
    assert "leave out --shape, --timing" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible")
def test_cli_measuring_without_a_gpu_is_a_clear_error(capsys):
    assert bench.main(["--sections", "shapes"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_committed_baselines_are_valid_gate_baselines():
    files = sorted(Path(bench.DEFAULT_BASELINES).glob("*.json"))
    assert files, "no baseline committed under benchmarks/baselines"
    for path in files:
        doc = result_file.load(path)
        assert path == result_file.baseline_path(path.parent, doc["environment"]["gpu"])
        assert doc["settings"]["timing"] == "kernels", path
        assert gate.gated_rows(doc), path
        assert not any(v.failure for v in gate.check(doc, doc, 0.0))


def test_check_alone_uses_the_shipped_baselines(tmp_path, capsys):
    [shipped] = [p for p in Path(bench.DEFAULT_BASELINES).glob("*.json")
                 if p.name == "NVIDIA-H200.json"]
    assert bench.main(["--from", str(shipped), "--check"]) == 0
    assert f"baseline: {bench.DEFAULT_BASELINES}" in capsys.readouterr().out
