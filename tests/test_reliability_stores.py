"""The stores on disk: a damaged tuned-config store never takes the operators down and is
never silently overwritten, store values are checked before use, and paths built from
names and environment variables stay where they belong."""

from __future__ import annotations

import json
import math
import os
import stat
import warnings

import pytest
from sqlalchemy.engine import make_url

from sla_tl import config_store, kernel_cache, static_check
from sla_tl.autotune.storage import default_url, open_storage
from sla_tl.config_store import ConfigStore, Entry, StoreError, TunedConfigWarning, TuneKey
from sla_tl.paths import cache_dir
from sla_tl.targets import model_slug

WAN = TuneKey("NVIDIA H200", "sm_90a", "0.1.15", 1, 12, 32760, 32760, 128, "bfloat16", 128, 64,
              0.05, 0.0, "softmax", "marginal", "bhsd")
SCHEDULE = {"forward": {"num_stages": 2}, "backward_dq": {"warp_specialization": "pingpong"}}


def _raw(key: TuneKey = WAN, **changes) -> dict:
    entry = dict(key=key._asdict(), schedule=SCHEDULE, latency_ms=6.1, default_latency_ms=6.8,
                 trials=30)
    entry.update(changes)
    return entry


def _with_key(**changes) -> dict:
    return _raw() | {"key": {**WAN._asdict(), **changes}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory as the operators see it."""
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(tmp_path))
    return tmp_path


def _damage_cases():
    return {
        "truncated": b'{"format": 1, "entries": [{"key": {"gpu": "NVIDIA',
        "garbage": b"\x00\x13 not json at all {{{",
        "not text": b"\xff\xfe\xfa" * 10,
        "a list": b"[]",
        "no format": b'{"entries": []}',
        "format as text": b'{"format": "1", "entries": []}',
        "entries not a list": b'{"format": 1, "entries": {}}',
        "nested too deeply": b"[" * 100000 + b"]" * 100000,
    }


@pytest.mark.parametrize("kind", list(_damage_cases()))
def test_a_damaged_store_warns_once_naming_the_file_and_the_defaults_are_used(cache, kind):
    path = cache / config_store.STORE_FILE
    path.write_bytes(_damage_cases()[kind])
    store = config_store.active_store()
    store.reload()
    with pytest.warns(TunedConfigWarning, match=rf"{path}: .*the operators use the default "):
        assert config_store.schedule_for(WAN.call_key()) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per read, not once per call
        assert config_store.schedule_for(WAN.call_key()._replace(lq=1000)) == {}


@pytest.mark.parametrize("kind", list(_damage_cases()))
def test_a_damaged_store_is_moved_aside_before_a_write(tmp_path, kind):
    path = tmp_path / config_store.STORE_FILE
    damaged = _damage_cases()[kind]
    path.write_bytes(damaged)
    store = ConfigStore(path)
    with pytest.warns(TunedConfigWarning, match=r"moved it to .*damaged-"):
        store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    [aside] = tmp_path.glob(f"{config_store.STORE_FILE}.damaged-*")
    assert aside.read_bytes() == damaged
    assert ConfigStore(path).lookup(WAN.call_key()).source == "tuned"


def test_an_unreadable_store_is_named_and_not_replaced(tmp_path):
    path = tmp_path / config_store.STORE_FILE
    path.mkdir()  # a directory where the file should be
    store = ConfigStore(path)
    with pytest.warns(TunedConfigWarning, match=r"cannot be read"):
        assert store.entries() == []
    with pytest.raises(StoreError, match=rf"cannot write the tuned-config store {path}"):
        store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    assert path.is_dir()


MALFORMED = {
    "key field missing": lambda: _raw() | {"key": {n: v for n, v in WAN._asdict().items()
                                                   if n != "lk"}},
    "key field extra": lambda: _with_key(gate=True),
    "lq as a string": lambda: _with_key(lq="32760"),
    "batch 0": lambda: _with_key(batch=0),
    "topk 5": lambda: _with_key(topk=5),
    "dtype float99": lambda: _with_key(dtype="float99"),
    "block_q 96": lambda: _with_key(block_q=96),
    "gpu named ..": lambda: _with_key(gpu=".."),
    "group 0": lambda: _raw(schedule={"key_pass": {"group": 0}}),
    "num_stages -5": lambda: _raw(schedule={"forward": {"num_stages": -5}}),
    "an unsearched knob": lambda: _raw(schedule={"key_pass": {"threads": 64}}),
    "an unknown kernel": lambda: _raw(schedule={"backward_everything": {}}),
    "a bool knob as an int": lambda: _raw(schedule={"backward_dkdv": {"linear_first": 1}}),
    "latency NaN": lambda: _raw(latency_ms=math.nan),
    "trials 0": lambda: _raw(trials=0),
    "entry field extra": lambda: _raw(notes="fast"),
    "not an object": lambda: [1, 2],
}


def test_malformed_entries_are_skipped_one_by_one(tmp_path):
    path = tmp_path / config_store.STORE_FILE
    big = WAN._replace(heads=40, lq=75600, lk=75600)
    raws = [_raw(key=big)] + [make() for make in MALFORMED.values()]
    text = json.dumps({"format": config_store.FORMAT_VERSION, "entries": raws})
    path.write_text(text)
    store = ConfigStore(path)
    with pytest.warns(TunedConfigWarning) as caught:
        entries = store.entries()
    assert [e.key for e in entries] == [big]
    message = str(caught[0].message)
    assert f"{path}: entry 1 skipped: key: missing lk" in message
    assert "use its 1 good entries" in message
    # The good entry serves as the nearest tuned shape: the bad ones cannot reach the lookup.
    assert store.lookup(WAN.call_key()).source == "nearest"
    for index, kind in enumerate(MALFORMED, start=1):
        contents = config_store._read(path)
        assert any(p.startswith(f"entry {index} skipped") for p in contents.problems), kind
    # Writing keeps the file with the bad entries aside, then stores the good ones.
    with pytest.warns(TunedConfigWarning, match="moved it to"):
        store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    [aside] = tmp_path.glob(f"{config_store.STORE_FILE}.damaged-*")
    assert aside.read_text() == text
    assert {e.key for e in ConfigStore(path).entries()} == {WAN, big}


def test_a_newer_format_keeps_the_entries_an_older_reader_understands(tmp_path):
    path = tmp_path / config_store.STORE_FILE
    newer = _raw(notes="from the future") | {"key": {**WAN._asdict(), "gate": "none"}}
    broken = _with_key(batch=0)
    text = json.dumps({"format": config_store.FORMAT_VERSION + 1, "entries": [newer, broken]})
    path.write_text(text)
    store = ConfigStore(path)
    with pytest.warns(TunedConfigWarning, match=r"newer sla-tl \(format 2.*entry 1 skipped"):
        assert store.lookup(WAN.call_key()).source == "tuned"
    with pytest.raises(StoreError, match=rf"{path} was written by a newer sla-tl"):
        store.record(Entry(WAN._replace(heads=2), SCHEDULE, 1.0, 2.0, 5))
    assert path.read_text() == text


def test_the_lock_file_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    path = tmp_path / config_store.STORE_FILE
    path.with_suffix(".lock").symlink_to(victim)
    with pytest.raises(StoreError, match=r"is a symbolic link; refusing to use it"):
        ConfigStore(path).record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    assert victim.read_text() == "precious"
    assert not path.exists()


def test_a_rewrite_keeps_the_stores_mode(tmp_path):
    path = tmp_path / config_store.STORE_FILE
    store = ConfigStore(path)
    store.record(Entry(WAN, SCHEDULE, 6.1, 6.8, 30))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # a new file: the umask's
    path.chmod(0o640)
    store.record(Entry(WAN._replace(heads=2), SCHEDULE, 1.0, 2.0, 5))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name,slug", [
    ("NVIDIA H200", "NVIDIA-H200"), ("../../etc", "etc"), (".hidden", "hidden"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"), ("a/b\\c", "a-b-c"),
])
def test_gpu_model_names_become_one_path_component(name, slug):
    assert model_slug(name) == slug


@pytest.mark.parametrize("name", ["..", ".", "", "///", " - "])
def test_a_gpu_model_name_that_cannot_be_a_directory_is_refused(name):
    with pytest.raises(ValueError, match=r"gpu must name a GPU model"):
        model_slug(name)


def test_the_cache_directory_expands_a_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SLA_TL_CACHE_DIR", "~/sla cache")
    assert cache_dir() == tmp_path / "sla cache"
    monkeypatch.delenv("SLA_TL_CACHE_DIR")
    assert cache_dir() == tmp_path / ".cache" / "sla_tl"


@pytest.mark.parametrize("odd", ["what?", "100%", "a#b", "x{y}", "sp ace"])
def test_the_optuna_database_lands_in_the_cache_directory_whatever_its_name(tmp_path,
                                                                            monkeypatch, odd):
    directory = tmp_path / odd
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(directory))
    url = default_url()
    assert make_url(url).database == str(directory / "optuna.db")
    open_storage()
    assert (directory / "optuna.db").is_file()


def test_a_damaged_optuna_database_is_named(tmp_path):
    path = tmp_path / "optuna.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ValueError, match=rf"cannot open the Optuna storage {path}: file is not "
                                         "a database"):
        open_storage(f"sqlite:///{path}")
    with pytest.raises(ValueError, match=r"storage must be an SQLAlchemy database URL"):
        open_storage("not a url")


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"forward:x": {"registers": 1}}'])
def test_a_damaged_kernel_record_is_named(tmp_path, content):
    path = tmp_path / "resources.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"{path}"):
        static_check.load_record(str(path))


def test_a_kernel_cache_that_cannot_be_made_never_stops_the_operators(tmp_path, monkeypatch):
    from tilelang.env import env

    blocker = tmp_path / "a file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SLA_TL_CACHE_DIR", str(blocker))
    monkeypatch.delenv("TILELANG_CACHE_DIR", raising=False)
    with pytest.raises(ValueError, match=rf"cannot use the kernel cache directory {blocker}"):
        kernel_cache.require("sm_90a")  # what warm, tune and kernels get
    with pytest.warns(kernel_cache.KernelCacheWarning, match=r"compiling without a disk cache"):
        with kernel_cache.compiling_for("sm_90a") as directory:  # what the operators get
            assert directory is None and env.is_cache_globally_disabled()
    assert not env.is_cache_globally_disabled()
    assert "TILELANG_DISABLE_CACHE" not in os.environ or os.environ[
        "TILELANG_DISABLE_CACHE"] != "1"
