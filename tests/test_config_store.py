"""The tuned-config store: round trip, lookup order, and what is never used."""

from __future__ import annotations

import json

import pytest

from sla_tl import config_store
from sla_tl.config_store import CallKey, ConfigStore, Entry, TuneKey

WAN = TuneKey("NVIDIA H200", "sm_90a", "0.1.15", 1, 12, 32760, 32760, 128, "bfloat16", 128, 64,
              0.05, 0.0, "softmax", "marginal", "bhsd")
SCHEDULE = {"forward": {"num_stages": 2}, "backward_dq": {"warp_specialization": "pingpong"}}


def _call(key: TuneKey, **changes) -> CallKey:
    return key.call_key()._replace(**changes)


@pytest.fixture
def store(tmp_path) -> ConfigStore:
    return ConfigStore(tmp_path / "tuned.json")


def test_round_trip_and_exact_lookup(store, tmp_path):
    store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    fresh = ConfigStore(tmp_path / "tuned.json")
    found = fresh.lookup(_call(WAN))
    assert found.source == "tuned"
    assert found.schedule == SCHEDULE
    assert found.entry.latency_ms == 6.1 and found.entry.default_latency_ms == 6.8


def test_nearest_tuned_shape_then_default(store):
    store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    big = WAN._replace(heads=40, lq=75600, lk=75600)
    store.record(Entry(big, {"forward": {"num_stages": 3}}, 30.0, 31.0, 30))

    near_wan = store.lookup(_call(WAN, lq=30000, lk=30000, n_crit=23))
    assert (near_wan.source, near_wan.entry.key) == ("nearest", WAN)
    near_big = store.lookup(_call(WAN, heads=40, lq=70000, lk=70000, n_crit=54))
    assert (near_big.source, near_big.entry.key) == ("nearest", big)
    # Another density at the exact shape is not "tuned".
    assert store.lookup(_call(WAN, n_crit=51)).source == "nearest"

    for other in (dict(gpu="NVIDIA H100"), dict(tilelang="0.1.16"), dict(dim=64),
                  dict(block_kv=128), dict(linear="global"), dict(dtype="float16")):
        found = store.lookup(_call(WAN, **other))
        assert found == config_store.Lookup({}, "default", None), other


def test_record_replaces_the_same_key_and_reloads(store):
    store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    assert store.lookup(_call(WAN)).schedule == SCHEDULE
    store.record(Entry(WAN, {"forward": {"num_stages": 3}}, 5.9, 6.8, 60))
    assert len(store.entries()) == 1
    assert store.lookup(_call(WAN)).schedule == {"forward": {"num_stages": 3}}


def test_lookup_reads_the_file_once(store):
    store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    store.lookup(_call(WAN))
    store.path.write_text("not json")  # a later read would fail
    assert store.lookup(_call(WAN)).source == "tuned"
    assert store.lookup(_call(WAN, lq=1000, lk=1000, n_crit=1)).source == "nearest"


def test_a_newer_format_is_named_in_a_warning(store):
    store.path.write_text(json.dumps({"format": 99, "entries": []}))
    with pytest.warns(config_store.TunedConfigWarning, match=r"newer sla-tl \(format 99"):
        assert store.entries() == []


def test_active_store_follows_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    store = config_store.active_store()
    assert store.path == tmp_path / config_store.STORE_FILE
    assert config_store.active_store() is store
    assert config_store.schedule_for(_call(WAN)) == {}


def test_a_knob_searched_in_one_linear_mode_only_is_refused_in_the_other(store):
    """The key pass's `group` sets the order of the global mode's float32 sum: a store entry
    with it for a global-mode key is skipped, named, and the marginal one is used."""
    marginal = {"key_pass": {"group": 16}}
    glob = WAN._replace(linear="global")
    store.record(Entry(WAN, marginal, 6.1, 6.8, 30))
    store.record(Entry(glob, marginal, 6.1, 6.8, 30))
    fresh = ConfigStore(store.path)
    with pytest.warns(config_store.TunedConfigWarning,
                      match=r"entry 1 skipped: schedule: key_pass has no searched knob 'group'"):
        assert [e.key for e in fresh.entries()] == [WAN]
