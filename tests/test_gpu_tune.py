"""A real (small) tune on the GPU: the stored schedule is what the operator then runs, and
it gives the default schedule's outputs bit for bit."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import config_store, tilelang_backend
from sla_tl.autotune.bit_identity import REFUSED, difference
from sla_tl.autotune.measure import schedule_measurement
from sla_tl.config_store import ConfigStore
from sla_tl.plan import attention_plan, call_shape
from sla_tl.settings import Settings
from sla_tl.targets import target_of

from .helpers import random_projection, random_qkv, relative_error

pytestmark = pytest.mark.gpu


def test_tune_stores_a_schedule_the_operator_runs(tmp_path, monkeypatch):
    store = ConfigStore(tmp_path / "tuned.json")
    monkeypatch.setattr(config_store, "active_store", lambda: store)
    shape = (1, 4, 4000, 128)
    reports = sla_tl.tune("sm90", shapes=[shape], trials=6, storage=f"sqlite:///{tmp_path}/s.db",
                          block_q=128, block_kv=64, topk=0.1, progress=False)
    result = reports[0].schedule
    assert result.complete >= 1 and result.default_ms is not None
    assert result.best_ms <= result.default_ms
    assert [e.key for e in store.entries()] == [reports[0].key]

    generator = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(1, 4, 4000, 4000, 128, torch.bfloat16, generator, "cuda")
    weight, bias = random_projection(128, torch.float32, generator, "cuda")
    s = Settings(block_q=128, block_kv=64)
    routing = tilelang_backend.route(q, k, 0.1, 0.0, 128, 64, "bhsd")
    plan = attention_plan(target_of(q.device), call_shape(q, k, s, False, routing.widths))
    assert plan.schedule == result.best

    tuned = torch.ops.sla.attention(q, k, v, weight, bias, 0.1, 0.0, 128, 64)
    default = tilelang_backend.forward(q, k, v, routing, weight, bias, s, schedule={}).out
    assert not tuned.isnan().any()
    assert relative_error(tuned, default) < 1e-2


@pytest.mark.parametrize("linear,mode", [("marginal", "fwd+bwd"), ("global", "fwd")])
def test_every_schedule_the_tuner_keeps_gives_the_defaults_bits(tmp_path, monkeypatch, linear,
                                                                 mode):
    """The stored schedule, and every candidate the tuner did not prune or refuse, give the
    default schedule's outputs bit for bit on inputs other than the tuner's own."""
    store = ConfigStore(tmp_path / "tuned.json")
    monkeypatch.setattr(config_store, "active_store", lambda: store)
    [report] = sla_tl.tune("sm90", shapes=[(1, 4, 4000, 128)], trials=8,
                           storage=f"sqlite:///{tmp_path}/s.db", block_q=128, block_kv=64,
                           topk=0.1, linear=linear, mode=mode, progress=False)
    result = report.schedule
    assert result.complete >= 1
    assert all(r.reason.startswith(REFUSED) for r in result.refused)
    refused = {(r.kernel, r.candidate) for r in result.refused}

    outputs = schedule_measurement(report.key, mode, input_sets=2, seed=1234).outputs
    default = outputs({})
    [entry] = store.entries()
    assert difference(default, outputs(entry.schedule)) is None, entry.schedule
    kept = [c for c in report.candidates if not c.pruned and (c.kernel, c.label) not in refused]
    assert {c.kernel for c in kept} == {c.kernel for c in report.candidates}
    for c in kept:
        assert difference(default, outputs({c.kernel: c.knobs})) is None, (c.kernel, c.label)
