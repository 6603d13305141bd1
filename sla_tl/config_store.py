"""Tuned schedules, stored as JSON under the cache directory and read by the CUDA operators.

The autotuner writes one entry per tuned problem (`TuneKey`). An operator call looks its
problem up in memory: the file is read once per process (again after `reload()`), and
each distinct call shape is resolved once, so the hot path does no file or database access.

Lookup order, for a call on a given GPU model, arch and TileLang version:
1. "tuned": an entry for exactly this problem (shape, dtype, block sizes, feature map,
   linear mode, layout, and the same critical and negligible block counts);
2. "nearest": the entry with the same dim, dtype, block sizes, feature map, linear mode and
   layout whose size (B*H*Lq, Lk) and density are closest on a log scale;
3. "default": no entry; every kernel takes its per-arch default knobs.
Entries made on another GPU model, arch or TileLang version are never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from . import spec
from .kernels import Schedule

STORE_FILE = "tuned_configs.json"
FORMAT_VERSION = 1


def cache_dir() -> Path:
    """`$SLA_TL_CACHE_DIR`, default `~/.cache/sla_tl`."""
    return Path(os.environ.get("SLA_TL_CACHE_DIR") or Path.home() / ".cache" / "sla_tl")


class TuneKey(NamedTuple):
    """One tuned problem: where it was tuned, its shape, and its algorithm knobs."""

    gpu: str
    arch: str
    tilelang: str
    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    dtype: str
    block_q: int
    block_kv: int
    topk: float
    k_low: float
    feature_map: str
    linear: str
    layout: str

    def study_name(self) -> str:
        """A readable, unique name for this key's Optuna study."""
        return "|".join(f"{name}={value}" for name, value in self._asdict().items())

    def block_counts(self) -> tuple[int, int]:
        """(critical, negligible) key blocks per query row for this key."""
        n_kv = spec.num_blocks(self.lk, self.block_kv)
        n_crit = spec.num_critical(self.topk, n_kv)
        return n_crit, spec.num_negligible(self.k_low, n_kv, n_crit)

    def call_key(self) -> CallKey:
        """What a call of this problem looks up."""
        n_crit, n_neg = self.block_counts()
        shared = {name: getattr(self, name) for name in CallKey._fields if name in self._fields}
        return CallKey(**shared, n_crit=n_crit, n_neg=n_neg)


class CallKey(NamedTuple):
    """What an operator call knows about its problem (block counts, not ratios)."""

    gpu: str
    arch: str
    tilelang: str
    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    dtype: str
    block_q: int
    block_kv: int
    n_crit: int
    n_neg: int
    feature_map: str
    linear: str
    layout: str


class Entry(NamedTuple):
    """A stored result of tuning one key."""

    key: TuneKey
    schedule: dict
    latency_ms: float
    default_latency_ms: float | None
    trials: int


class Lookup(NamedTuple):
    """The schedule a call uses, where it came from, and the entry it came from (if any)."""

    schedule: dict
    source: str
    entry: Entry | None


_FAMILY = ("gpu", "arch", "tilelang", "dim", "dtype", "block_q", "block_kv", "feature_map",
           "linear", "layout")


def _family(key: TuneKey | CallKey) -> tuple:
    return tuple(getattr(key, name) for name in _FAMILY)


def _distance(entry: TuneKey, call: CallKey) -> float:
    n_crit, _ = entry.block_counts()
    n_kv_entry = spec.num_blocks(entry.lk, entry.block_kv)
    n_kv_call = spec.num_blocks(call.lk, call.block_kv)
    rows_entry = entry.batch * entry.heads * entry.lq
    rows_call = call.batch * call.heads * call.lq
    # A precomputed LUT may be empty: count it as one block for the comparison.
    density_call = max(call.n_crit, 1) / n_kv_call
    return (abs(math.log(rows_entry / rows_call)) + abs(math.log(entry.lk / call.lk))
            + abs(math.log((n_crit / n_kv_entry) / density_call)))


def _exact(entry: TuneKey, call: CallKey) -> bool:
    same = ("batch", "heads", "lq", "lk")
    return (_family(entry) == _family(call)
            and all(getattr(entry, n) == getattr(call, n) for n in same)
            and entry.block_counts() == (call.n_crit, call.n_neg))


class ConfigStore:
    """The tuned-schedule file of one cache directory, held in memory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: list[Entry] | None = None
        self._resolved: dict[CallKey, Lookup] = {}
        self._lock = threading.Lock()

    def entries(self) -> list[Entry]:
        """Every stored entry (read from disk on first use)."""
        if self._entries is None:
            self._entries = _read(self.path)
        return self._entries

    def lookup(self, call: CallKey) -> Lookup:
        """The schedule for a call (see the module docstring for the order)."""
        found = self._resolved.get(call)
        if found is None:
            with self._lock:
                found = self._resolve(call)
                self._resolved[call] = found
        return found

    def _resolve(self, call: CallKey) -> Lookup:
        family = [e for e in self.entries() if _family(e.key) == _family(call)]
        for entry in family:
            if _exact(entry.key, call):
                return Lookup(entry.schedule, "tuned", entry)
        if family:
            entry = min(family, key=lambda e: _distance(e.key, call))
            return Lookup(entry.schedule, "nearest", entry)
        return Lookup({}, "default", None)

    def record(self, entry: Entry) -> None:
        """Add or replace the entry for `entry.key`; safe against concurrent writers."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.path.with_suffix(".lock")):
            kept = [e for e in _read(self.path) if e.key != entry.key]
            _write(self.path, [*kept, entry])
        self.reload()

    def reload(self) -> None:
        """Forget what was read, so the next lookup reads the file again."""
        with self._lock:
            self._entries = None
            self._resolved = {}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read(path: Path) -> list[Entry]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown tuned-config format {data.get('format')!r}; "
                         f"expected {FORMAT_VERSION}. Delete the file and tune again.")
    return [Entry(TuneKey(**e["key"]), e["schedule"], e["latency_ms"], e["default_latency_ms"],
                  e["trials"]) for e in data["entries"]]


def _write(path: Path, entries: list[Entry]) -> None:
    data = {"format": FORMAT_VERSION,
            "entries": [dict(e._asdict(), key=e.key._asdict()) for e in entries]}
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        json.dump(data, out, indent=1, sort_keys=True)
    os.replace(temporary, path)


_stores: dict[Path, ConfigStore] = {}


def active_store() -> ConfigStore:
    """The store of the current cache directory (one object per directory per process)."""
    path = cache_dir() / STORE_FILE
    store = _stores.get(path)
    if store is None:
        store = _stores.setdefault(path, ConfigStore(path))
    return store


def schedule_for(call: CallKey) -> Schedule:
    """The schedule an operator call runs with."""
    return active_store().lookup(call).schedule
